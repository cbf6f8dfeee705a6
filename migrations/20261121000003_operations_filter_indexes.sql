-- Filters that combine what with outcome, or who with outcome, on a large log:
-- without these the planner walks the primary key backwards and reads every row
-- when the pair is rare (measured in bench/operations_log.sh: 317 ms → 0.06 ms).
CREATE INDEX operations_kind_outcome_id ON operations (kind, outcome, id);
CREATE INDEX operations_actor_outcome_id ON operations (actor_name, outcome, id);
