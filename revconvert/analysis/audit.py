"""Audit: which residual blocks can become reversible, why the others cannot, and the segment plan.

Stages, each visible: trace (:mod:`revconvert.tracing`) -> find (:mod:`revconvert.graph`) ->
decide (:mod:`revconvert.rules`) -> plan (maximal runs of consecutive reversible blocks, and the
stored code between them). :func:`analyze` returns all of it for the conversion and the memory
profile; :func:`audit` is the public, read-only view.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .._format import format_count, render_table
from ..runtime import ReversibleSegment
from ..runtime.checkpoint import CheckpointedRun
from .channels import param_expressions
from .graph import ResidualBlock, find_residual_blocks
from .rules import BlockContext, Violation, check_block
from .tracing import model_name, tensor_shape, trace

__all__ = ["audit", "analyze", "AuditReport", "BlockAudit", "SegmentPlan", "Analysis"]


@dataclass(frozen=True)
class BlockAudit:
    """The verdict on one residual block.

    Attributes:
        name: qualified name of the module owning the block (``layer3.7``) or the join node's name.
        reversible: whether the block can become a reversible coupling.
        reason: stable reason code of the first rule it breaks (``projection-shortcut``, ...), or None.
        message: that rule's sentence, with details.
        reasons: codes of every rule it breaks.
        input_shape / output_shape: tensor shapes at the block's input and output.
        params: parameters of the block's layers.
        shortcut: ``"identity"`` or ``"projection"``.
        post_op: the activation applied after the addition (``ReLU``), or None.
        segment: name of the segment the block belongs to in the plan.
        selected: False when the block is eligible but excluded by the conversion config.
    """

    name: str
    reversible: bool
    reason: str | None
    message: str | None
    reasons: tuple[str, ...]
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    shortcut: str
    post_op: str | None
    segment: str
    selected: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SegmentPlan:
    """One segment of the planned layout.

    Attributes:
        name: ``stem``, ``head``, a stored block's name (``layer2.0``), or the qualified name the
            reversible run gets in the converted model (``layer3.rev_1_5``).
        kind: ``"stored"`` (activations kept) or ``"reversible"`` (recomputed in backward).
        blocks: residual blocks in it.
        converted: True when the model already runs this segment as a ``ReversibleSegment``.
        checkpointed: True when the model runs this stored segment as a ``CheckpointedRun``
            (its activations are recomputed in backward; the blocks inside it are not audited).
    """

    name: str
    kind: str
    blocks: tuple[str, ...] = ()
    converted: bool = False
    checkpointed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditReport:
    """Block-by-block verdicts and the segment plan of a model; ``str(report)`` is a table."""

    model: str
    input_shape: tuple[int, ...] | None
    blocks: list[BlockAudit]
    segments: list[SegmentPlan]
    params: int

    @property
    def reversible_blocks(self) -> list[BlockAudit]:
        return [b for b in self.blocks if b.reversible]

    @property
    def reason_counts(self) -> dict[str, int]:
        return dict(collections.Counter(b.reason for b in self.blocks if b.reason))

    @property
    def converted_segments(self) -> list[SegmentPlan]:
        return [s for s in self.segments if s.converted]

    def summary(self) -> str:
        if not self.blocks and not self.converted_segments:
            return f"{self.model}: no residual blocks found (nothing can become reversible)"
        n, r = len(self.blocks), len(self.reversible_blocks)
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reason_counts.items()))
        line = f"{self.model}: {n} residual blocks, {r} reversible, {n - r} stored" + (f" ({why})" if why else "")
        runs = [s for s in self.segments if s.kind == "reversible"]
        if runs:
            line += f"; {len(runs)} reversible segment(s)"
        conv = self.converted_segments
        if conv:
            line += f", {len(conv)} already converted"
        checkpointed = [s for s in self.segments if s.checkpointed]
        if checkpointed:
            line += f"; {len(checkpointed)} stored part(s) under activation checkpointing"
        return line

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.blocks:
            rows = []
            for b in self.blocks:
                verdict = "reversible" if b.reversible else f"stored: {b.reason}"
                if b.reversible and not b.selected:
                    verdict = "reversible (not selected)"
                rows.append((b.name, "x".join(map(str, b.input_shape or ())),
                             format_count(b.params), b.shortcut, verdict, b.segment))
            lines += ["", render_table(("block", "input", "params", "shortcut", "verdict", "segment"),
                                       rows, align="lrrlll")]
            notes = sorted({(b.reason, b.message) for b in self.blocks if b.reason})
            if notes:
                lines += ["", "Why blocks stay stored:"]
                lines += [f"  {code}: {msg}" for code, msg in notes]
        if self.segments:
            seg = ", ".join(f"{s.name} [{s.kind}{', converted' if s.converted else ''}"
                            f"{', checkpointed' if s.checkpointed else ''}]" for s in self.segments)
            lines += ["", f"Segments: {seg}"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "params": self.params,
            "num_blocks": len(self.blocks),
            "num_reversible": len(self.reversible_blocks),
            "reasons": self.reason_counts,
            "blocks": [b.to_dict() for b in self.blocks],
            "segments": [s.to_dict() for s in self.segments],
        }


@dataclass
class Analysis:
    """Everything the conversion and the memory profile need from one trace.

    Attributes:
        graph_module: the traced graph (shares submodules with the model: read-only).
        report: the audit report.
        blocks: the residual blocks found, by name.
        violations: rules each block breaks, by block name.
        runs: reversible segment name -> the blocks it is made of, in order.
        node_segment: fx node name -> segment name, for every node.
    """

    graph_module: fx.GraphModule
    report: AuditReport
    blocks: dict[str, ResidualBlock]
    violations: dict[str, list[Violation]]
    runs: dict[str, list[ResidualBlock]] = field(default_factory=dict)
    node_segment: dict[str, str] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)  # eligible block -> the dimension it splits


def _block_params(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    seen: dict[int, int] = {}
    for node in nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                seen[id(p)] = p.numel()
        elif node.op == "get_attr":
            obj = gm
            for atom in str(node.target).split("."):
                obj = getattr(obj, atom)
            if isinstance(obj, nn.Parameter):
                seen[id(obj)] = obj.numel()
    return sum(seen.values())


def _continues(prev: ResidualBlock, block: ResidualBlock, nodes: dict[str, fx.Node]) -> bool:
    """``block`` extends a run ending at ``prev``: it reads prev's output and nothing else does."""
    if block.fork != prev.output:
        return False
    return all(u.name in block.nodes for u in nodes[prev.output].users)


