"""come: make causal LMs shallower by concatenation-based merging of adjacent layers (CoMe).

Packages: core (adapters, activations, scores, merging, refit), methods, engine (running a compression),
artifacts (plan, output folder, card, exports), evaluation, distill, cli. See docs/design.md."""

__version__ = "0.1.0"


def compress(*args, **kwargs):
    """See `come.engine.pipeline.compress` (imported lazily: the CLI's --help stays fast)."""
    from .engine.pipeline import compress as _compress

    return _compress(*args, **kwargs)


def __getattr__(name: str):
    # LoadedModel (come.engine.models) is imported on first use, for the same reason.
    if name == "LoadedModel":
        from .engine.models import LoadedModel

        return LoadedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoadedModel", "__version__", "compress"]
