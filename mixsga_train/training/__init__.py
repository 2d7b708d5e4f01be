"""Training with DeepSpeed: distributed setup, the engine config, checkpoints and the loop."""
