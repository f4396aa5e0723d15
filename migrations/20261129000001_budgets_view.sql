-- Read model `budgets`: every budget by creation, behind `GET /v1/budgets` and the budget
-- names of `GET /v1/analytics/costs?group_by=budget` (projections/src/budgets.rs). A
-- budget's name never changes, so the row is written once.
CREATE TABLE budgets_view (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL,
    -- The position of the creating event: the list's order and its cursor.
    position   bigint      NOT NULL UNIQUE
);
