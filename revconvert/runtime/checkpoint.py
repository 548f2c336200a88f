"""CheckpointedRun: a region of a converted model's graph run under activation checkpointing.

A conversion with ``checkpoint_stored=True`` (the pass in :mod:`revconvert.passes.checkpoint_stored`)
puts each stored part (stem, strided/projection blocks, code between blocks) into one run. Only the
run's inputs are kept; its forward is run again in the backward pass (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost").
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from ._state import RecomputeNeeds, frozen_running_stats, module_generation, recompute_needs
from .segment import ordinary_autograd_enabled

__all__ = ["CheckpointedRun", "attach_checkpointed_modules", "recomputation_graph"]


class CheckpointedRun(nn.Module):
    """Runs a region of a converted model's graph under activation checkpointing.

    In training (grad enabled and an input or a parameter of the region requiring grad) the region
    runs through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: autograd keeps only
    its inputs and runs it again in the backward pass. The recomputation replays the forward's random
    state (dropout masks) and autocast state, and leaves norm running statistics as the forward left
    them, so they are updated once per step. Otherwise it is a plain call of the region.

    The region is an ``fx.GraphModule`` whose leaf modules are the parent's own module objects. It is
    deliberately not a registered child: the parent keeps every parameter under its original name.
    ``deepcopy``, ``torch.save``/``torch.load``, ``.to()`` and ``.train()`` of the parent carry it
    along, since they copy or change those shared module objects. Replacing a module of the parent
    by another object afterwards (``parent.conv1 = ...``) is not followed: convert again instead.
    For the same reason ``nn.DataParallel``, whose replicas copy modules per device, is not supported
    (``DistributedDataParallel`` is). Forward hooks on the region's modules fire twice per step.

    Args:
        region: the region's graph module (its ``call_module`` targets are the parent's names).
        parts: the names of the segments it covers (``("layer2.0",)``, ``("stem",)``; the pass
            makes one run per part).

    Attributes:
        parts: the segments it covers.
        module_names: the parent's qualified names of the modules the region calls, in order.

    Example:
        >>> converted = revconvert.convert(torchvision.models.resnet18(),
        ...                                config=revconvert.ConvertConfig(checkpoint_stored=True))
        >>> converted.ckpt_layer2_0.parts, converted.ckpt_layer2_0.module_names[:2]
        (('layer2.0',), ('layer2.0.conv1', 'layer2.0.bn1'))
    """

    def __init__(self, region: fx.GraphModule, *, parts: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(region, fx.GraphModule):
            raise TypeError(f"CheckpointedRun: region must be a torch.fx.GraphModule, got {type(region).__name__}")
        parts = tuple(parts)
        if not parts or not all(isinstance(p, str) for p in parts):
            raise TypeError(f"CheckpointedRun: parts must be a non-empty sequence of names, got {parts!r}")
        object.__setattr__(self, "_region", region)  # not a child: see the class docstring
        self.training = region.training  # the mode of the model it was cut from
        self.parts = parts
        self.module_names = tuple(dict.fromkeys(
            str(n.target) for n in region.graph.nodes if n.op == "call_module"))

    @property
    def region(self) -> fx.GraphModule:
        """The graph module this run executes (shares its modules with the parent)."""
        return self._region

    def extra_repr(self) -> str:
        ops = [n for n in self._region.graph.nodes if n.op not in ("placeholder", "output")]
        names = self.module_names
        modules = "" if not names else (
            f", modules={names[0]}" if len(names) == 1 else f", modules={names[0]} .. {names[-1]} ({len(names)})")
        return f"parts={list(self.parts)}, nodes={len(ops)}{modules}"

    def _state(self) -> tuple[tuple[nn.Parameter, ...], RecomputeNeeds]:
        """The region's parameters and recomputation needs, walked once per module generation."""
        cached = self.__dict__.get("_cached")
        if cached is None or cached[0] != module_generation():
            cached = (module_generation(), tuple(self._region.parameters()), recompute_needs(self._region))
            self.__dict__["_cached"] = cached
        return cached[1], cached[2]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cached", "_recompute")}

    def _recompute_region(self) -> fx.GraphModule:
        """The region as the backward's recomputation runs it (see :func:`recomputation_graph`)."""
        region = self.__dict__.get("_recompute")
        if region is None or region[0] is not self._region:
            region = (self._region, recomputation_graph(self._region))
            self.__dict__["_recompute"] = region
        return region[1]

    def _wants_checkpoint(self, args: tuple[Any, ...], params: Sequence[nn.Parameter]) -> bool:
        if not torch.is_grad_enabled() or ordinary_autograd_enabled():
            return False
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(args)):
            return True
        return any(p.requires_grad for p in params)

    # torch.compile cannot trace checkpoint with a context_fn; dynamo runs the run eagerly instead
    # (one graph break per run), as it does for reversible segments.
    @torch.compiler.disable
    def forward(self, *args: Any) -> Any:
        params, needs = self._state()
        if not self._wants_checkpoint(args, params):
            return self._region(*args)
        recompute = self._recompute_region()
        recomputing = [False]

        def run(*inputs: Any) -> Any:
            return (recompute if recomputing[0] else self._region)(*inputs)

        @contextlib.contextmanager
        def recomputation() -> Iterator[None]:
            recomputing[0] = True
            try:
                with frozen_running_stats(needs.norms):
                    yield
            finally:
                recomputing[0] = False

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=needs.random,
                          context_fn=lambda: (contextlib.nullcontext(), recomputation()))


