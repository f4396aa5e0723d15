-- Secrets the server keeps in the database so that every process shares them.
CREATE TABLE server_secrets (
    name  text  PRIMARY KEY,
    value bytea NOT NULL
);

-- The key of the hash that turns a normalised email into a contact id: every process
-- derives the same id for one address (so concurrent creates meet in one stream), and the
-- id reveals nothing about the address to anyone without the key.
INSERT INTO server_secrets (name, value)
VALUES ('contact_id_key', uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()));

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- Read model `contacts` (projections/src/contacts.rs).
CREATE TABLE contacts_view (
    id             uuid        PRIMARY KEY,
    email          text        NOT NULL UNIQUE,
    first_name     text,
    last_name      text,
    company        text,
    company_domain text,
    title          text,
    phone          text,
    linkedin_url   text,
    custom         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    enrichment     jsonb,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    -- Events applied to this row: equals the aggregate's version unless something is wrong.
    version        bigint      NOT NULL,
    -- What `?q=` searches: name, company and email, lower-cased.
    search         text GENERATED ALWAYS AS (
        lower(email || ' ' || coalesce(first_name, '') || ' ' || coalesce(last_name, '') || ' '
              || coalesce(company, '') || ' ' || coalesce(company_domain, ''))
    ) STORED
);

CREATE INDEX contacts_view_created ON contacts_view (created_at DESC, id DESC);
CREATE INDEX contacts_view_search ON contacts_view USING gin (search gin_trgm_ops);
