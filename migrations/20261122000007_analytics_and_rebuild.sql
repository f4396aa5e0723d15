-- Read models behind the analytics routes, kept incrementally by their projections, and
-- the machinery of `leadledger projections rebuild`.

-- Read model `enrollments` (projections/src/enrollments.rs), continued: per campaign and
-- UTC day, how many enrollments reached each milestone that day (a milestone's day is the
-- day of its effective time, so a report that moves a milestone earlier moves it to its
-- new day). Days where every count is zero have no row.
CREATE TABLE campaign_days_view (
    campaign_id  uuid   NOT NULL,
    day          date   NOT NULL,
    enrolled     bigint NOT NULL DEFAULT 0 CHECK (enrolled >= 0),
    sent         bigint NOT NULL DEFAULT 0 CHECK (sent >= 0),
    delivered    bigint NOT NULL DEFAULT 0 CHECK (delivered >= 0),
    opened       bigint NOT NULL DEFAULT 0 CHECK (opened >= 0),
    clicked      bigint NOT NULL DEFAULT 0 CHECK (clicked >= 0),
    replied      bigint NOT NULL DEFAULT 0 CHECK (replied >= 0),
    bounced      bigint NOT NULL DEFAULT 0 CHECK (bounced >= 0),
    unsubscribed bigint NOT NULL DEFAULT 0 CHECK (unsubscribed >= 0),
    complained   bigint NOT NULL DEFAULT 0 CHECK (complained >= 0),
    PRIMARY KEY (campaign_id, day)
);

INSERT INTO campaign_days_view
SELECT e.campaign_id, (m.at AT TIME ZONE 'UTC')::date,
       count(*) FILTER (WHERE m.k = 'enrolled'), count(*) FILTER (WHERE m.k = 'sent'),
       count(*) FILTER (WHERE m.k = 'delivered'), count(*) FILTER (WHERE m.k = 'opened'),
       count(*) FILTER (WHERE m.k = 'clicked'), count(*) FILTER (WHERE m.k = 'replied'),
       count(*) FILTER (WHERE m.k = 'bounced'), count(*) FILTER (WHERE m.k = 'unsubscribed'),
       count(*) FILTER (WHERE m.k = 'complained')
FROM enrollments_view e
CROSS JOIN LATERAL (VALUES ('enrolled', e.enrolled_at), ('sent', e.sent_at),
    ('delivered', e.delivered_at), ('opened', e.opened_at), ('clicked', e.clicked_at),
    ('replied', e.replied_at), ('bounced', e.bounced_at), ('unsubscribed', e.unsubscribed_at),
    ('complained', e.complained_at)) AS m(k, at)
WHERE m.at IS NOT NULL
GROUP BY 1, 2;

-- Read model `contacts` (projections/src/contacts.rs), continued: how many contacts exist
-- (one row, present once there is a contact), so the dashboard does not count them.
CREATE TABLE contact_totals_view (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    contacts  bigint  NOT NULL CHECK (contacts >= 0)
);

INSERT INTO contact_totals_view (singleton, contacts)
SELECT true, count(*) FROM contacts_view HAVING count(*) > 0;

-- Read model `costs` (projections/src/costs.rs), continued: cost and count per UTC day.
CREATE TABLE cost_days_view (
    day      date          PRIMARY KEY,
    cost     numeric(30,6) NOT NULL,
    requests bigint        NOT NULL CHECK (requests > 0)
);

INSERT INTO cost_days_view (day, cost, requests)
SELECT day, sum(amount), count(*) FROM costs_view GROUP BY day;

-- The dashboard's "top campaigns by reply rate" reads the campaigns that delivered mail.
CREATE INDEX campaign_metrics_view_delivered ON campaign_metrics_view (campaign_id) WHERE delivered > 0;

