-- A rebuild applies its projections concurrently, each on its own connection and in its own
-- transactions, so each keeps its own place here, committed with its rows.
-- UNLOGGED like the tables being built (below): a server crash empties both together, and a
-- rebuild that finds a projection's place missing starts over instead of trusting tables
-- the crash emptied. The rows go with the rebuild's own row (discard, swap).
CREATE UNLOGGED TABLE projection_rebuild_positions (
    name           text    PRIMARY KEY,
    singleton      boolean NOT NULL DEFAULT true
                           REFERENCES projection_rebuilds (singleton) ON DELETE CASCADE,
    transaction_id xid8    NOT NULL DEFAULT '0'::xid8,
    position       bigint  NOT NULL DEFAULT 0
);

-- As before, but the copies are UNLOGGED while they are built: filling them writes no WAL.
-- They become logged (leadledger_rebuild_log) before their secondary indexes are made and
-- long before the swap, so the tables swapped in are ordinary, crash-safe tables.
CREATE OR REPLACE FUNCTION leadledger_rebuild_prepare(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    c record;
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    CREATE SCHEMA leadledger_rebuild;
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('CREATE UNLOGGED TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES)', t, t);
        FOR c IN
            SELECT conname, pg_get_constraintdef(oid) AS definition
            FROM pg_constraint
            WHERE conrelid = format('public.%I', t)::regclass AND contype IN ('p', 'u')
            ORDER BY conname
        LOOP
            EXECUTE format('ALTER TABLE leadledger_rebuild.%I ADD CONSTRAINT %I %s', t, c.conname, c.definition);
        END LOOP;
    END LOOP;
END
$$;

-- Makes the rebuilt `tables` logged (a no-op for those that are): one pass that writes each
-- table to the WAL whole, far cheaper than logging its rows one by one as they were built.
CREATE FUNCTION leadledger_rebuild_log(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('ALTER TABLE leadledger_rebuild.%I SET LOGGED', t);
    END LOOP;
END
$$;
