"""Training: the one loop, its schedule, checkpoints, logging, memory estimates, distribution."""
