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

from .errors import ConversionError, RevConvertError, TraceError
from .analysis.audit import AuditReport, BlockAudit, audit
from .runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd
from .passes.convert import ConvertConfig, convert
from .memory import MemoryBreakdown, MemoryPlan, MemoryProfile, measure_memory, memory_profile, plan_memory

__all__ = [
    "audit",
    "convert",
    "memory_profile",
    "measure_memory",
    "plan_memory",
    "AuditReport",
    "BlockAudit",
    "ConvertConfig",
    "MemoryProfile",
    "MemoryBreakdown",
    "MemoryPlan",
    "ReversibleCoupling",
    "ReversibleSegment",
    "ordinary_autograd",
    "RevConvertError",
    "TraceError",
    "ConversionError",
]

__version__ = "0.1.0"
