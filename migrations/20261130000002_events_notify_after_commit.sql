-- Projection runners are woken after commit by the writing process (one coalesced NOTIFY
-- in a transaction of its own), not by a trigger inside every write transaction: a
-- transaction that notified takes PostgreSQL's notification queue lock at commit, which
-- serialised every commit behind it.
DROP TRIGGER events_notify ON events;
DROP FUNCTION events_notify();
