"""Training: the Trainer and what a run writes (checkpoints, metrics.csv, TensorBoard events, loss plots)."""
