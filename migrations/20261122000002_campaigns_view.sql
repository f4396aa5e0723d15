-- Read model `campaigns` (projections/src/campaigns.rs).
CREATE TABLE campaigns_view (
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL,
    status        text        NOT NULL,
    stop_on_reply boolean     NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    -- Events applied to this row: equals the aggregate's version unless something is wrong.
    version       bigint      NOT NULL,
    last_position bigint      NOT NULL
);

-- Newest first, paginated by (created_at, id).
CREATE INDEX campaigns_view_created ON campaigns_view (created_at DESC, id DESC);
CREATE INDEX campaigns_view_status ON campaigns_view (status, created_at DESC, id DESC);
