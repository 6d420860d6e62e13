"""Run infrastructure: distributed setup, checkpoints, logging and metrics."""
