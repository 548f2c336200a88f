"""The report of :func:`revconvert.plan_memory`: a memory plan, what each part does, and its price.

A :class:`MemoryPlan` carries the :class:`~revconvert.ConvertConfig` that realises it, the
estimated peak of the training step (verified with one fake-tensor estimate of that very config),
and the step's FLOPs over the original model's. ``str(plan)`` is a table, ``plan.to_dict()`` is
JSON-ready, and :func:`config_from_dict` turns the ``"config"`` entry back into a ``ConvertConfig``
(what ``revconvert convert MODEL --plan plan.json`` does).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._format import format_bytes, render_table
from ..passes.convert import ConvertConfig

__all__ = ["MemoryPlan", "PlanPart", "parse_bytes", "config_from_dict", "config_to_dict"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"24GiB"``, ``"1.5 GB"`` or ``"800MiB"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be bytes or a string like '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"cannot read memory size {value!r}; use bytes or a number with a unit "
                             f"such as '24GiB', '1.5GB' or '800MiB'")
        size = float(match.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"a memory size must be bytes or a string like '24GiB', got {value!r}")
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return int(size)


@dataclass(frozen=True)
class PlanPart:
    """What the plan does with one part of the model.

    Attributes:
        name: the part: ``stem``, a stored block (``layer2.0``), a run of eligible blocks
            (``layer3.rev_1_5``) or ``head``.
        blocks: the residual blocks in it.
        decision: ``stored``, ``checkpointed``, ``checkpointed in two halves``, ``reversible`` or
            ``reversible, last k of n keep``.
        saved_bytes: bytes it saves for the backward under the plan (verified estimate).
        original_saved_bytes: bytes it saves in the original model.
        extra_flops: training-step FLOPs the decision adds, as a fraction of the original step.
    """

    name: str
    blocks: tuple[str, ...]
    decision: str
    saved_bytes: int
    original_saved_bytes: int
    extra_flops: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryPlan:
    """A conversion chosen to fit one training step into a memory budget at the least FLOPs.

    "Peak" is the peak of what the step allocates beyond the parameters: activations, gradients,
    optimizer state and step, transients, plus the input batch and buffers (``measure_memory``'s
    ``peak_bytes - param_bytes``).

    Attributes:
        config: the ``ConvertConfig`` that realises the plan: ``convert(model, example, config=...)``.
        budget_bytes: the budget asked for.
        peak_bytes: estimated peak of the planned model's step (one fake-tensor step of ``config``).
        original_peak_bytes: the same for the original model.
        flops: FLOPs of the planned model's step (forward + backward, counted on meta tensors).
        original_flops: FLOPs of the original model's step.
        model_peak_bytes: the planner's composed estimate of ``peak_bytes``, before the check.
        ops, original_ops: kernel-launching aten ops of the planned and the original model's step
            (``MemoryBreakdown.step_ops``, from the plan's check): what the step's time follows
            where kernels are short (a GPU at moderate batches), which FLOPs do not show.
        parts: one row per part of the model, in execution order.
        batch_size, input_size, dtype, optimizer, model_name: what was planned for.
    """

    config: ConvertConfig
    budget_bytes: int
    peak_bytes: int
    original_peak_bytes: int
    flops: int
    original_flops: int
    model_peak_bytes: int
    parts: list[PlanPart] = field(default_factory=list)
    batch_size: int = 1
    input_size: tuple[int, ...] = ()
    dtype: str = "float32"
    optimizer: str | None = None
    model_name: str = ""
    ops: int | None = None
    original_ops: int | None = None

    @property
    def fits(self) -> bool:
        """Whether the estimated peak is within the budget."""
        return self.peak_bytes <= self.budget_bytes

    @property
    def flops_ratio(self) -> float:
        """Step FLOPs of the plan over those of the original model."""
        return self.flops / self.original_flops if self.original_flops else 1.0

    @property
    def ops_ratio(self) -> float | None:
        """Kernel launches of the plan's step over the original's (None if not counted)."""
        return self.ops / self.original_ops if self.ops is not None and self.original_ops else None

    @property
    def peak_ratio(self) -> float:
        """Estimated peak of the plan over that of the original model."""
        return self.peak_bytes / self.original_peak_bytes if self.original_peak_bytes else 1.0

    def __str__(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit (no plan found fits; this one has the least peak)"
        head = (f"{self.model_name}: batch {self.batch_size} x {tuple(self.input_size)}, {self.dtype}, "
                f"optimizer {self.optimizer or 'none'}; budget {format_bytes(self.budget_bytes)}\n"
                f"plan peak {format_bytes(self.peak_bytes)} ({self.peak_ratio:.2f}x the original's "
                f"{format_bytes(self.original_peak_bytes)}): {verdict}; step FLOPs {self.flops_ratio:.3f}x "
                f"the original's"
                f"{'' if self.ops_ratio is None else f', kernel launches {self.ops_ratio:.2f}x'}"
                f"{'; couplings of two blocks each (pair_blocks)' if self.config.pair_blocks else ''}")
        rows = [(p.name, p.decision, format_bytes(p.original_saved_bytes), format_bytes(p.saved_bytes),
                 f"{p.extra_flops:+.3f}") for p in self.parts]
        table = render_table(("part", "decision", "saved (original)", "saved (plan)", "extra FLOPs"), rows,
                             align="llrrr")
        return f"{head}\n\n{table}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "batch_size": self.batch_size, "input_size": list(self.input_size),
            "dtype": self.dtype, "optimizer": self.optimizer, "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes, "original_peak_bytes": self.original_peak_bytes,
            "model_peak_bytes": self.model_peak_bytes, "fits": self.fits, "flops": self.flops,
            "original_flops": self.original_flops, "flops_ratio": self.flops_ratio,
            "ops": self.ops, "original_ops": self.original_ops, "ops_ratio": self.ops_ratio,
            "config": config_to_dict(self.config), "parts": [p.to_dict() for p in self.parts],
        }


def config_to_dict(config: ConvertConfig) -> dict[str, Any]:
    """The plan-relevant fields of a ``ConvertConfig`` as JSON (lists for tuples)."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v
    return {"only": plain(config.only), "checkpoint_stored": plain(config.checkpoint_stored),
            "keep": config.keep, "keep_blocks": plain(config.keep_blocks),
            "checkpoint_split": plain(config.checkpoint_split), "pair_blocks": config.pair_blocks}


def config_from_dict(data: Mapping[str, Any]) -> ConvertConfig:
    """A ``ConvertConfig`` from :func:`config_to_dict`'s output, or from a whole plan's ``to_dict()``.

    Raises:
        ValueError: the mapping has no plan configuration in it.
    """
    data = data.get("config", data)
    known = {"only", "checkpoint_stored", "keep", "keep_blocks", "checkpoint_split", "pair_blocks"}
    if not isinstance(data, Mapping) or not set(data) & known:
        raise ValueError("not a revconvert plan: expected a 'config' entry with only / checkpoint_stored / "
                         "keep_blocks (write one with `revconvert plan MODEL --memory ... -o plan.json`)")
    def tup(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v
    return ConvertConfig(**{k: tup(v) for k, v in data.items() if k in known})
