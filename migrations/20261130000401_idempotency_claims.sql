-- The idempotency gate is one statement: it takes the key's lock and claims the key with a
-- placeholder row (no answer yet), in the command's transaction; the command's answer
-- then fills it. A placeholder never outlives a rolled-back command; one committed by a
-- command refused before it had an answer counts as no record.
ALTER TABLE idempotency_records ALTER COLUMN response_status DROP NOT NULL;
