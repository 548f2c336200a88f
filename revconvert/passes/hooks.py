"""Hooks through a conversion: carried over where that is faithful, refused where it is not.

- Hooks on the model itself (forward, backward and state-dict hooks) are registered again, in order
  and with their options, on the converted GraphModule (the original's handles do not remove them
  there), and a deep copy of it keeps them, as it keeps those registered on it later.
- Hooks on modules the converted model still calls (the trace's leaves outside converted blocks:
  ``conv1``, ``layer2.0.downsample.0``, ...) stay on those modules; the copy calls the caller's hook
  objects, not copies of them.
- Hooks on a module torch.fx traces through (``layer1``, a ``BasicBlock``) have no module left to
  run them in the converted graph, and hooks on layers of a converted block would be dropped (the
  layer is rebuilt) or run in both F and G: conversion refuses and names the module and the remedy.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
import torch.fx as fx

from ..analysis.audit import Analysis
from ..analysis.hooks import module_hooks
from ..errors import ConversionError

__all__ = ["check_hooks", "carry_root_hooks"]


def check_hooks(model: nn.Module, analysis: Analysis) -> None:
    """Refuse hooks the converted model could not run as the original does.

    Args:
        model: the model being converted (the copy the graph was traced from).
        analysis: its analysis; ``analysis.runs`` are the blocks about to be converted.

    Raises:
        ConversionError: naming each such hook, its module and the remedy.
    """
    gm = analysis.graph_module
    traced = gm.meta.get("revconvert", {}).get("traced_through", frozenset())
    problems = []
    for name, module in model.named_modules():
        hooks = module_hooks(module)
        if name and hooks and name in traced:
            problems.append(
                f"{', '.join(hooks)} on '{name}' ({type(module).__name__}): torch.fx traces through this "
                f"module, so the converted model has no module '{name}' to run it. Remove it before "
                f"converting and register it on a module of the converted model, or keep the module whole "
                f"with ConvertConfig(leaf_modules=({name!r},)) (it then stays stored and its hooks run)")
    nodes = {n.name: n for n in gm.graph.nodes}
    for blocks in analysis.runs.values():
        for block in blocks:
            for node_name in block.nodes:
                node = nodes[node_name]
                if node.op != "call_module":
                    continue
                for sub, module in gm.get_submodule(node.target).named_modules(prefix=str(node.target)):
                    hooks = module_hooks(module)
                    if hooks:
                        problems.append(
                            f"{', '.join(hooks)} on '{sub}' ({type(module).__name__}), a layer of block "
                            f"{block.name!r}, which becomes a reversible coupling: the layer is rebuilt at half "
                            f"width in F and G, so the hook would be lost or run twice. Remove it before "
                            f"converting, or leave the block stored with "
                            f"ConvertConfig(select=lambda name: name != {block.name!r})")
    if problems:
        problems = list(dict.fromkeys(problems))
        raise ConversionError(f"{len(problems)} hook(s) cannot be carried into the converted model:\n  "
                              + "\n  ".join(problems))


# Kept through copy.deepcopy by the GraphModule's preserved attributes: the dicts themselves, so
# hooks registered later are kept too. GraphModule.__deepcopy__ keeps the other state-dict hooks
# itself, but not the pre-hooks of state_dict().
_ROOT_HOOK_ATTRS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                    "_backward_hooks", "_state_dict_pre_hooks")


def carry_root_hooks(model: nn.Module, gm: fx.GraphModule) -> None:
    """Register the hooks of ``model`` itself on ``gm``, in order, with their options: forward hooks
    (``with_kwargs``, ``always_call``), full or legacy backward hooks, and state-dict hooks (pre and
    post hooks of ``state_dict`` and ``load_state_dict``; a load pre-hook registered ``with_module``
    receives ``gm``, as the original's received ``model``).

    ``copy.deepcopy`` of a GraphModule keeps only its state-dict hooks; ``gm`` keeps its forward and
    backward hooks too (those carried here and any registered later), as a deep copy of a module does.
    """
    preserved = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
    attrs = gm.meta.setdefault(preserved, {})
    for hid, hook in model._forward_pre_hooks.items():
        gm.register_forward_pre_hook(hook, with_kwargs=hid in model._forward_pre_hooks_with_kwargs)
    for hid, hook in model._forward_hooks.items():
        gm.register_forward_hook(hook, with_kwargs=hid in model._forward_hooks_with_kwargs,
                                 always_call=hid in model._forward_hooks_always_called)
    for hook in model._backward_pre_hooks.values():
        gm.register_full_backward_pre_hook(hook)
    for hook in model._backward_hooks.values():
        if model._is_full_backward_hook:
            gm.register_full_backward_hook(hook)
        else:
            gm.register_backward_hook(hook)
    _carry_state_dict_hooks(model, gm)
    for attr in _ROOT_HOOK_ATTRS:
        if hasattr(gm, attr):
            attrs[attr] = getattr(gm, attr)
    gm._register_deepcopy_hook(_CopyBackwardHookKind(gm))


def _carry_state_dict_hooks(model: nn.Module, gm: fx.GraphModule) -> None:
    for hook in getattr(model, "_state_dict_pre_hooks", {}).values():
        gm.register_state_dict_pre_hook(hook)
    for hook in model._state_dict_hooks.values():
        # the public registration marks the hook object itself (its return value is then ignored)
        if getattr(hook, "_from_public_api", False):
            gm.register_state_dict_post_hook(hook)
        else:
            gm._register_state_dict_hook(hook)
    for wrapped in model._load_state_dict_pre_hooks.values():  # torch's _WrappedHook
        gm._register_load_state_dict_pre_hook(wrapped.hook, with_module=wrapped.with_module)
    for hook in model._load_state_dict_post_hooks.values():
        gm.register_load_state_dict_post_hook(hook)


class _CopyBackwardHookKind:
    """A deep-copy hook of a converted GraphModule: gives the copy its original's
    ``_is_full_backward_hook`` (whether its backward hooks are full or legacy ones), read when the copy
    is made. GraphModule.__deepcopy__ rebuilds the module, which resets it to None; the backward hooks
    preserved in their dict would then be called by neither kind, and a backward hook registered after
    conversion would be lost in the copy.
    """

    def __init__(self, module: fx.GraphModule | None) -> None:
        self.module = module  # a deep copy of this hook refers to the copy of the module

    def __call__(self, duplicate: fx.GraphModule) -> None:
        if self.module is not None:
            duplicate._is_full_backward_hook = self.module._is_full_backward_hook

    def __deepcopy__(self, memo: dict[int, Any]) -> _CopyBackwardHookKind:
        # made while the module is deep-copied: the memo maps it to its copy
        return _CopyBackwardHookKind(copy.deepcopy(self.module, memo))

    def __reduce__(self) -> tuple:
        # Pickling a GraphModule rebuilds it without its forward and backward hooks: nothing to carry,
        # and a reference to the module being pickled would recurse.
        return (_CopyBackwardHookKind, (None,))
