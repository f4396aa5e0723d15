-- A command's answer is recorded by the statement that appends its events, so the answer
-- is made before the events have their positions. The record keeps the position of the
-- event its reply names in columns of its own (the reply body itself is sealed); a replay
-- puts it back into the body's `position`.
ALTER TABLE idempotency_records
    ADD COLUMN response_transaction_id xid8,
    ADD COLUMN response_position bigint;

-- The statement that appends a command's events and records its answer counts the
-- records it wrote: fewer than it meant to means a key was answered by another request
-- in the meantime, and nothing of the statement may stay. Raised as a violation of the
-- records' key, the clash it is.
CREATE FUNCTION leadledger_require_recorded(expected bigint, recorded bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF recorded <> expected THEN
        RAISE EXCEPTION 'an idempotency key was answered by another request'
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'idempotency_records_pkey';
    END IF;
    RETURN recorded;
END
$$;
