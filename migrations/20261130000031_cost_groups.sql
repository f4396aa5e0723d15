-- Read model `costs` (projections/src/costs.rs), continued: cost, tokens and count per UTC
-- day, budget, category and model, so that a cost report adds up a few hundred kept sums
-- instead of every spend of its window. `model_key` stands for the model in the key
-- (`-` for costs without one, `m:<model>` otherwise), as a key column cannot be NULL.
CREATE TABLE cost_groups_view (
    day           date          NOT NULL,
    budget_id     uuid          NOT NULL,
    category      text          NOT NULL,
    model_key     text          NOT NULL,
    model         text,
    cost          numeric(30,6) NOT NULL,
    input_tokens  numeric       NOT NULL,
    output_tokens numeric       NOT NULL,
    requests      bigint        NOT NULL CHECK (requests > 0),
    PRIMARY KEY (day, budget_id, category, model_key)
);

INSERT INTO cost_groups_view
SELECT day, budget_id, category,
       CASE WHEN model IS NULL THEN '-' ELSE 'm:' || model END, model,
       sum(amount), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), count(*)
FROM costs_view
GROUP BY 1, 2, 3, 4, 5;