def _run_name(blocks: list[ResidualBlock], index: int, taken: set[str]) -> str:
    parents, leaves = set(), []
    for b in blocks:
        parent, _, leaf = b.name.rpartition(".")
        parents.add(parent)
        leaves.append(leaf)
    if len(parents) == 1 and all(leaf.isdigit() for leaf in leaves):
        (parent,) = parents
        span = leaves[0] if len(leaves) == 1 else f"{leaves[0]}_{leaves[-1]}"
        name = f"{parent}.rev_{span}" if parent else f"rev_{span}"
    else:
        name = f"reversible_{index}"
    while name in taken:
        name += "_"
    return name


def _free_name(name: str, taken: dict[str, str]) -> str:
    """``name``, or ``name_1``, ... if a checkpointed run of a converted model already uses it."""
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def analyze(model: nn.Module, example_input: Any = None, *,
            select: Callable[[str], bool] | None = None, share_modules: bool = False,
            **trace_options: Any) -> Analysis:
    """Trace, find, decide and plan. ``select(block_name)`` limits which eligible blocks are planned
    as reversible (default: all); ``share_modules=True`` makes the graph module share ``model``'s
    submodules (for a pass rewriting its own copy). See :func:`audit` for the other arguments."""
    gm = trace(model, example_input, share_modules=share_modules, **trace_options)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    found = find_residual_blocks(gm)
    contexts = {b.name: BlockContext(gm, b, nodes) for b in found}
    violations = {name: check_block(ctx) for name, ctx in contexts.items()}
    # the dimension a block's couplings split: 1 for NCHW, the last one for a token or channels-last
    # layout (a run's blocks share it)
    axes = {name: ctx.channels.axis for name, ctx in contexts.items() if not violations[name]}

    # Units in graph order: residual blocks, and the segments and checkpointed runs a converted
    # model already has.
    units: list[tuple[int, str, Any]] = [(order[b.join], "block", b) for b in found]
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ReversibleSegment):
            units.append((order[n.name], "segment", n))
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), CheckpointedRun):
            units.append((order[n.name], "checkpointed", n))
    units.sort(key=lambda u: u[0])

    node_segment: dict[str, str] = {}
    segments: list[SegmentPlan] = []
    runs: dict[str, list[ResidualBlock]] = {}
    current: list[ResidualBlock] = []

    def close_run() -> None:
        if current:
            name = _run_name(current, len(runs), set(nodes) | {s.name for s in segments})
            runs[name] = list(current)
            segments.append(SegmentPlan(name, "reversible", tuple(b.name for b in current)))
            for b in current:
                for n in b.nodes:
                    node_segment[n] = name
            current.clear()

    block_segment: dict[str, str] = {}
    deselected: set[str] = set()  # eligible blocks left stored by ``select``
    for _, kind, unit in units:
        if kind == "segment":
            close_run()
            blocks = tuple(getattr(gm.get_submodule(unit.target), "source_blocks", ()))
            segments.append(SegmentPlan(unit.target, "reversible", blocks, converted=True))
            node_segment[unit.name] = unit.target
            continue
        if kind == "checkpointed":  # a stored part the conversion put under checkpointing
            close_run()
            name = "+".join(gm.get_submodule(unit.target).parts)
            if name not in {s.name for s in segments}:
                segments.append(SegmentPlan(name, "stored", checkpointed=True))
            node_segment[unit.name] = name
            for user in unit.users:  # a run with several outputs is unpacked right after it
                if user.op == "call_function" and user.target is operator.getitem:
                    node_segment[user.name] = name
            continue
        b = unit
        eligible = not violations[b.name] and (select is None or select(b.name))
        if eligible:
            if current and (not _continues(current[-1], b, nodes) or axes[current[-1].name] != axes[b.name]):
                close_run()
            current.append(b)
        else:
            close_run()
            if not violations[b.name]:
                deselected.add(b.name)
            segments.append(SegmentPlan(b.name, "stored", (b.name,)))
            for n in b.nodes:
                node_segment[n] = b.name
            block_segment[b.name] = b.name
    close_run()
    for name, members in runs.items():
        for b in members:
            block_segment[b.name] = name

    # Code outside every block: before the first -> stem, after the last -> head; in between ->
    # the following stored segment, else a stored segment of its own. Not a checkpointed part, nor
    # a block that ``select`` left stored, which the original's plan has as reversible: the gap
    # keeps the name it has in the original's plan (a memory plan's calibrations convert the same
    # model with different parts converted and checkpointed, and their rows must line up).
    # Parameter expressions (a get_attr, ConvNeXt's ``gamma.reshape``) go with their first user, so
    # that they never make a part of their own.
    kinds = {s.name: s.kind for s in segments}
    checkpointed = {s.name for s in segments if s.checkpointed}
    constant = param_expressions(gm.graph)
    if not segments:
        for n in nodes:
            node_segment[n] = "model"
        segments = [SegmentPlan("model", "stored")]
    else:
        names = list(nodes)
        owned = [i for i, n in enumerate(names) if n in node_segment]
        first, last = owned[0], owned[-1]
        pending: list[str] = []
        gap_segments: list[tuple[int, SegmentPlan]] = []
        for i, n in enumerate(names):
            if n in constant and n not in node_segment and first < i < last:
                continue
            if n in node_segment and i > first:
                if pending:
                    target = node_segment[n]
                    if kinds[target] != "stored" or target in checkpointed or target in deselected:
                        target = _free_name(f"stored_{len(gap_segments)}", kinds)
                        gap_segments.append((order[pending[0]], SegmentPlan(target, "stored")))
                    for p in pending:
                        node_segment[p] = target
                    pending = []
                continue
            if n in node_segment:
                continue
            if i < first:
                node_segment[n] = "stem"
            elif i > last:
                node_segment[n] = "head"
            else:
                pending.append(n)
        for n in reversed(names):  # parameter expressions between blocks: their first user's part
            if n not in node_segment:
                users = sorted(nodes[n].users, key=lambda u: order[u.name])
                node_segment[n] = node_segment.get(users[0].name, "head") if users else "head"
        seg_first = {}
        for n, s in node_segment.items():
            seg_first.setdefault(s, order[n])
        extra = [SegmentPlan(name, "stored") for name in ("stem", "head")
                 if name in seg_first and name not in kinds]
        segments = sorted(segments + extra + [s for _, s in gap_segments],
                          key=lambda s: seg_first.get(s.name, 0))

    audits = []
    for b in found:
        vs = violations[b.name]
        post = nodes[b.post_op] if b.post_op else None
        branch_nodes = [nodes[n] for n in b.branch + b.shortcut]
        audits.append(BlockAudit(
            name=b.name,
            reversible=not vs,
            reason=vs[0].code if vs else None,
            message=vs[0].message if vs else None,
            reasons=tuple(v.code for v in vs),
            input_shape=tensor_shape(nodes[b.fork]),
            output_shape=tensor_shape(nodes[b.output]),
            params=_block_params(gm, branch_nodes),
            shortcut="identity" if b.identity_shortcut else "projection",
            post_op=(type(gm.get_submodule(post.target)).__name__ if post.op == "call_module"
                     else getattr(post.target, "__name__", str(post.target))) if post else None,
            segment=block_segment[b.name],
            selected=select is None or select(b.name),
        ))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    report = AuditReport(
        model=model_name(model),
        input_shape=tensor_shape(placeholders[0]) if placeholders else None,
        blocks=audits,
        segments=segments,
        params=sum(p.numel() for p in model.parameters()),
    )
    return Analysis(gm, report, {b.name: b for b in found}, violations, runs, node_segment, axes)


