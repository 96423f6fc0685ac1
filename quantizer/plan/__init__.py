"""Plan (first stage, config.json only): memory sizes and budgets, model shapes, the memory
model of one layer, the search for decisions that fit, the plan applied to a run, the printed
plan and the time model."""
