-- Approvals: every destructive action is first a request. States:
--   pending -> approved | rejected | cancelled | expired
--   approved -> executed | failed   (after the one execution has been claimed)
--   approved -> cancelled | expired (only while no execution has been claimed)
-- The database refuses self-approval, any other transition, any change of what
-- was requested, and any DELETE.

CREATE TABLE approval_requests (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind                 text        NOT NULL,
    target               text        NOT NULL,
    params               jsonb       NOT NULL,
    params_hash          bytea       NOT NULL,
    summary              text        NOT NULL,
    reason               text        NOT NULL CHECK (length(btrim(reason)) > 0),
    requested_by         bigint      NOT NULL REFERENCES users (id),
    requested_by_name    text        NOT NULL,
    state                text        NOT NULL CHECK (state IN ('pending', 'approved', 'rejected', 'cancelled', 'expired', 'executed', 'failed')),
    auto_approved        boolean     NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL DEFAULT now(),
    expires_at           timestamptz NOT NULL,
    decided_by           bigint REFERENCES users (id),
    decided_by_name      text,
    decided_at           timestamptz,
    decision_comment     text,
    executed_by          bigint REFERENCES users (id),
    executed_by_name     text,
    execution_started_at timestamptz,
    finished_at          timestamptz,
    error                text,
    result               jsonb,
    CONSTRAINT no_self_approval CHECK (decided_by IS NULL OR decided_by <> requested_by),
    CONSTRAINT expiry_after_creation CHECK (expires_at > created_at)
);
CREATE INDEX approval_requests_pending ON approval_requests (id) WHERE state = 'pending';
CREATE INDEX approval_requests_open_expiry ON approval_requests (expires_at) WHERE state IN ('pending', 'approved');
CREATE INDEX approval_requests_requester ON approval_requests (requested_by, id);

CREATE FUNCTION approval_requests_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'approval requests are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NOT (NEW.state = 'pending' OR (NEW.state = 'approved' AND NEW.auto_approved)) THEN
            RAISE EXCEPTION 'a request starts pending (or auto-approved)' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.kind, NEW.target, NEW.params, NEW.params_hash, NEW.summary, NEW.reason, NEW.requested_by,
        NEW.requested_by_name, NEW.created_at, NEW.expires_at, NEW.auto_approved)
       IS DISTINCT FROM
       (OLD.kind, OLD.target, OLD.params, OLD.params_hash, OLD.summary, OLD.reason, OLD.requested_by,
        OLD.requested_by_name, OLD.created_at, OLD.expires_at, OLD.auto_approved) THEN
        RAISE EXCEPTION 'what was requested cannot change after the request is made'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.decided_by IS NOT NULL AND NEW.decided_by IS DISTINCT FROM OLD.decided_by THEN
        RAISE EXCEPTION 'a decision cannot be changed' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.execution_started_at IS NOT NULL AND NEW.execution_started_at IS DISTINCT FROM OLD.execution_started_at THEN
        RAISE EXCEPTION 'an approved request runs once' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT (
        (OLD.state = 'pending' AND NEW.state IN ('approved', 'rejected', 'cancelled', 'expired'))
     OR (OLD.state = 'approved' AND NEW.state = 'approved'
         AND OLD.execution_started_at IS NULL AND NEW.execution_started_at IS NOT NULL)
     OR (OLD.state = 'approved' AND NEW.state IN ('executed', 'failed') AND OLD.execution_started_at IS NOT NULL)
     OR (OLD.state = 'approved' AND NEW.state IN ('cancelled', 'expired') AND OLD.execution_started_at IS NULL)
    ) THEN
        RAISE EXCEPTION 'an approval request cannot go from % to %', OLD.state, NEW.state
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.state = 'pending' AND NEW.state IN ('approved', 'rejected') AND NEW.decided_by IS NULL THEN
        RAISE EXCEPTION 'a decision names who made it' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER approval_requests_state_machine
    BEFORE INSERT OR UPDATE OR DELETE ON approval_requests
    FOR EACH ROW EXECUTE FUNCTION approval_requests_guard();

REVOKE DELETE, TRUNCATE ON approval_requests FROM PUBLIC;

CREATE FUNCTION refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: it cannot be truncated', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER approval_requests_no_truncate
    BEFORE TRUNCATE ON approval_requests
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_truncate();

-- The operations that belong to a request, for its detail page.
CREATE INDEX operations_approval ON operations (approval_id) WHERE approval_id IS NOT NULL;
