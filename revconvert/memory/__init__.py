"""Training memory of a model and of its reversible conversion: estimated before, measured after.

- :func:`memory_profile` estimates one training step on fake tensors (no activation memory), for the
  model and its conversion side by side, segment by segment.
- :func:`measure_memory` measures the same quantities on a real step (CPU or CUDA).
- :func:`plan_memory` chooses, part by part, the conversion whose step fits a memory budget at the
  least FLOPs (:class:`MemoryPlan`).

Both return the report types of :mod:`revconvert.memory.report`.

Example:
    >>> import torchvision, revconvert
    >>> print(revconvert.memory_profile(torchvision.models.resnet18(), batch_size=64))
"""

from __future__ import annotations

from .estimate import memory_profile
from .measure import measure_memory
from .plan import plan_memory
from .plan_report import MemoryPlan, PlanPart
from .report import MemoryBreakdown, MemoryProfile, SegmentMemory, format_profile

__all__ = ["memory_profile", "measure_memory", "plan_memory", "MemoryPlan", "PlanPart", "MemoryProfile", "MemoryBreakdown", "SegmentMemory",
           "format_profile"]
