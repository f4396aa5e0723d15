-- The start-up pass that seals personal data an earlier release stored in the clear
-- (`app::privacy::encrypt_plaintext`) ran over the whole log and every idempotency
-- record at each start: on a log of five million contact events, about 7 GB read before
-- the first command was served at full speed, every time.

-- How far the pass has looked. `transaction_id`: every contact event written by a
-- transaction below it has been examined (sealed, stripped, or found with nothing
-- personal), so the next pass reads only the events from it on. A pass records the
-- oldest transaction still running when it started, and only once it has run to its end.
CREATE TABLE sealing_marks (
    name           text        PRIMARY KEY,
    transaction_id xid8        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The answered replies stored in the clear, and only those: this release seals every
-- reply it stores (they start with `LLS1`), so the index stays empty, and the pass finds
-- what is left of an earlier release's replies without reading the others. The pass's
-- query repeats this predicate word for word, for PostgreSQL to use the index.
CREATE INDEX idempotency_records_clear ON idempotency_records (created_at)
    WHERE response_status IS NOT NULL
      AND substr(response_body, 1, 4) IS DISTINCT FROM 'LLS1'::bytea;
