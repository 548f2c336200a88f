"""Exceptions raised by revconvert."""

from __future__ import annotations

__all__ = ["RevConvertError", "TraceError", "ConversionError"]


class RevConvertError(Exception):
    """Base class of every error revconvert raises on purpose."""


class TraceError(RevConvertError):
    """The model could not be traced with torch.fx (or its shapes could not be propagated).

    The message names the module or operation that failed and suggests a remedy
    (``leaf_modules=...``, ``concrete_args=...``).
    """


class ConversionError(RevConvertError):
    """The model, its example input or the conversion config cannot be converted as asked."""
