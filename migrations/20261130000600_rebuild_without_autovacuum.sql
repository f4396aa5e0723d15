-- The rebuilt tables are kept from autovacuum while they are built and swapped in, and are
-- analyzed as soon as they are filled.
--
-- Autovacuum found the freshly filled copies worth analyzing just as the rebuild was about to
-- swap them in, and the swap's ACCESS EXCLUSIVE lock then waited for PostgreSQL to cancel the
-- worker (`deadlock_timeout`, 1 s by default): a second of a ten-second rebuild, at random.
-- The copies are analyzed by the rebuild itself instead, so the planner knows them the moment
-- they are swapped in; the swap gives them back to autovacuum (leadledger_rebuild_settle).

CREATE OR REPLACE FUNCTION leadledger_rebuild_prepare(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    c record;
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    CREATE SCHEMA leadledger_rebuild;
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('CREATE UNLOGGED TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES) WITH (autovacuum_enabled = false)', t, t);
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

-- Makes the rebuilt `tables` logged and analyzes them; a no-op for those already logged.
CREATE OR REPLACE FUNCTION leadledger_rebuild_log(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        IF (SELECT relpersistence FROM pg_class
            WHERE oid = format('leadledger_rebuild.%I', t)::regclass) = 'u' THEN
            EXECUTE format('ALTER TABLE leadledger_rebuild.%I SET LOGGED', t);
            EXECUTE format('ANALYZE leadledger_rebuild.%I', t);
        END IF;
    END LOOP;
END
$$;

-- After leadledger_rebuild_swap, in its transaction: the swapped-in `tables` are ordinary
-- tables again, autovacuum's like every other.
CREATE FUNCTION leadledger_rebuild_settle(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('ALTER TABLE public.%I RESET (autovacuum_enabled)', t);
    END LOOP;
END
$$;
