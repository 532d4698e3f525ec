"""The shared engine: train state, sharding, checkpoints, logging, the train and eval loops."""
