"""What the channel surgery can rebuild: the branch operations revconvert supports, as data.

The audit uses this table to say which blocks are convertible; the surgery uses it to rebuild each
operation at half the outer channel width. A kind is one of:

- ``conv``: ``nn.Conv1d/2d/3d`` (weights re-made at the new widths, kernel/padding/dilation/groups kept)
- ``norm``: ``nn.BatchNorm1d/2d/3d``, ``nn.GroupNorm`` (re-made for the new channel count)
- ``act``: element-wise activations (module, function or method form)
- ``dropout``: dropout modules and functions
- ``identity``: ``nn.Identity`` and no-op methods such as ``contiguous``
- ``scalar``: arithmetic with a Python number (``x * 0.5``)
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES

__all__ = ["op_kind", "describe_op", "CONV_TYPES", "NORM_TYPES", "is_inplace", "mutated_inputs"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                              nn.AlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
_SCALAR_FUNCTIONS = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.add,
                     torch.sub, torch.div}
_SCALAR_METHODS = {"mul", "div", "add", "sub", "mul_", "div_", "add_", "sub_"}
_IDENTITY_METHODS = {"contiguous", "clone"}


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The surgery kind of ``node`` (see module docstring), or None if the surgery cannot rebuild it."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, CONV_TYPES):
            return "conv"
        if isinstance(mod, NORM_TYPES):
            return "norm"
        if isinstance(mod, ACTIVATION_MODULES):
            return "act"
        if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return "act"
        if isinstance(mod, DROPOUT_TYPES):
            return "dropout"
        if isinstance(mod, nn.Identity) or (isinstance(mod, nn.Sequential) and len(mod) == 0):
            return "identity"
        return None
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_function":
        if node.target in ACTIVATION_FUNCTIONS:
            return "act"
        if node.target in _DROPOUT_FUNCTIONS:
            return "dropout"
        if node.target in _SCALAR_FUNCTIONS and len(tensor_args) == 1 and not node.kwargs:
            return "scalar"
        return None
    if node.op == "call_method":
        if node.target in ACTIVATION_METHODS:
            return "act"
        if node.target in _IDENTITY_METHODS and len(node.args) == 1:
            return "identity"
        if node.target in _SCALAR_METHODS and len(tensor_args) == 1 and not node.kwargs:
            return "scalar"
        return None
    return None


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