def audit(model: nn.Module, example_input: Any = None, **trace_options: Any) -> AuditReport:
    """Say, block by block, which residual blocks of ``model`` can become reversible, and why not.

    Read-only: the model's parameters, buffers, train/eval mode and hooks are left as they are,
    and shapes are propagated on meta tensors, so any batch size costs no activation memory.

    Args:
        model: any ``nn.Module`` torch.fx can trace (a converted model too: its reversible
            segments are reported as such).
        example_input: a tensor, tuple of tensors, or shape; default ``(1, 3, 224, 224)``.
        **trace_options: ``leaf_modules``, ``autowrap_functions``, ``concrete_args``
            (see :func:`revconvert.tracing.trace`).

    Returns:
        An :class:`AuditReport`; ``print(report)`` shows the table, ``report.to_dict()`` is JSON-ready.

    Raises:
        TraceError: the model cannot be traced; the message names the module and a remedy.

    Example:
        >>> report = revconvert.audit(torchvision.models.resnet50())
        >>> len(report.blocks), len(report.reversible_blocks)
        (16, 12)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit() expects a torch.nn.Module, got {type(model).__name__}")
    unknown = set(trace_options) - {"leaf_modules", "autowrap_functions", "concrete_args"}
    if unknown:
        raise TypeError(f"audit() got unexpected option(s) {sorted(unknown)}; "
                        f"valid: leaf_modules, autowrap_functions, concrete_args")
    return analyze(model, example_input, **trace_options).report
