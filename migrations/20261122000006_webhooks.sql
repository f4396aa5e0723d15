-- Webhook sources, deliveries, provider event ids and parked events.

-- A source's secret is kept encrypted (src/secrets.rs): it must be usable to verify
-- signatures, but the database alone does not reveal it.
CREATE TABLE webhook_sources (
    name              text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    secret_nonce      bytea       NOT NULL,
    secret_ciphertext bytea       NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- The response to each delivery, so a repeated delivery (same webhook-id) gets it again.
CREATE TABLE webhook_deliveries (
    source       text        NOT NULL,
    webhook_id   text        NOT NULL,
    request_hash bytea       NOT NULL,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, webhook_id)
);

-- Every provider event id a source delivered: a second delivery of one is a duplicate,
-- decided in the transaction that applies or parks the first.
CREATE TABLE webhook_event_ids (
    source   text NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (source, event_id)
);

-- Events for enrollments that did not exist yet. Every lookup is by an index: by
-- enrollment (when one is created), by due time (retries), by age (lists).
CREATE TABLE webhook_parked (
    id               uuid        PRIMARY KEY,
    source           text        NOT NULL,
    event_id         text        NOT NULL,
    enrollment_id    uuid        NOT NULL,
    campaign_id      uuid,
    kind             text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    last_error       text,
    dead_lettered_at timestamptz
);

CREATE INDEX webhook_parked_enrollment ON webhook_parked (enrollment_id) WHERE dead_lettered_at IS NULL;
CREATE INDEX webhook_parked_due ON webhook_parked (next_attempt_at) WHERE dead_lettered_at IS NULL;
CREATE INDEX webhook_parked_waiting ON webhook_parked (received_at, id) WHERE dead_lettered_at IS NULL;
CREATE INDEX webhook_parked_dead ON webhook_parked (dead_lettered_at, id) WHERE dead_lettered_at IS NOT NULL;
