"""Compute-optimal planning: scaling laws, their fit, the inference-adjusted choice, a model shape and batch."""
