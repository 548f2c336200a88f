"""Activation checkpointing for the stored parts of a converted model.

A conversion keeps the stem, the strided/projection blocks and the code between blocks as ordinary
graph nodes, and autograd stores their activations; in a deep ResNet they hold most of what the
converted model saves (resnet152: the stem and four projection blocks). This pass runs each such
part as one :class:`CheckpointedRun`, under ``torch.utils.checkpoint`` (Chen et al. 2016, "Training
Deep Nets with Sublinear Memory Cost"): only the part's inputs are kept, and its forward is run again
in the backward pass. The training step costs the parts' forward FLOPs once more.

The modules stay where they were: a run calls the very module objects its parent owns, without
registering them a second time, so parameter names, ``state_dict`` keys, optimizers and
``load_state_dict(original.state_dict(), strict=False)`` are unchanged.

Stages: find (:func:`find_stored_regions`: contiguous runs of one stored part's nodes) ->
rewrite (each run becomes one ``call_module`` node) -> ``lint()`` -> ``recompile()``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import dataclasses
import operator
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from ..analysis.ops import mutated_inputs
from ..errors import ConversionError
from ..runtime import ReversibleSegment
from ..runtime.checkpoint import CheckpointedRun
from .summary import ConversionSummary, keep_summary

__all__ = ["StoredRegion", "find_stored_regions", "split_point", "checkpoint_stored_parts", "stored_part_names"]

# Segments that stay as they are, and why: they are not stored parts in the sense of this pass.
_NOT_CHECKPOINTED = {
    "head": "its input is the last segment's output, which is kept anyway, and its own activations "
            "(pooled features) are small",
    "model": "the model has no residual block: there is no stored part to set apart from the rest",
}


@dataclass(frozen=True)
class StoredRegion:
    """A contiguous run of one stored part's nodes, to become one :class:`CheckpointedRun`.

    Attributes:
        name: the submodule name the run gets (``ckpt_stem``, ``ckpt_layer2_0``).
        part: the segment the nodes belong to (``node.meta["revconvert"]["segment"]``).
        nodes: the nodes it runs, in graph order.
        inputs: values defined outside and used inside, in order of first use.
        outputs: its values used outside, in graph order.
    """

    name: str
    part: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _segment(node: fx.Node) -> str | None:
    return node.meta.get("revconvert", {}).get("segment")


def _module_name(gm: fx.GraphModule, part: str, taken: set[str]) -> str:
    name = "ckpt_" + "".join(c if c.isalnum() or c == "_" else "_" for c in part)
    base, k = name, 1
    while name in taken or hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def find_stored_regions(gm: fx.GraphModule, split: Collection[str] = ()) -> list[StoredRegion]:
    """The regions :func:`checkpoint_stored_parts` would create, without changing ``gm``.

    A region is a maximal run of consecutive nodes of one stored part (``stem``, a stored block such
    as ``layer2.0``, or the ``stored_k`` code between blocks); ``head`` and reversible segments are
    left out. Placeholders and attribute reads never belong to a region (the run reads them as
    inputs). In-place modifications must not change what the recomputation reads: a node that
    modifies a value from outside its run stays outside, and a run whose input is modified later
    stays inline.

    A run of a part named in ``split`` becomes two regions, cut where :func:`split_point` says: the
    backward then recomputes one half at a time (the second half's recomputation is freed before the
    first half's starts), for the price of keeping the values that cross the cut.
    """
    def opaque(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                       (ReversibleSegment, CheckpointedRun))

    reversible = {_segment(n) for n in gm.graph.nodes if opaque(n)
                  and isinstance(gm.get_submodule(n.target), ReversibleSegment)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_mutation: dict[fx.Node, int] = {}  # value -> position of the last node modifying it in place
    runs: list[tuple[str, list[fx.Node]]] = []
    part: str | None = None
    current: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        mutated = mutated_inputs(gm, node)
        last_mutation.update((v, order[node]) for v in mutated)
        seg = _segment(node)
        eligible = node.op != "output" and seg is not None and seg not in _NOT_CHECKPOINTED \
            and seg not in reversible and not opaque(node)
        if eligible and seg == part and (not mutated or set(mutated) <= set(current)):
            current.append(node)
            continue
        if current:
            runs.append((part, current))
        part, current = (seg, [node]) if eligible and not mutated else (None, [])
    if current:
        runs.append((part, current))

    halves = []
    for part, nodes in runs:
        k = split_point(gm, nodes) if part in split else None
        halves += [(part, nodes)] if k is None else [(part, nodes[:k]), (part, nodes[k:])]
    runs = halves
    taken = {name for name, _ in gm.named_children()}
    regions = []
    for part, nodes in runs:
        inside = set(nodes)
        inputs = dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if any(last_mutation.get(a, -1) > order[nodes[-1]] for a in inputs):
            continue  # the recomputation would read the modified input
        if outputs:
            regions.append(StoredRegion(name=_module_name(gm, part, taken), part=part,
                                        nodes=tuple(n.name for n in nodes),
                                        inputs=tuple(n.name for n in inputs),
                                        outputs=tuple(n.name for n in outputs)))
    return regions


def _value_bytes(node: fx.Node) -> int:
    """Bytes of the tensors a node produces, from its ``meta["val"]``."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(node.meta.get("val"))
               if isinstance(t, torch.Tensor))


