"""Where the memory report's rows come from: the audit's segment plan for a traced model.

This is the only place that knows how a model is cut into segments. The audit's ``analyze`` traces
the model and assigns every fx node to a segment ("stem", "layer1.0", "layer1.rev_1_2", "head", ...);
a converted model's ``ReversibleSegment`` is one leaf node whose segment is "reversible", and a
``CheckpointedRun`` one leaf node of the stored part it runs ("checkpointed"). The plan of
an original model and the analysis of its conversion use the same names, so their rows line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis.audit import analyze

__all__ = ["Segmentation", "SegmentInfo", "segmentation"]

UNASSIGNED = "(unassigned)"


@dataclass(frozen=True)
class SegmentInfo:
    """One planned segment: its name, "stored", "checkpointed" or "reversible", and its blocks."""

    name: str
    kind: str
    blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Segmentation:
    """A traced model and the segment of each of its nodes.

    Attributes:
        graph_module: the traced model (shares submodules with the model it was traced from).
        node_segment: fx node name -> segment name, for every node.
        segments: the planned segments, in execution order.
    """

    graph_module: fx.GraphModule
    node_segment: dict[str, str]
    segments: tuple[SegmentInfo, ...]

    def segment_of(self, node: fx.Node) -> str:
        return self.node_segment.get(node.name, UNASSIGNED)


def segmentation(model: nn.Module, example_input: Any = None, **trace_options: Any) -> Segmentation:
    """Trace ``model`` with the audit and return its segment plan. The graph module shares ``model``'s
    submodules (callers run it), so pass a copy: tracing runs the Python code of traced-through modules."""
    analysis = analyze(model, example_input, share_modules=True, **trace_options)
    gm = analysis.graph_module
    node_segment = dict(analysis.node_segment)
    plans = list(analysis.report.segments)
    order = {plan.name: i for i, plan in enumerate(plans)}
    # Execution order: the order in which segments first appear in the graph.
    first_seen: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        first_seen.setdefault(node_segment.get(node.name, UNASSIGNED), i)
    plans.sort(key=lambda p: (first_seen.get(p.name, len(first_seen) + order[p.name])))
    # The kind as the model runs now: a run the audit only plans as reversible is still stored.
    infos = tuple(SegmentInfo(p.name, _running_kind(p), tuple(p.blocks)) for p in plans)
    return Segmentation(gm, node_segment, infos)


def _running_kind(plan: Any) -> str:
    if plan.kind == "reversible" and getattr(plan, "converted", True):
        return "reversible"
    return "checkpointed" if getattr(plan, "checkpointed", False) else "stored"