_BATCH_NORM_FUNCTIONS = {torch.nn.functional.batch_norm: 6, torch.batch_norm: 6}  # -> momentum's position


def recomputation_graph(region: fx.GraphModule) -> fx.GraphModule:
    """``region`` as its recomputation must run: no second update of running statistics.

    Norm modules are frozen at run time (:func:`frozen_running_stats`). A norm that fx traced
    through (``F.batch_norm(x, running_mean, ..., momentum=0.1)`` with the momentum baked into the
    graph, timm's norm-activation layers) is handled here: its momentum becomes 0, and in-place
    updates of the region's own buffers (``num_batches_tracked.add_(1)``) are left out, since the
    forward made them already. The ops and what they save for backward are otherwise unchanged,
    as non-reentrant checkpointing requires. Returns ``region`` itself when nothing changes.
    """
    graph = copy.deepcopy(region.graph)
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
            position = _BATCH_NORM_FUNCTIONS[node.target]
            if len(node.args) > position:
                node.args = (*node.args[:position], 0.0, *node.args[position + 1:])
            else:
                node.kwargs = {**node.kwargs, "momentum": 0.0}
            changed = True
        elif _updates_buffer_in_place(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if not changed:
        return region
    graph.lint()
    return fx.GraphModule(region, graph, class_name="RecomputedRegion")


def _updates_buffer_in_place(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.op == "call_function" and node.target in (operator.iadd, operator.isub, operator.imul)


def attach_checkpointed_modules(gm: fx.GraphModule, owner: nn.Module | None = None) -> None:
    """Make ``gm`` own, at their names, the modules its :class:`CheckpointedRun` nodes call.

    An ``fx.GraphModule`` keeps only the submodules its graph names; a run's modules are named only
    inside the run. Without this, a model traced or pruned from a converted one would lose their
    parameters (optimizers, ``state_dict``, memory accounting). ``owner`` is where the runs live
    (default ``gm``).
    """
    owner = gm if owner is None else owner
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        run = owner.get_submodule(node.target)
        if not isinstance(run, CheckpointedRun):
            continue
        for name in run.module_names:
            try:
                present = gm.get_submodule(name) is run.region.get_submodule(name)
            except AttributeError:
                present = False
            if not present:
                gm.add_submodule(name, run.region.get_submodule(name))
