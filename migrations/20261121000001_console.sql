-- dbops' own schema: users and the append-only, hash-chained operations log.

CREATE TABLE users (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username            text        NOT NULL,
    password_hash       text        NOT NULL,
    role                text        NOT NULL CHECK (role IN ('viewer', 'operator', 'approver', 'admin')),
    disabled            boolean     NOT NULL DEFAULT false,
    failed_logins       integer     NOT NULL DEFAULT 0,
    locked_until        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now(),
    last_login_at       timestamptz,
    CONSTRAINT username_shape CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$')
);
CREATE UNIQUE INDEX users_username_lower ON users (lower(username));

-- The operations log. A row is written when an operation starts (outcome 'running')
-- or, for instant operations, already finished. Once finished it can never change,
-- and no row can ever be deleted: the triggers below refuse it for every role,
-- including the owner, unless triggers are switched off by a superuser (which
-- `dbops audit verify` then detects through the hash chain).
CREATE TABLE operations (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id   text,
    actor_id     bigint,
    actor_name   text,
    actor_role   text,
    kind         text        NOT NULL,
    target       text,
    params       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at     timestamptz,
    outcome      text        NOT NULL CHECK (outcome IN ('running', 'succeeded', 'failed', 'denied', 'interrupted', 'cancelled')),
    error        text,
    result       jsonb,
    approval_id  bigint,
    client_addr  text,
    -- Hash chain over finished rows, in the order they finished.
    chain_seq    bigint UNIQUE,
    prev_hash    bytea,
    hash         bytea,
    CONSTRAINT kind_shape CHECK (kind ~ '^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$'),
    CONSTRAINT finished_has_end CHECK ((outcome = 'running') = (ended_at IS NULL))
);
CREATE INDEX operations_started_at ON operations (started_at);
CREATE INDEX operations_kind_id ON operations (kind, id);
CREATE INDEX operations_actor_id ON operations (actor_name, id);
CREATE INDEX operations_target_id ON operations (target, id);
CREATE INDEX operations_outcome_id ON operations (outcome, id);
CREATE INDEX operations_running ON operations (id) WHERE outcome = 'running';

-- The head of the chain: one row, locked by every finishing operation, so finished
-- rows get consecutive sequence numbers with no gaps.
CREATE TABLE operations_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_seq  bigint NOT NULL,
    last_hash bytea  NOT NULL
);
INSERT INTO operations_chain_head (last_seq, last_hash) VALUES (0, '\x00'::bytea);

-- The canonical text of a row that the hash covers. Timestamps go in as epoch
-- seconds so that the text does not depend on DateStyle or TimeZone.
CREATE FUNCTION operations_canonical(o operations) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT concat_ws('|',
        quote_nullable(o.id), quote_nullable(o.chain_seq), quote_nullable(o.request_id),
        quote_nullable(o.actor_id), quote_nullable(o.actor_name), quote_nullable(o.actor_role),
        quote_nullable(o.kind), quote_nullable(o.target), quote_nullable(o.params::text),
        quote_nullable(extract(epoch FROM o.started_at)), quote_nullable(extract(epoch FROM o.ended_at)),
        quote_nullable(o.outcome), quote_nullable(o.error), quote_nullable(o.result::text),
        quote_nullable(o.approval_id), quote_nullable(o.client_addr))
$$;

CREATE FUNCTION operations_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head operations_chain_head%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'the operations log is append-only: rows cannot be deleted'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF OLD.outcome <> 'running' THEN
            RAISE EXCEPTION 'the operations log is append-only: operation % is finished and cannot change', OLD.id
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF NEW.id IS DISTINCT FROM OLD.id OR NEW.kind IS DISTINCT FROM OLD.kind
           OR NEW.actor_id IS DISTINCT FROM OLD.actor_id OR NEW.actor_name IS DISTINCT FROM OLD.actor_name
           OR NEW.actor_role IS DISTINCT FROM OLD.actor_role OR NEW.started_at IS DISTINCT FROM OLD.started_at
           OR NEW.request_id IS DISTINCT FROM OLD.request_id OR NEW.client_addr IS DISTINCT FROM OLD.client_addr
           OR NEW.target IS DISTINCT FROM OLD.target THEN
            RAISE EXCEPTION 'the operations log is append-only: only the outcome of a running operation can be recorded'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    IF NEW.chain_seq IS NOT NULL OR NEW.hash IS NOT NULL OR NEW.prev_hash IS NOT NULL THEN
        IF TG_OP = 'INSERT' OR NEW.chain_seq IS DISTINCT FROM OLD.chain_seq
           OR NEW.hash IS DISTINCT FROM OLD.hash OR NEW.prev_hash IS DISTINCT FROM OLD.prev_hash THEN
            RAISE EXCEPTION 'the hash chain is written by the database only'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    IF NEW.outcome <> 'running' THEN
        SELECT * INTO head FROM operations_chain_head FOR UPDATE;
        NEW.chain_seq := head.last_seq + 1;
        NEW.prev_hash := head.last_hash;
        NEW.hash := sha256(head.last_hash || convert_to(operations_canonical(NEW), 'UTF8'));
        UPDATE operations_chain_head SET last_seq = NEW.chain_seq, last_hash = NEW.hash;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER operations_append_only
    BEFORE INSERT OR UPDATE OR DELETE ON operations
    FOR EACH ROW EXECUTE FUNCTION operations_guard();

CREATE FUNCTION operations_no_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the operations log is append-only: it cannot be truncated'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER operations_no_truncate
    BEFORE TRUNCATE ON operations
    FOR EACH STATEMENT EXECUTE FUNCTION operations_no_truncate();

CREATE FUNCTION chain_head_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.last_seq <> OLD.last_seq + 1) THEN
        RAISE EXCEPTION 'the chain head only moves forward, one finished operation at a time'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER chain_head_forward_only
    BEFORE UPDATE OR DELETE ON operations_chain_head
    FOR EACH ROW EXECUTE FUNCTION chain_head_guard();

REVOKE UPDATE, DELETE, TRUNCATE ON operations FROM PUBLIC;
