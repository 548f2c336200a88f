"""Facts about graph operations that several passes need: names for reports, and in-place effects.

What the channel surgery can rebuild is decided by following channel widths through the branch
(:mod:`revconvert.analysis.channels`), not by a list of layer kinds.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Collection

import torch
import torch.fx as fx
from torch import nn

from .channels import param_expression

__all__ = ["describe_op", "CONV_TYPES", "DROPOUT_TYPES", "is_inplace", "mutated_inputs", "zero_init_ends"]

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


_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_CATS = {torch.cat, torch.concat, torch.concatenate}


def zero_init_ends(gm: fx.GraphModule, out: fx.Node, stop: Collection[str] = ()) -> list[tuple[fx.Node, str | None]]:
    """Where zero-init stops on its way back from a residual function's output ``out``, each with the
    last concatenation on the way to it (None if none).

    The walk goes back through parameter-free and element-wise nodes and ends at a parametrised
    module (the surgery zeroes its weight and bias: a norm's scale, else the last convolution or
    ``Linear``), at a parameter (a layer scale, also one multiplying the path), or at an input: a
    placeholder or a node named in ``stop`` (the block input, in the original graph). Every path of a
    sum or a concatenation is followed, since each must start at zero; otherwise the widest operand
    (``x * gate``: x). The surgery zeroes the ends (``surgery._zero_last``); an input reached
    through a concatenation cannot be zeroed (the audit's ``identity-path``)."""
    ends: list[tuple[fx.Node, str | None]] = []
    seen: set[tuple[fx.Node, str | None]] = set()

    def walk(node: fx.Node, cat: str | None) -> None:
        while True:
            if node.op in ("get_attr", "placeholder") or node.name in stop or (
                    node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters())):
                ends.append((node, cat))
                return
            tensors = list(node.all_input_nodes)
            if not tensors:
                return
            params = [a for a in tensors if param_expression(a)]
            if params and node.target in _PRODUCTS:
                node = params[0]  # a layer scale: zeroed, whatever it multiplies
                continue
            if node.op in ("call_function", "call_method") and (node.target in _SUMS or node.target in _CATS):
                here = node.name if node.target in _CATS else cat
                for operand in tensors:
                    if (operand, here) not in seen:
                        seen.add((operand, here))
                        walk(operand, here)
                return
            node = max(tensors, key=lambda a: math.prod(getattr(a.meta.get("val"), "shape", (0,))))

    walk(out, None)
    return ends
