-- Incidents: an approved destructive action that ended failed (its execution
-- failed, or the job it handed off to failed, was interrupted or stopped). The
-- database opens one whenever such a request becomes `failed`, whichever code
-- path wrote it, so none can forget to. The target shows red on the overview
-- until an approver (or admin) acknowledges it with a note; the acknowledgement
-- is written once, and incidents are never deleted.

CREATE TABLE incidents (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target               text        NOT NULL,
    approval_id          bigint      NOT NULL UNIQUE REFERENCES approval_requests (id),
    action               text        NOT NULL,
    summary              text        NOT NULL,
    error                text        NOT NULL,
    job_id               bigint REFERENCES jobs (id),
    safety_backup_id     bigint,
    failed_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    acknowledged_by      bigint REFERENCES users (id),
    acknowledged_by_name text,
    acknowledged_at      timestamptz,
    acknowledgement      text,
    CONSTRAINT acknowledgement_is_whole CHECK (
        (acknowledged_by IS NULL) = (acknowledged_at IS NULL)
        AND (acknowledged_at IS NULL) = (acknowledgement IS NULL)),
    CONSTRAINT acknowledgement_says_something CHECK (acknowledgement IS NULL OR length(btrim(acknowledgement)) > 0)
);
CREATE INDEX incidents_open ON incidents (target, id) WHERE acknowledged_at IS NULL;

CREATE FUNCTION approval_failed_opens_incident() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO incidents (target, approval_id, action, summary, error, job_id, safety_backup_id)
    VALUES (
        NEW.target, NEW.id, NEW.kind, NEW.summary, coalesce(NULLIF(NEW.error, ''), 'failed'),
        (SELECT j.id FROM jobs j WHERE j.approval_id = NEW.id ORDER BY j.id DESC LIMIT 1),
        CASE WHEN jsonb_typeof(NEW.result -> 'safety_backup_id') = 'number'
             THEN (NEW.result ->> 'safety_backup_id')::bigint END)
    ON CONFLICT (approval_id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER approval_requests_failed_incident
    AFTER UPDATE OF state ON approval_requests
    FOR EACH ROW
    WHEN (NEW.state = 'failed' AND OLD.state IS DISTINCT FROM 'failed' AND NEW.severity = 'destructive')
    EXECUTE FUNCTION approval_failed_opens_incident();

CREATE FUNCTION incidents_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'incidents are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.acknowledged_at IS NOT NULL THEN
        RAISE EXCEPTION 'an incident is acknowledged once' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.id, NEW.target, NEW.approval_id, NEW.action, NEW.summary, NEW.error, NEW.job_id,
        NEW.safety_backup_id, NEW.failed_at)
       IS DISTINCT FROM
       (OLD.id, OLD.target, OLD.approval_id, OLD.action, OLD.summary, OLD.error, OLD.job_id,
        OLD.safety_backup_id, OLD.failed_at) THEN
        RAISE EXCEPTION 'what failed cannot change' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER incidents_append_only
    BEFORE UPDATE OR DELETE ON incidents
    FOR EACH ROW EXECUTE FUNCTION incidents_guard();

CREATE TRIGGER incidents_no_truncate
    BEFORE TRUNCATE ON incidents
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_truncate();
