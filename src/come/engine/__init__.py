"""Running a compression: compress(), the execution backends (in memory, layer-wise), model loading and
the options a run resolves."""
