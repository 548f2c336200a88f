"""revconvert: turn residual networks into reversible ones (RevNet) and know the memory it saves.

Example:
    >>> import torchvision, revconvert
    >>> model = torchvision.models.resnet18()
    >>> print(revconvert.audit(model))            # which blocks can become reversible, and why
    >>> converted = revconvert.convert(model)      # stride-1 identity blocks -> reversible couplings
    >>> print(revconvert.memory_profile(model, batch_size=64))
    >>> print(revconvert.plan_memory(model, "8GiB", batch_size=256))  # fit a batch at least FLOPs
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names and the submodule that defines each. They are imported on first access (PEP 562),
# so that ``import revconvert.cli`` answers ``revconvert --help`` without importing torch (seconds).
_EXPORTS: dict[str, str] = {
    "audit": ".analysis.audit",
    "convert": ".passes.convert",
    "memory_profile": ".memory",
    "measure_memory": ".memory",
    "plan_memory": ".memory",
    "AuditReport": ".analysis.audit",
    "BlockAudit": ".analysis.audit",
    "ConvertConfig": ".passes.convert",
    "MemoryProfile": ".memory",
    "MemoryBreakdown": ".memory",
    "MemoryPlan": ".memory",
    "ReversibleCoupling": ".runtime",
    "ReversibleSegment": ".runtime",
    "ordinary_autograd": ".runtime",
    "RevConvertError": ".errors",
    "TraceError": ".errors",
    "ConversionError": ".errors",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see
    from .analysis.audit import AuditReport, BlockAudit, audit
    from .errors import ConversionError, RevConvertError, TraceError
    from .memory import MemoryBreakdown, MemoryPlan, MemoryProfile, measure_memory, memory_profile, plan_memory
    from .passes.convert import ConvertConfig, convert
    from .runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'revconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)  # lazy: see _EXPORTS
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
