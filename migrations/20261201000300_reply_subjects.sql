-- Whom each stored reply names, so that an erasure finds the replies naming a person
-- through an index. The replies are sealed and the database cannot search them: an
-- erasure opened every record (kept 25 hours), about 6 µs each, and on a server with five
-- million records it ran past the request's time limit and was refused.
--
-- The UUIDs in the reply (a contact's id is not personal) and the keyed hash, as a UUID,
-- of each email in it (`projections::pii::reply_names`). NULL for the records written
-- before this column: an erasure still opens those, until they expire.
ALTER TABLE idempotency_records ADD COLUMN subjects uuid[];

-- Without the pending list (`fastupdate`): each insert goes into the index at once, a few
-- µs dearer than into the list, but no write ever has to merge a list of thousands of
-- entries into the index (tens to hundreds of milliseconds) before it can commit.
CREATE INDEX idempotency_records_subjects ON idempotency_records USING gin (subjects)
    WITH (fastupdate = off);

-- The records an erasure must still open one by one, until the last of them expires.
CREATE INDEX idempotency_records_without_subjects ON idempotency_records (created_at)
    WHERE subjects IS NULL;
