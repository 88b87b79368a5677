"""Errors graphc raises. Each names where it happened (node, op, pass) and what to do."""

from __future__ import annotations


class GraphcError(Exception):
    """Base class: every error graphc raises on bad input is one of these."""


class FrontendError(GraphcError):
    """A model could not be turned into a graphc Graph (untraceable, corrupt file, ...)."""


class UnsupportedOpError(FrontendError):
    """An op that a frontend or backend has no rule for."""


class PassError(GraphcError):
    """A pass failed, was given bad options, or left an invalid graph."""


class VerifyError(GraphcError):
    """A graph broke an IR invariant (dangling node, bad shape, changed interface)."""


class BackendError(GraphcError):
    """Lowering or building for a target failed."""


class InputError(GraphcError):
    """A compiled model or graph was called with inputs of the wrong count, shape or dtype."""


class ArtifactError(GraphcError):
    """A file is not a graphc artifact, is corrupt, or was written by an incompatible graphc."""
