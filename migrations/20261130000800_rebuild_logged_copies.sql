-- The rebuild's copies are ordinary logged tables from the start.
--
-- They were UNLOGGED while they filled, so that filling them wrote no WAL row by row, and made
-- logged (ALTER TABLE ... SET LOGGED) once their projection had read the feed to its head.
-- Since the rebuild fills its totals once instead of at every batch, the fill is no longer
-- the long pole and the tail is: SET LOGGED rewrites the whole table and rebuilds its keys
-- after the fill, and it measured slower than writing the WAL as the rows arrive (see
-- BENCHMARKS.md). Logged copies also survive a server crash, so the
-- places kept beside them are logged too, and a rebuild resumes after a crash as after any
-- other interruption.

ALTER TABLE projection_rebuild_positions SET LOGGED;

CREATE OR REPLACE FUNCTION leadledger_rebuild_prepare(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    c record;
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    CREATE SCHEMA leadledger_rebuild;
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('CREATE TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES) WITH (autovacuum_enabled = false)', t, t);
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

DROP FUNCTION leadledger_rebuild_log(text[]);

-- Analyzes the rebuilt `tables` that were never analyzed (nor indexed, which comes after).
CREATE FUNCTION leadledger_rebuild_analyze(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        IF (SELECT reltuples FROM pg_class
            WHERE oid = format('leadledger_rebuild.%I', t)::regclass) < 0 THEN
            EXECUTE format('ANALYZE leadledger_rebuild.%I', t);
        END IF;
    END LOOP;
END
$$;
