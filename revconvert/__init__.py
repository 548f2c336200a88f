"""revconvert: turn residual networks into reversible ones (RevNet) and know the memory it saves.

Example:
    >>> import torchvision, revconvert
    >>> model = torchvision.models.resnet18()
    >>> print(revconvert.audit(model))            # which blocks can become reversible, and why
    >>> converted = revconvert.convert(model)      # stride-1 identity blocks -> reversible couplings
    >>> print(revconvert.memory_profile(model, batch_size=64))
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names and the submodule that defines each. They are imported on first access (PEP 562),
# so that ``import revconvert.cli`` answers ``revconvert --help`` without importing torch (seconds).
_EXPORTS: dict[str, str] = {
    "audit": ".audit",
    "convert": ".convert",
    "memory_profile": ".memory",
    "measure_memory": ".memory",
    "AuditReport": ".audit",
    "BlockAudit": ".audit",
    "ConvertConfig": ".convert",
    "MemoryProfile": ".memory",
    "MemoryBreakdown": ".memory",
    "ReversibleCoupling": ".runtime",
    "ReversibleSegment": ".runtime",
    "ordinary_autograd": ".runtime",
    "RevConvertError": ".errors",
    "TraceError": ".errors",
    "ConversionError": ".errors",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see
    from .audit import AuditReport, BlockAudit, audit
    from .convert import ConvertConfig, convert
    from .errors import ConversionError, RevConvertError, TraceError
    from .memory import MemoryBreakdown, MemoryProfile, measure_memory, memory_profile
    from .runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd


class _Package(types.ModuleType):
    """``revconvert.audit`` and ``revconvert.convert`` are functions, though submodules share their names.

    Importing a submodule sets it as an attribute of its package; eager imports used to overwrite it
    with the function right after. Imports are lazy now, so the package refuses that assignment for
    the names whose public meaning is a function (``sys.modules`` still holds the submodules).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and _EXPORTS[name] == "." + name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'revconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