-- A rebuild in progress (at most one at a time): which projections, how far it has read,
-- and the migration its tables were made for. A rebuild interrupted resumes from here.
CREATE TABLE projection_rebuilds (
    singleton      boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    projections    text[]      NOT NULL,
    migration      bigint      NOT NULL,
    transaction_id xid8        NOT NULL DEFAULT '0'::xid8,
    position       bigint      NOT NULL DEFAULT 0,
    events         bigint      NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The rebuild builds into schema `leadledger_rebuild`: empty copies of the live tables
-- (columns, defaults, checks, primary and unique keys), filled by the same projection code
-- with `search_path` pointing there first. The other indexes are made once the copies are
-- filled (leadledger_rebuild_index), which is much cheaper than keeping them up to date row
-- by row. Table names come from the projections' own lists; `%I` quotes them as
-- identifiers, and the key and index definitions are PostgreSQL's own rendering.
CREATE FUNCTION leadledger_rebuild_prepare(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    c record;
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    CREATE SCHEMA leadledger_rebuild;
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('CREATE TABLE leadledger_rebuild.%I (LIKE public.%I INCLUDING ALL EXCLUDING INDEXES)', t, t);
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

-- Makes, on the rebuilt tables, every index of the live ones that no key constraint made
-- and that is not there yet.
CREATE FUNCTION leadledger_rebuild_index(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    ix record;
BEGIN
    FOR ix IN
        SELECT c.relname, pg_get_indexdef(i.indexrelid) AS definition, t.relname AS tbl
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = 'public' AND t.relname = ANY(tables)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_indexes r
                          WHERE r.schemaname = 'leadledger_rebuild' AND r.indexname = c.relname)
    LOOP
        EXECUTE regexp_replace(ix.definition, ' ON public\.', ' ON leadledger_rebuild.');
    END LOOP;
END
$$;

CREATE FUNCTION leadledger_rebuild_discard() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP SCHEMA IF EXISTS leadledger_rebuild CASCADE;
    DELETE FROM projection_rebuilds;
END
$$;

-- Whether the rebuild schema holds every one of `tables`.
CREATE FUNCTION leadledger_rebuild_ready(tables text[]) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT count(*) = cardinality(tables)
    FROM pg_tables WHERE schemaname = 'leadledger_rebuild' AND tablename = ANY(tables)
$$;

-- Rows of `tbl` that differ between the live table and the rebuilt one, keyed by the
-- primary key: a row missing on one side has NULL there.
CREATE FUNCTION leadledger_rebuild_diff(tbl text)
RETURNS TABLE (key jsonb, live jsonb, rebuilt jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    key_columns text[];
BEGIN
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO key_columns
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = format('public.%I', tbl)::regclass AND i.indisprimary;
    RETURN QUERY EXECUTE format(
        'WITH l AS (SELECT to_jsonb(t) AS j FROM public.%1$I t),
              r AS (SELECT to_jsonb(t) AS j FROM leadledger_rebuild.%1$I t),
              lk AS (SELECT (SELECT jsonb_object_agg(c, l.j -> c) FROM unnest($1) c) AS k, l.j FROM l),
              rk AS (SELECT (SELECT jsonb_object_agg(c, r.j -> c) FROM unnest($1) c) AS k, r.j FROM r)
         SELECT coalesce(lk.k, rk.k), lk.j, rk.j
         FROM lk FULL JOIN rk ON lk.k = rk.k
         WHERE lk.j IS DISTINCT FROM rk.j
         ORDER BY 1', tbl)
    USING key_columns;
END
$$;

-- Puts the rebuilt tables in place of the live ones, in the caller's transaction: readers
-- see the old tables or the new ones, never a mix. The new tables' indexes and
-- constraints take the old ones' names, so later migrations find what they expect.
CREATE FUNCTION leadledger_rebuild_swap(tables text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    ix record;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', t);
    END LOOP;
    DROP SCHEMA IF EXISTS leadledger_retired CASCADE;
    CREATE SCHEMA leadledger_retired;
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('ALTER TABLE public.%I SET SCHEMA leadledger_retired', t);
        EXECUTE format('ALTER TABLE leadledger_rebuild.%I SET SCHEMA public', t);
        -- Two steps, so that no new name collides with a name not yet moved away.
        FOR ix IN
            SELECT n.oid, 'leadledger_rebuild_' || n.oid::text AS temporary
            FROM pg_index ni JOIN pg_class n ON n.oid = ni.indexrelid
            WHERE ni.indrelid = format('public.%I', t)::regclass
        LOOP
            EXECUTE format('ALTER INDEX public.%I RENAME TO %I',
                (SELECT relname FROM pg_class WHERE oid = ix.oid), ix.temporary);
        END LOOP;
        FOR ix IN
            SELECT n.relname AS new_name, o.relname AS old_name
            FROM pg_index ni JOIN pg_class n ON n.oid = ni.indexrelid
            JOIN pg_index oi ON oi.indrelid = format('leadledger_retired.%I', t)::regclass
            JOIN pg_class o ON o.oid = oi.indexrelid
            WHERE ni.indrelid = format('public.%I', t)::regclass
              AND ni.indisunique = oi.indisunique AND ni.indisprimary = oi.indisprimary
              AND substring(pg_get_indexdef(ni.indexrelid) FROM ' USING .*$')
                = substring(pg_get_indexdef(oi.indexrelid) FROM ' USING .*$')
        LOOP
            EXECUTE format('ALTER INDEX public.%I RENAME TO %I', ix.new_name, ix.old_name);
        END LOOP;
    END LOOP;
    DROP SCHEMA leadledger_retired CASCADE;
    DROP SCHEMA leadledger_rebuild CASCADE;
    DELETE FROM projection_rebuilds;
END
$$;
