-- An idempotency record no longer references its API key by a foreign key. Checking it
-- locked the API key's row (FOR KEY SHARE) in every command with an Idempotency-Key, so
-- every client of one API key took a share lock on the same row at once, which PostgreSQL
-- keeps as a multixact: work on the write path of every command, for a check that cannot
-- fail. Records are only written by commands authenticated with the key they name, API
-- keys are revoked but never deleted, and records are purged by age.
ALTER TABLE idempotency_records DROP CONSTRAINT idempotency_records_api_key_id_fkey;
