"""Report types of the memory profile: per segment, per model, original beside converted.

Field names are part of the public API (scripts read them): ``MemoryProfile.original`` and
``.converted``, each a :class:`MemoryBreakdown` with ``activation_bytes``, ``param_bytes``,
``grad_bytes``, ``optimizer_bytes``, ``peak_bytes`` and ``segments`` (:class:`SegmentMemory`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .._format import format_bytes, format_count, render_table

__all__ = ["SegmentMemory", "MemoryBreakdown", "MemoryProfile", "format_profile"]


@dataclass(frozen=True)
class SegmentMemory:
    """Memory of one segment of the model in a training step.

    Attributes:
        name: segment name from the audit's plan ("stem", "layer1.rev_1_2", "head").
        kind: "stored" (autograd keeps its activations), "reversible" (only its output is kept) or
            "checkpointed" (a stored part run under activation checkpointing: only its inputs are kept).
        activation_bytes: bytes saved for backward by this segment, each storage counted once,
            parameters and buffers excluded.
        transient_bytes: extra peak the segment's backward needs beyond its activations and its
            parameters' gradients: for a reversible segment, recomputing one coupling; 0 for stored.
    """

    name: str
    kind: str
    activation_bytes: int
    transient_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Memory of one training step of one model, estimated or measured.

    Attributes:
        activation_bytes: bytes saved for backward (sum over ``segments``).
        param_bytes: parameters.
        grad_bytes: parameter gradients after the backward pass.
        optimizer_bytes: optimizer state (0 without an optimizer).
        peak_bytes: the largest amount of tensor memory alive during the step, including the
            resident parameters, buffers, optimizer state and input batch.
        segments: one entry per segment, in execution order.
        buffer_bytes: buffers (norm running statistics).
        input_bytes: the input batch.
        peak_composition: what was alive at the peak, by part; the values sum to ``peak_bytes``.
        optimizer: the optimizer's name, or None.
        cuda_peak_bytes: ``torch.cuda.max_memory_allocated`` for the step, measured on CUDA only,
            counted like ``peak_bytes`` (the model's own tensors included).
        source: "estimate" (fake tensors) or "measurement" (real tensors).
        step_flops: FLOPs of the step's forward and backward (``torch.utils.flop_counter``'s
            formulas: convolutions and matmuls), the recomputations included; None if not counted.
        step_ops: kernel-launching aten ops of the step's forward and backward (views and
            allocations excluded; ``revconvert._ops``): on a GPU, the kernels the step launches,
            which set its time where kernels are short. The same on fake tensors as on real ones.
    """

    activation_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    peak_bytes: int
    segments: list[SegmentMemory]
    buffer_bytes: int = 0
    input_bytes: int = 0
    peak_composition: dict[str, int] = field(default_factory=dict)
    optimizer: str | None = None
    cuda_peak_bytes: int | None = None
    source: str = "estimate"
    step_flops: int | None = None
    step_ops: int | None = None

    def segment(self, name: str) -> SegmentMemory:
        """The segment called ``name``; ``KeyError`` lists the names there are."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r}; segments are {[s.name for s in self.segments]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain ints, strings and lists)."""
        out = dataclasses.asdict(self)
        out["segments"] = [s.to_dict() for s in self.segments]
        return out

    def __str__(self) -> str:
        rows = [(s.name, s.kind, format_bytes(s.activation_bytes),
                 format_bytes(s.transient_bytes) if s.transient_bytes else "") for s in self.segments]
        table = render_table(["segment", "kind", "activations", "transient"], rows, align="llrr")
        totals = [("activations", format_bytes(self.activation_bytes)),
                  ("parameters", format_bytes(self.param_bytes)),
                  ("gradients", format_bytes(self.grad_bytes)),
                  ("optimizer state", format_bytes(self.optimizer_bytes)),
                  ("peak", format_bytes(self.peak_bytes))]
        if self.cuda_peak_bytes is not None:
            totals.append(("peak (torch.cuda)", format_bytes(self.cuda_peak_bytes)))
        parts = [(f"  {k}", format_bytes(v)) for k, v in self.peak_composition.items() if v]
        cost = [] if self.step_flops is None else [
            ("step FLOPs", format_count(self.step_flops)), ("step kernel launches", str(self.step_ops))]
        return "\n".join([table, "", render_table(["total", self.source], totals + parts + cost)])


def _ratio(new: float, old: float) -> float | None:
    return None if old == 0 else new / old


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


