"""The algorithm's pieces: per-family adapters, calibration activations and scores (BoundaryCache), the
concatenation merge, the output refit, and the definitions of the compression options."""
