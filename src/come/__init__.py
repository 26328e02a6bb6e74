"""come: make causal LMs shallower by concatenation-based merging of adjacent layers (CoMe)."""

__version__ = "0.1.0"


def compress(*args, **kwargs):
    """See `come.pipeline.compress` (imported lazily: the CLI's --help stays fast)."""
    from .pipeline import compress as _compress

    return _compress(*args, **kwargs)


__all__ = ["__version__", "compress"]
