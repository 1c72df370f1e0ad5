"""In-loop and offline evaluation: held-out loss per source, log-likelihood tasks, stage-aware selection."""
