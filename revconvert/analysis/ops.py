"""Facts about graph operations that several passes need: names for reports, and in-place effects.

What the channel surgery can rebuild is decided by following channel widths through the branch
(:mod:`revconvert.analysis.channels`), not by a list of layer kinds.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
from torch import nn

__all__ = ["describe_op", "CONV_TYPES", "DROPOUT_TYPES", "is_inplace", "mutated_inputs"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                              nn.AlphaDropout)


def describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short user-facing name for ``node``'s operation (``Linear``, ``torch.cat``, ``.view``)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", str(node.target))
        return f"{mod.replace('torch.nn.functional', 'F')}.{name}" if mod else name
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def mutated_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` modifies in place (best effort: in-place modules, ``op_`` methods and
    functions, ``x += ...``, ``x[i] = ...``, ``inplace=True`` and ``out=`` arguments)."""
    first = [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    out = [node.kwargs["out"]] if isinstance(node.kwargs.get("out"), fx.Node) else []
    if node.op == "call_module":
        return first if getattr(gm.get_submodule(node.target), "inplace", False) else []
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.endswith("__") else []
    if node.op != "call_function":
        return []
    name = getattr(node.target, "__name__", "")
    if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")):
        return first + out
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):  # builtins without a signature, or arguments fx rewrote
        bound = node.kwargs
    return (first if bound.get("inplace") is True else []) + out


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` overwrites its first input."""
    first = node.args[0] if node.args else None
    return isinstance(first, fx.Node) and first in mutated_inputs(gm, node)
