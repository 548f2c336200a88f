"""Module hooks: find them, keep them out of the analysis, and copy models without copying them.

The analysis (tracing, shape propagation, memory estimates, recompute planning) runs a model's
code on proxies and meta or fake tensors; a user's hook called there would see those instead of
data, and could record them. So the analysis calls no hook: it traces through modules by calling
their ``forward`` directly, strips the hooks of its own copies, and sets the global module hooks
(``torch.nn.modules.module.register_module_forward_hook`` and friends) aside while it runs.

The global hooks are process-wide, so setting them aside is too. And torch.fx patches
``nn.Module.__call__`` process-wide while it traces, so a trace in one thread breaks module calls
in every other (two traces undo each other's patches). So analyses take turns: ``no_global_hooks``,
which every analysis runs in, holds one re-entrant process-wide lock, and the hooks are set aside by
its outermost entry and put back, exactly once, by its outermost exit.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["HOOK_KINDS", "STATE_DICT_HOOK_KINDS", "module_hooks", "strip_hooks", "no_global_hooks", "copy_sharing_hooks"]

# attribute of an nn.Module -> what its entries are called in messages
HOOK_KINDS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}
# the same for state_dict() and load_state_dict(); never called by the analysis, but lost with their
# module where a conversion replaces it
STATE_DICT_HOOK_KINDS = {
    "_state_dict_pre_hooks": "state-dict pre-hook",
    "_state_dict_hooks": "state-dict hook",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hook",
    "_load_state_dict_post_hooks": "load-state-dict post-hook",
}
# bookkeeping next to the hooks (keyed by the same handle ids)
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks", "_global_forward_hooks_always_called",
                 "_global_forward_hooks_with_kwargs")


def _hook_name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def module_hooks(module: nn.Module) -> list[str]:
    """Descriptions of the hooks registered on ``module`` itself (not its children), forward,
    backward and state-dict hooks, e.g. ``["forward hook add_100"]``."""
    return [f"{kind} {_hook_name(h)}" for attr, kind in {**HOOK_KINDS, **STATE_DICT_HOOK_KINDS}.items()
            for h in getattr(module, attr, {}).values()]


def strip_hooks(model: nn.Module) -> nn.Module:
    """Remove every hook of ``model`` and its submodules, in place. Only for copies the analysis owns."""
    for m in model.modules():
        for attr in itertools.chain(HOOK_KINDS, _HOOK_FLAGS):
            if getattr(m, attr, None):
                setattr(m, attr, type(getattr(m, attr))())
        if getattr(m, "_is_full_backward_hook", None) is not None:
            m._is_full_backward_hook = None
    return model


# Held by the thread that analyses (re-entrant: an analysis calls others); ``_depth`` counts its
# nested entries, ``_set_aside`` holds the hooks' entries while it is positive.
_ANALYSIS_LOCK = threading.RLock()
_depth = 0
_set_aside: dict[str, dict[int, Any]] = {}


@contextlib.contextmanager
def no_global_hooks() -> Iterator[None]:
    """Run the body as the process's only analysis, with the global module hooks set aside: they
    are the caller's, and the analysis runs on proxies and meta or fake tensors.

    Analyses in other threads wait for this one to end (torch.fx tracing is process-wide, see the
    module docstring). Re-entrant: the outermost entry empties torch's global hook dictionaries in
    place and the outermost exit puts their entries back, in their order; a global hook registered
    meanwhile is kept, after them. The dictionaries stay the same objects, so the handles of
    registered hooks keep working.
    """
    global _depth
    with _ANALYSIS_LOCK:
        if _depth == 0:
            _suspend()
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                _restore()


def _suspend() -> None:
    for name in _GLOBAL_HOOKS:
        hooks = getattr(_module, name, None)
        if hooks is not None:
            _set_aside[name] = dict(hooks)
            hooks.clear()


def _restore() -> None:
    for name, entries in _set_aside.items():
        hooks = getattr(_module, name)
        added = [key for key in hooks if key not in entries]  # registered during the analysis
        hooks.update(entries)
        for key in added:  # after the older hooks, as if registered after them
            hooks[key] = hooks.pop(key)
    _set_aside.clear()


def copy_sharing_hooks(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model)`` whose modules call the very hook objects of the original.

    A plain deep copy copies a hook that is a bound method or a ``functools.partial`` together with
    its object or arguments, so the copy's hook would record into a copy of the caller's list.
    """
    memo = dict(memo or {})
    for m in model.modules():
        for attr in {**HOOK_KINDS, **STATE_DICT_HOOK_KINDS}:
            for hook in getattr(m, attr, {}).values():
                # a load pre-hook is wrapped with a reference to its module: copy the wrapper (its
                # module becomes the copy), share what it wraps
                hook = getattr(hook, "hook", hook) if attr == "_load_state_dict_pre_hooks" else hook
                memo[id(hook)] = hook
    return copy.deepcopy(model, memo)