def split_point(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> int | None:
    """Where to cut a run of nodes in two checkpointed regions: the index of the second half's first node.

    Each half's backward holds its recomputed values at once, and the values that cross the cut
    are kept from the forward on, through the backward of every later part as well as this one's, so
    the cut minimises the larger half's new bytes plus twice the bytes crossing it (*heuristic*:
    values are counted as produced, in-place ops as producing nothing; ``plan_memory`` verifies its
    plans with a full estimate; on resnet50's bottlenecks it cuts after the 3x3 convolution's
    activation, the narrowest point). None: the run has fewer than two nodes that produce anything.
    """
    mutated = [mutated_inputs(gm, n) for n in nodes]
    produced = [0 if m else _value_bytes(n) for n, m in zip(nodes, mutated)]
    position = {n: i for i, n in enumerate(nodes)}
    best, best_cost = None, None
    total = sum(produced)
    first = 0
    for k in range(1, len(nodes)):
        first += produced[k - 1]
        if not first or first == total or any(position.get(v, k) < k for m in mutated[k:] for v in m):
            continue  # the second half would modify, in place, a value the first half hands it
        crossing = sum(_value_bytes(n) for n in nodes[:k] if any(position.get(u, -1) >= k for u in n.users))
        cost = max(first, total - first) + 2 * crossing
        if best_cost is None or cost < best_cost:
            best, best_cost = k, cost
    return best


def _rewrite(gm: fx.GraphModule, region: StoredRegion, renamed: dict[str, fx.Node]) -> None:
    """Replace the region's nodes by one call of a new :class:`CheckpointedRun`. ``renamed`` maps the
    outputs of regions rewritten before to the nodes that replaced them, and is extended."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    by_name.update(renamed)
    nodes = [by_name[n] for n in region.nodes]
    inside = set(nodes)

    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name in region.inputs:
        env[by_name[name]] = sub.placeholder(name)
        env[by_name[name]].meta = dict(by_name[name].meta)
    for n in nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    outputs = [by_name[n] for n in region.outputs]
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    sub.lint()
    run = CheckpointedRun(fx.GraphModule(gm, sub, class_name="CheckpointedRegion"), parts=(region.part,))
    gm.add_submodule(region.name, run)

    meta = {"segment": region.part}
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(region.name, tuple(by_name[n] for n in region.inputs))
    vals = [o.meta.get("val") for o in outputs]
    call.meta.update(val=vals[0] if len(outputs) == 1 else tuple(vals), revconvert=dict(meta))
    replacements = [call]
    if len(outputs) > 1:
        replacements, anchor = [], call
        for i, o in enumerate(outputs):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(operator.getitem, (call, i))
            anchor.meta.update(val=o.meta.get("val"), revconvert=dict(meta))
            replacements.append(anchor)
    for o, new in zip(outputs, replacements):
        o.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
        renamed[o.name] = new
    for n in reversed(nodes):
        graph.erase_node(n)


def _defer_exit_activations(gm: fx.GraphModule, parts: Collection[str] | None = None) -> list[str]:
    """Apply each reversible segment's exit activation in the stored part that reads its output.

    A segment keeps its output for its backward; an exit activation applied inside the segment keeps
    its own output too (ReLU's backward reads it), so the boundary would cost two tensors. As a graph
    node of the next stored part, the activation runs inside that part's checkpointed run, whose kept
    input is then the segment's output itself: one tensor. Only where every reader of the segment's
    output belongs to one stored part (not the head). Returns the segments changed.
    """
    reversible = {_segment(n) for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), ReversibleSegment)}
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        segment = gm.get_submodule(node.target)
        if not isinstance(segment, ReversibleSegment) or segment.exit_activation is None \
                or not segment.apply_exit_activation or getattr(segment.exit_activation, "inplace", False):
            continue
        readers = {_segment(u) for u in node.users}
        part = readers.pop() if len(readers) == 1 else None
        if part is None or part in _NOT_CHECKPOINTED or part in reversible or (parts is not None and part not in parts) \
                or any(u.op == "output" or mutated_inputs(gm, u) for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            act = gm.graph.call_module(f"{node.target}.exit_activation", (node,))
        act.meta.update(val=node.meta.get("val"), revconvert={"segment": part})
        node.replace_all_uses_with(act, delete_user_cb=lambda user: user is not act)
        segment.apply_exit_activation = False
        changed.append(str(node.target))
    return changed


def stored_part_names(gm: fx.GraphModule) -> list[str]:
    """The parts of a converted model that checkpointing can cover, in graph order."""
    reversible = {_segment(n) for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), ReversibleSegment)}
    names = dict.fromkeys(_segment(n) for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output"))
    return [n for n in names if n is not None and n not in _NOT_CHECKPOINTED and n not in reversible]


def _checkpoint_stored_parts(gm: fx.GraphModule, parts: Collection[str] | None = None,
                             split: Collection[str] = ()) -> dict[str, list[str]]:
    """In place: find, rewrite, lint, recompile. Returns run name -> the parts it covers.

    ``parts``: the stored parts to checkpoint (segment names such as ``"stem"``, ``"layer2.0"``);
    None checkpoints every one. ``split``: parts checkpointed in two regions instead of one. Names
    that are not stored parts of ``gm`` raise ``ConversionError``.
    """
    valid = stored_part_names(gm)
    for field_name, names in (("checkpoint_stored", parts or ()), ("checkpoint_split", split)):
        unknown = [p for p in names if p not in valid]
        if unknown:
            close = difflib.get_close_matches(unknown[0], valid, n=3)
            raise ConversionError(
                f"ConvertConfig.{field_name} names {unknown[0]!r}, which is not a stored part of the "
                f"converted model" + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + f"; its stored parts are {valid}")
    _defer_exit_activations(gm, parts)
    regions = [r for r in find_stored_regions(gm, split) if parts is None or r.part in parts]
    renamed: dict[str, fx.Node] = {}
    for region in regions:
        _rewrite(gm, region, renamed)
    gm.graph.lint()
    # No eliminate_dead_code(): every output of a run has a user, so nothing became dead (and fx
    # would drop an in-place method call whose result is unused). No delete_all_unused_submodules():
    # the graph no longer names the runs' modules, but the parent must keep owning them.
    gm.recompile()
    return {r.name: [r.part] for r in regions}


def checkpoint_stored_parts(converted: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of a converted model whose stored parts run under activation checkpointing.

    The same as converting with ``ConvertConfig(checkpoint_stored=True)``; use it on a model that
    :func:`revconvert.convert` returned in this session (the pass reads the segment each graph node
    belongs to, which ``torch.save``/``torch.load`` does not keep). The argument is not modified.

    Args:
        converted: a model returned by :func:`revconvert.convert`.

    Returns:
        A deep copy in which every stored part (stem, strided/projection blocks, code between
        blocks; not the head) is one :class:`CheckpointedRun` submodule, ``ckpt_<part>``; its
        ``revconvert_summary.checkpointed`` lists them. Parameter names are unchanged.

    Raises:
        TypeError: ``converted`` is not an ``fx.GraphModule``.
        ValueError: its graph does not say which segment each node belongs to.

    Example:
        >>> converted = revconvert.convert(torchvision.models.resnet18())
        >>> lean = checkpoint_stored_parts(converted)
        >>> lean.revconvert_summary.checkpointed
        {'ckpt_stem': ['stem'], 'ckpt_layer2_0': ['layer2.0'], ...}
    """
    if not isinstance(converted, fx.GraphModule):
        raise TypeError(f"checkpoint_stored_parts expects the fx.GraphModule revconvert.convert returns, "
                        f"got {type(converted).__name__}")
    unmarked = [n.name for n in converted.graph.nodes if n.op != "output" and _segment(n) is None]
    if unmarked:
        raise ValueError(f"checkpoint_stored_parts: nodes {unmarked[:3]} carry no segment "
                         f"(node.meta['revconvert']); pass a model returned by revconvert.convert in this "
                         f"session, or convert with ConvertConfig(checkpoint_stored=True)")
    work = copy.deepcopy(converted)
    done = _checkpoint_stored_parts(work)
    summary = getattr(work, "revconvert_summary", None)
    if isinstance(summary, ConversionSummary):
        keep_summary(work, dataclasses.replace(summary, checkpointed={**summary.checkpointed, **done}))
    return work


