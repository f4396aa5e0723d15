-- The event store: every change to every aggregate, in one append-only table.

CREATE TABLE events (
    -- Global position: assigned at insert, so it is NOT commit order on its own.
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. The feed reads only transactions older than every running
    -- one (pg_snapshot_xmin), in (transaction_id, position) order: commit-safe, no gaps.
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence > 0),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers of one sequence, one wins.
    CONSTRAINT events_stream_sequence UNIQUE (aggregate_type, aggregate_id, sequence)
);

CREATE INDEX events_feed ON events (transaction_id, position);

-- Wakes projection runners at commit (NOTIFY is delivered only if the transaction commits).
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('leadledger_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- The latest snapshot of each aggregate, written in the transaction of the events it covers.
CREATE TABLE snapshots (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    last_sequence  bigint      NOT NULL,
    -- Where the last covered event stands in the feed (for read-your-writes tokens).
    last_position  bigint      NOT NULL,
    last_transaction_id xid8   NOT NULL,
    payload        jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- API keys: only a SHA-256 of the key is kept; keys are 256-bit random, so no stretching.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    scope        text        NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    key_hash     bytea       NOT NULL UNIQUE,
    prefix       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- Idempotency records, committed in the same transaction as the events they guard.
CREATE TABLE idempotency_records (
    api_key_id      uuid        NOT NULL REFERENCES api_keys (id),
    idempotency_key text        NOT NULL,
    request_hash    bytea       NOT NULL,
    response_status smallint    NOT NULL,
    response_body   bytea       NOT NULL,
    response_headers jsonb      NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, idempotency_key)
);

CREATE INDEX idempotency_records_created_at ON idempotency_records (created_at);

-- Where each projection is in the feed, and whether it is stopped at a failing event.
CREATE TABLE projection_checkpoints (
    name            text        PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT '0'::xid8,
    position        bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    failed_position bigint,
    failed_error    text,
    failed_at       timestamptz
);
