-- Each delivery's count of events per outcome, so that a source's counts (including the
-- events it refused or ignored) are a sum over its deliveries: written once with the
-- delivery, never a shared counter row that every delivery of a source would queue on.
ALTER TABLE webhook_deliveries
    ADD COLUMN applied   integer NOT NULL DEFAULT 0,
    ADD COLUMN duplicate integer NOT NULL DEFAULT 0,
    ADD COLUMN parked    integer NOT NULL DEFAULT 0,
    ADD COLUMN rejected  integer NOT NULL DEFAULT 0,
    ADD COLUMN ignored   integer NOT NULL DEFAULT 0;
