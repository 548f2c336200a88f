"""CheckpointedRun: a region of a converted model's graph run under activation checkpointing.

A conversion with ``checkpoint_stored=True`` (the pass in :mod:`revconvert.passes.checkpoint_stored`)
puts each stored part (stem, strided/projection blocks, code between blocks) into one run. Only the
run's inputs are kept; its forward is run again in the backward pass (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from .segment import ordinary_autograd_enabled

__all__ = ["CheckpointedRun", "attach_checkpointed_modules"]


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

    def _wants_checkpoint(self, args: tuple[Any, ...]) -> bool:
        if not torch.is_grad_enabled() or ordinary_autograd_enabled():
            return False
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(args)):
            return True
        return any(p.requires_grad for p in self._region.parameters())

    def forward(self, *args: Any) -> Any:
        if not self._wants_checkpoint(args):
            return self._region(*args)
        norms = _tracked_norms(self._region)
        return checkpoint(self._region, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (contextlib.nullcontext(), _running_stats_frozen(norms)))


def _tracked_norms(module: nn.Module) -> list[_NormBase]:
    return [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@contextlib.contextmanager
def _running_stats_frozen(norms: list[_NormBase]) -> Iterator[None]:
    """Run the recomputation without changing the norms' running statistics.

    Momentum 0 makes the in-place update ``(1 - 0) * running + 0 * batch`` leave the values as they
    are; the op and what it saves for backward stay those of the forward, which non-reentrant
    checkpointing requires. (Restoring a snapshot in place instead would bump the version of the
    running buffers after the recomputation saved them, and the backward would refuse them.) The
    batch counter, which nothing saves, is put back afterwards.
    """
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)


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
