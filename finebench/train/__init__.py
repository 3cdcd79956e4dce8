"""Training engine: fit/evaluate, optimisers and schedules, distributed set-up."""
