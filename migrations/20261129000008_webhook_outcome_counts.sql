-- Each delivery's count of events per outcome, so that a source's counts (including the
-- events it refused or ignored) are a sum over its deliveries: written once with the
-- delivery, never a shared counter row that every delivery of a source would queue on.
ALTER TABLE webhook_deliveries
    ADD COLUMN applied   integer NOT NULL DEFAULT 0,
    ADD COLUMN duplicate integer NOT NULL DEFAULT 0,
    ADD COLUMN parked    integer NOT NULL DEFAULT 0,
    ADD COLUMN rejected  integer NOT NULL DEFAULT 0,
    ADD COLUMN ignored   integer NOT NULL DEFAULT 0;

-- Deliveries recorded before these columns: count their recorded results once.
UPDATE webhook_deliveries w
SET applied   = c.applied,
    duplicate = c.duplicate,
    parked    = c.parked,
    rejected  = c.rejected,
    ignored   = c.ignored
FROM (
    SELECT d.source, d.webhook_id,
           count(*) FILTER (WHERE r->>'outcome' = 'applied')   AS applied,
           count(*) FILTER (WHERE r->>'outcome' = 'duplicate') AS duplicate,
           count(*) FILTER (WHERE r->>'outcome' = 'parked')    AS parked,
           count(*) FILTER (WHERE r->>'outcome' = 'rejected')  AS rejected,
           count(*) FILTER (WHERE r->>'outcome' = 'ignored')   AS ignored
    FROM webhook_deliveries d, jsonb_array_elements(d.response->'results') r
    GROUP BY d.source, d.webhook_id
) c
WHERE w.source = c.source AND w.webhook_id = c.webhook_id;

-- A source's counts and last delivery are read by source.
CREATE INDEX webhook_deliveries_by_source ON webhook_deliveries (source, created_at);
