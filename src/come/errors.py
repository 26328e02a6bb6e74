"""User-facing errors: the CLI prints one line for each and exits non-zero."""

from __future__ import annotations


class ComeError(Exception):
    """Base class of every error whose message is meant for the user as is."""


class InvalidTarget(ComeError, ValueError):
    pass


class ModelLoadError(ComeError):
    pass


class NonFiniteActivations(ComeError):
    pass


class MergeError(ComeError):
    pass


class OutputExists(ComeError):
    pass
