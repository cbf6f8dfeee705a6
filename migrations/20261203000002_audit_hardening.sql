-- The operations log against its own database roles (issue 14).
--
-- 1. A running row's parameters (and its approval link) are frozen when it is
--    written: only its outcome, end, error and result may be recorded, once.
-- 2. The role dbops runs as need not own anything: `dbops migrate
--    --runtime-role NAME` grants it exactly what it needs (see
--    `dbops_grant_runtime`), so it cannot switch the log's triggers off, alter
--    its tables or rewrite the chain. Signed checkpoints kept outside the
--    database (src/audit/checkpoint.rs) cover what even the owner or a
--    superuser could do.
CREATE OR REPLACE FUNCTION operations_guard() RETURNS trigger
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
           OR NEW.target IS DISTINCT FROM OLD.target
           OR NEW.params IS DISTINCT FROM OLD.params OR NEW.approval_id IS DISTINCT FROM OLD.approval_id THEN
            RAISE EXCEPTION 'the operations log is append-only: a running operation''s parameters are frozen; only its outcome can be recorded'
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

-- Grants the role dbops runs as what it needs and no more: it reads and
-- writes its tables (the log: SELECT, INSERT, and UPDATE that the triggers
-- limit to recording a running operation's outcome; never DELETE, TRUNCATE or
-- TRIGGER), uses their sequences, and owns nothing. Called by `dbops migrate
-- --runtime-role`, as the owner, after every migration (new tables included).
CREATE OR REPLACE FUNCTION dbops_grant_runtime(runtime name) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s name;
    t record;
BEGIN
    FOREACH s IN ARRAY ARRAY['public', 'tower_sessions', 'underway']::name[] LOOP
        IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = s) THEN
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, runtime);
            EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO %I', s, runtime);
            EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', s, runtime);
            FOR t IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = s AND c.relkind IN ('r', 'p') LOOP
                IF s = 'public' AND t.relname IN ('operations', 'operations_chain_head', '_sqlx_migrations') THEN
                    CONTINUE;
                END IF;
                EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.%I TO %I', s, t.relname, runtime);
            END LOOP;
        END IF;
    END LOOP;
    EXECUTE format('REVOKE ALL ON public.operations, public.operations_chain_head FROM %I', runtime);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON public.operations TO %I', runtime);
    EXECUTE format('GRANT SELECT, UPDATE ON public.operations_chain_head TO %I', runtime);
    EXECUTE format('GRANT SELECT ON public._sqlx_migrations TO %I', runtime);
END;
$$;
