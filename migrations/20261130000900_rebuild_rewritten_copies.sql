-- The rebuild's copies of tables whose rows later events rewrite (an enrollment's reports
-- arrive after it was created, most of them a batch of the fill later) fill with
-- half-empty pages.
--
-- A copy fills with only its keys (its other indexes are built once it is full), so a
-- rewritten row changes no indexed column and PostgreSQL can keep the new version on the
-- row's own page (a heap-only tuple: no new entry in the key's index, no new page), if
-- the page has room. Packed full by the inserts before, almost none had: 435 of 176,029
-- rewrites of `enrollments_view` over the benchmark's log were heap-only, and each of the
-- others added a tuple at the table's end and an entry to its key. With `fillfactor = 50`,
-- 152,000 of them are, for a table of about the same size (old versions are pruned from
-- the page), and the rebuild spends about half a core-second less (see BENCHMARKS.md).
-- The swapped-in table gets the default back (rows written live go on full pages).

DROP FUNCTION leadledger_rebuild_prepare(text[]);

CREATE FUNCTION leadledger_rebuild_prepare(tables text[], rewritten text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    c record;
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    CREATE SCHEMA leadledger_rebuild;
    FOREACH t IN ARRAY tables LOOP
        IF t = ANY (rewritten) THEN
            EXECUTE format('CREATE TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES) WITH (autovacuum_enabled = false, fillfactor = 50)', t, t);
        ELSE
            EXECUTE format('CREATE TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES) WITH (autovacuum_enabled = false)', t, t);
        END IF;
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

-- After leadledger_rebuild_swap, in its transaction: the swapped-in `tables` are ordinary
-- tables again, autovacuum's like every other, filling their pages.
CREATE OR REPLACE FUNCTION leadledger_rebuild_settle(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('ALTER TABLE public.%I RESET (autovacuum_enabled, fillfactor)', t);
    END LOOP;
END
$$;
