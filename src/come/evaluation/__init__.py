"""Text data and measurement: calibration/evaluation tokens, perplexity, fidelity to a reference, the
offline zero-shot tasks, and `come eval`."""
