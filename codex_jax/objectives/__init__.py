"""Pretraining objectives: each a pure loss over model outputs and a batch."""
