-- What the approver saw, break-glass and its review.
--
-- What a request acts on as it was when it was made (the action's details and the
-- facts that matter, `params.seen`) lives inside `params`, so the parameter hash
-- and the immutability below cover it; nothing here needs a column for it.
--
-- A break-glass request is made and approved at once by an approver (or admin) on
-- a target that allows it, with an incident reason; it has no `decided_by` (no
-- second person decided it, and `no_self_approval` stays as it is) and needs a
-- review afterwards by another approver: accepted or flagged, with a comment.
-- The database refuses a review by the person who invoked it, a review of
-- anything but a break-glass request, a second review and any other change made
-- together with a review.

ALTER TABLE approval_requests
    ADD COLUMN severity         text NOT NULL DEFAULT 'destructive'
        CHECK (severity IN ('disruptive', 'destructive')),
    ADD COLUMN break_glass      boolean NOT NULL DEFAULT false,
    ADD COLUMN reviewed_by      bigint REFERENCES users (id),
    ADD COLUMN reviewed_by_name text,
    ADD COLUMN reviewed_at      timestamptz,
    ADD COLUMN review           text CHECK (review IN ('accepted', 'flagged')),
    ADD COLUMN review_comment   text,
    ADD CONSTRAINT no_self_review CHECK (reviewed_by IS NULL OR reviewed_by <> requested_by),
    ADD CONSTRAINT review_only_of_break_glass CHECK (reviewed_by IS NULL OR break_glass),
    ADD CONSTRAINT review_is_whole CHECK (
        (reviewed_by IS NULL) = (review IS NULL) AND (reviewed_by IS NULL) = (reviewed_at IS NULL)),
    ADD CONSTRAINT break_glass_is_not_automatic CHECK (NOT (break_glass AND auto_approved)),
    ADD CONSTRAINT break_glass_has_no_decider CHECK (NOT break_glass OR decided_by IS NULL);

-- Break-glass requests nobody has reviewed yet (the overview).
CREATE INDEX approval_requests_unreviewed ON approval_requests (target) WHERE break_glass AND reviewed_by IS NULL;

CREATE OR REPLACE FUNCTION approval_requests_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    review_columns text[] := ARRAY['reviewed_by', 'reviewed_by_name', 'reviewed_at', 'review', 'review_comment'];
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'approval requests are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NOT (NEW.state = 'pending' OR (NEW.state = 'approved' AND (NEW.auto_approved OR NEW.break_glass))) THEN
            RAISE EXCEPTION 'a request starts pending (or auto-approved, or break-glass)' USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.reviewed_by IS NOT NULL THEN
            RAISE EXCEPTION 'a request is reviewed after it is made' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    -- A review: written once, and nothing else changes with it.
    IF (NEW.reviewed_by, NEW.reviewed_by_name, NEW.reviewed_at, NEW.review, NEW.review_comment)
       IS DISTINCT FROM
       (OLD.reviewed_by, OLD.reviewed_by_name, OLD.reviewed_at, OLD.review, OLD.review_comment) THEN
        IF OLD.reviewed_by IS NOT NULL THEN
            RAISE EXCEPTION 'a review cannot be changed' USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF (to_jsonb(NEW) - review_columns) IS DISTINCT FROM (to_jsonb(OLD) - review_columns) THEN
            RAISE EXCEPTION 'a review changes nothing else' USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.kind, NEW.target, NEW.params, NEW.params_hash, NEW.summary, NEW.reason, NEW.requested_by,
        NEW.requested_by_name, NEW.created_at, NEW.expires_at, NEW.auto_approved, NEW.break_glass, NEW.severity)
       IS DISTINCT FROM
       (OLD.kind, OLD.target, OLD.params, OLD.params_hash, OLD.summary, OLD.reason, OLD.requested_by,
        OLD.requested_by_name, OLD.created_at, OLD.expires_at, OLD.auto_approved, OLD.break_glass, OLD.severity) THEN
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