@dataclass(frozen=True)
class MemoryProfile:
    """Estimated training memory of a model and of its reversible conversion, side by side.

    ``str(profile)`` is the table the command line prints, ``profile.to_dict()`` is JSON-ready and
    ``profile.plot("memory.png")`` draws it (needs ``pip install 'revconvert[plot]'``).

    Attributes:
        original: the model as given.
        converted: its conversion, or None when ``converted=False`` was asked.
        batch_size: batch size of the estimate.
        input_size: one sample's shape, e.g. (3, 224, 224).
        dtype: parameter and input dtype, e.g. "float32".
        device: device type the estimate mimics ("cpu" or "cuda").
        model_name: class name of the model.

    Example:
        >>> profile = revconvert.memory_profile(torchvision.models.resnet18(), batch_size=64)
        >>> profile.ratios["activation_bytes"]      # converted / original
    """

    original: MemoryBreakdown
    converted: MemoryBreakdown | None = None
    batch_size: int = 1
    input_size: tuple[int, ...] = (3, 224, 224)
    dtype: str = "float32"
    device: str = "cpu"
    model_name: str = ""

    @property
    def ratios(self) -> dict[str, float | None]:
        """converted / original for each total (None without a conversion or for 0 / 0)."""
        keys = ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "peak_bytes", "step_flops",
                "step_ops")
        if self.converted is None:
            return {k: None for k in keys}
        return {k: None if getattr(self.original, k) is None or getattr(self.converted, k) is None
                else _ratio(getattr(self.converted, k), getattr(self.original, k)) for k in keys}

    def rows(self) -> list[tuple[str, SegmentMemory | None, SegmentMemory | None]]:
        """Segments aligned by name: (name, original's, converted's), in execution order."""
        conv = {s.name: s for s in self.converted.segments} if self.converted else {}
        out = [(s.name, s, conv.pop(s.name, None)) for s in self.original.segments]
        out += [(name, None, s) for name, s in conv.items()]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, both breakdowns and the ratios."""
        return {
            "model": self.model_name,
            "batch_size": self.batch_size,
            "input_size": list(self.input_size),
            "dtype": self.dtype,
            "device": self.device,
            "original": self.original.to_dict(),
            "converted": None if self.converted is None else self.converted.to_dict(),
            "ratios": self.ratios,
        }

    def plot(self, path: str) -> None:
        """Draw per-segment activations and stacked totals, original vs converted, to ``path`` (PNG).

        Raises:
            ImportError: matplotlib is missing (``pip install 'revconvert[plot]'``).
        """
        from .plot import plot_profile  # lazy: matplotlib is an optional extra

        plot_profile(self, path)

    def __str__(self) -> str:
        return format_profile(self)


def format_profile(profile: MemoryProfile) -> str:
    """The text table of a :class:`MemoryProfile` (what ``revconvert memory`` prints)."""
    orig, conv = profile.original, profile.converted
    title = (f"{profile.model_name or 'model'}: batch {profile.batch_size} x "
             f"{tuple(profile.input_size)}, {profile.dtype}, optimizer {orig.optimizer or 'none'}, "
             f"{orig.source} for {profile.device}")
    if conv is None:
        return f"{title}\n\n{orig}"

    rows = []
    for name, o, c in profile.rows():
        kind = (o.kind if o else "-") + (" -> " + c.kind if c and (not o or c.kind != o.kind) else "")
        rows.append((name, kind,
                     format_bytes(o.activation_bytes) if o else "-",
                     format_bytes(c.activation_bytes) if c else "-",
                     _fmt_ratio(_ratio(c.activation_bytes, o.activation_bytes)) if o and c else "",
                     format_bytes(c.transient_bytes) if c and c.transient_bytes else ""))
    seg_table = render_table(
        ["segment", "kind", "original", "converted", "ratio", "transient"], rows, align="llrrrr")

    r = profile.ratios
    totals = []
    for label, key in (("activations", "activation_bytes"), ("parameters", "param_bytes"),
                       ("gradients", "grad_bytes"), ("optimizer state", "optimizer_bytes"),
                       ("peak", "peak_bytes")):
        totals.append((label, format_bytes(getattr(orig, key)), format_bytes(getattr(conv, key)),
                       _fmt_ratio(r[key])))
    totals.append(("peak is made of:", "", "", ""))
    for part in dict.fromkeys([*orig.peak_composition, *conv.peak_composition]):
        o, c = orig.peak_composition.get(part, 0), conv.peak_composition.get(part, 0)
        if o or c:
            totals.append((f"  {part}", format_bytes(o), format_bytes(c), _fmt_ratio(_ratio(c, o))))
    total_table = render_table(["total", "original", "converted", "ratio"], totals, align="lrrr")
    note = ("activations: bytes autograd saves for backward (each storage once, parameters excluded); "
            "transient: extra peak of a reversible segment's backward (one coupling recomputed).")
    parts = [title, "", seg_table, "", total_table]
    if orig.step_flops is not None and conv.step_flops is not None:
        cost = [("FLOPs", format_count(orig.step_flops), format_count(conv.step_flops), _fmt_ratio(r["step_flops"])),
                ("kernel launches", str(orig.step_ops), str(conv.step_ops), _fmt_ratio(r["step_ops"]))]
        parts += ["", render_table(["step cost", "original", "converted", "ratio"], cost, align="lrrr")]
        note += (" step cost: forward and backward, recomputations included; kernel launches: aten ops that "
                 "run a kernel (where kernels are short, as on GPUs at moderate batches, step time follows them).")
    return "\n".join([*parts, "", note])
