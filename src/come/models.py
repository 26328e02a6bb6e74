"""Compatibility: `from come.models import LoadedModel` keeps working. Model loading lives in
come.engine.models; new code imports `LoadedModel` from `come`."""

from .engine.models import LoadedModel

__all__ = ["LoadedModel"]
