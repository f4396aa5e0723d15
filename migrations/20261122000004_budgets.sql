-- Read models of budgets: every cost recorded (projections/src/costs.rs) and the holds
-- still open (projections/src/budget_holds.rs).

-- Read model `costs`: one row per spend and per captured reservation, behind
-- `GET /v1/analytics/costs` and `leadledger analytics costs`.
CREATE TABLE costs_view (
    -- The spend's id, or the captured reservation's id.
    id            uuid          PRIMARY KEY,
    kind          text          NOT NULL CHECK (kind IN ('spend', 'capture')),
    budget_id     uuid          NOT NULL,
    category      text          NOT NULL,
    model         text,
    input_tokens  bigint        CHECK (input_tokens >= 0),
    output_tokens bigint        CHECK (output_tokens >= 0),
    amount        numeric(20,6) NOT NULL CHECK (amount > 0),
    spent_at      timestamptz   NOT NULL,
    -- The UTC day of `spent_at`, decided by the projection from the event alone.
    day           date          NOT NULL,
    position      bigint        NOT NULL
);

-- Every report reads a window of days.
CREATE INDEX costs_view_day ON costs_view (day);

-- Read model `budget_holds`: reservations neither captured, released nor expired, for
-- the worker that expires them.
CREATE TABLE budget_holds_view (
    reservation_id uuid          PRIMARY KEY,
    budget_id      uuid          NOT NULL,
    amount         numeric(20,6) NOT NULL CHECK (amount > 0),
    expires_at     timestamptz   NOT NULL,
    position       bigint        NOT NULL
);

-- The expiry worker asks for the holds due by now, oldest first.
CREATE INDEX budget_holds_view_expires ON budget_holds_view (expires_at);
