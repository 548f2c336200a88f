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

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES

__all__ = ["op_kind", "describe_op", "CONV_TYPES", "NORM_TYPES", "is_inplace"]

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


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` overwrites its first input."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.startswith("_")) \
            or node.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv)
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return False
