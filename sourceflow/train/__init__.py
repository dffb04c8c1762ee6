"""Training: the accelerate loop, EMA, atomic checkpoints and the JSONL log."""
