-- Outbound event subscriptions: their configuration and delivery state, their signing
-- secrets (sealed), the log of delivery attempts, and the circuit breaker of each host.
-- Operational state, not events: a checkpoint moves on every delivery.
CREATE TABLE subscriptions (
    id               uuid PRIMARY KEY,
    -- The advisory lock that lets one process at a time deliver this subscription.
    lock_key         serial NOT NULL UNIQUE,
    url              text NOT NULL,
    event_types      text[] NOT NULL,
    description      text,
    status           text NOT NULL CHECK (status IN ('active', 'paused', 'disabled')),
    disabled_reason  text,
    -- The checkpoint: the last event delivered or passed over (feed order).
    transaction_id   xid8 NOT NULL DEFAULT '0',
    position         bigint NOT NULL DEFAULT 0,
    -- Failed attempts at the event after the checkpoint, and when the next one is due.
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_success_at  timestamptz,
    last_failure_at  timestamptz,
    -- Bumped by every change an operator makes (update, replay): a delivery that read an
    -- older revision does not write over it.
    revision         bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscription_secrets (
    id               bigserial PRIMARY KEY,
    subscription_id  uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    secret_nonce     bytea NOT NULL,
    secret_ciphertext bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- A rotated-out secret keeps signing until then; NULL: current.
    expires_at       timestamptz
);
CREATE INDEX subscription_secrets_by_subscription ON subscription_secrets (subscription_id);

CREATE TABLE subscription_deliveries (
    id               bigserial PRIMARY KEY,
    subscription_id  uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    message_id       text NOT NULL,
    event_type       text NOT NULL,
    attempt          integer NOT NULL,
    status_code      integer,
    error            text,
    latency_ms       bigint NOT NULL,
    attempted_at     timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz
);
CREATE INDEX subscription_deliveries_by_subscription
    ON subscription_deliveries (subscription_id, id DESC);
CREATE INDEX subscription_deliveries_by_time ON subscription_deliveries (attempted_at);

CREATE TABLE outbound_breakers (
    host             text PRIMARY KEY,
    state            text NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    failures         integer NOT NULL DEFAULT 0,
    opened_at        timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
