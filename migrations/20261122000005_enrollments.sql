-- Read model `enrollments` (projections/src/enrollments.rs): each enrollment with its
-- effective milestone times and status, and per campaign the number of enrollments that
-- reached each milestone (kept incrementally: a milestone once reached stays reached).

CREATE TABLE enrollments_view (
    id                uuid        PRIMARY KEY,
    campaign_id       uuid        NOT NULL,
    contact_id        uuid        NOT NULL,
    status            text        NOT NULL,
    stop_on_reply     boolean     NOT NULL,
    enrolled_at       timestamptz NOT NULL,
    sent_at           timestamptz,
    delivered_at      timestamptz,
    opened_at         timestamptz,
    clicked_at        timestamptz,
    replied_at        timestamptz,
    bounced_at        timestamptz,
    unsubscribed_at   timestamptz,
    complained_at     timestamptz,
    sequence_ended_at timestamptz,
    version           bigint      NOT NULL
);

CREATE INDEX enrollments_view_campaign ON enrollments_view (campaign_id, enrolled_at DESC, id DESC);
CREATE INDEX enrollments_view_campaign_status ON enrollments_view (campaign_id, status, enrolled_at DESC, id DESC);

CREATE TABLE campaign_metrics_view (
    campaign_id  uuid   PRIMARY KEY,
    enrolled     bigint NOT NULL DEFAULT 0,
    sent         bigint NOT NULL DEFAULT 0,
    delivered    bigint NOT NULL DEFAULT 0,
    opened       bigint NOT NULL DEFAULT 0,
    clicked      bigint NOT NULL DEFAULT 0,
    replied      bigint NOT NULL DEFAULT 0,
    bounced      bigint NOT NULL DEFAULT 0,
    unsubscribed bigint NOT NULL DEFAULT 0,
    complained   bigint NOT NULL DEFAULT 0
);
