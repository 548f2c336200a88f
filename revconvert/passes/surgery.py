"""Channel surgery: rebuild a residual block's branch as the F and G of a reversible coupling.

F and G keep the branch's layer sequence (convolutions with their kernel, padding, dilation and
groups at stride 1; norms; activations; dropout). Their outer width is half the block's channels;
their inner width is scaled so that F and G together have about as many parameters as the block
they replace. The activation that followed the original addition (``relu(x + B(x))``) is not
invertible: it moves to the front of F and G (pre-activation style).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..analysis.graph import ResidualBlock
from ..runtime._state import name_draws_random
from ..analysis.ops import CONV_TYPES, op_kind

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)

__all__ = ["BranchSpec", "branch_spec", "build_residual_function", "choose_scale", "NodeOp", "out_of_place_copy"]

_DROPOUT_FN_TO_MODULE = {"dropout": nn.Dropout, "dropout1d": nn.Dropout1d, "dropout2d": nn.Dropout2d,
                         "dropout3d": nn.Dropout3d, "alpha_dropout": nn.AlphaDropout}


class NodeOp(nn.Module):
    """A function or tensor method from the original graph, applied to one tensor.

    ``args``/``kwargs`` are the original node's, with the tensor operand replaced by ``None`` at
    position ``slot``.
    """

    def __init__(self, op: str, target: Any, args: tuple, kwargs: dict, slot: int = 0) -> None:
        super().__init__()
        self.op, self.target, self.args, self.kwargs, self.slot = op, target, args, kwargs, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.slot] = x
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **self.kwargs)
        return self.target(*args, **self.kwargs)

    @property
    def draws_random(self) -> bool:
        """Whether the wrapped function may draw random numbers (the runtime then replays them)."""
        name = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", "")
        return name_draws_random(name)

    def extra_repr(self) -> str:
        name = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", self.target)
        rest = [repr(a) for i, a in enumerate(self.args) if i != self.slot]
        rest += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return ", ".join([str(name)] + rest)


@dataclass(frozen=True)
class BranchSpec:
    """A branch as a layer chain: for each node, its kind and its (input, output) channel counts,
    and whether each count is *outer* (the block's width, halved by the split) or *inner*."""

    nodes: tuple[str, ...]
    kinds: tuple[str, ...]
    channels: tuple[tuple[int, int], ...]
    outer: tuple[tuple[bool, bool], ...]
    modules: tuple[nn.Module | None, ...]  # the called module of each node (None for functions)
    params: int  # parameters of the original branch


def branch_spec(gm: fx.GraphModule, block: ResidualBlock) -> BranchSpec:
    nodes = {n.name: n for n in gm.graph.nodes}
    chain = [nodes[n] for n in block.branch]
    kinds = tuple(op_kind(gm, n) or "unsupported" for n in chain)
    conv_pos = [i for i, k in enumerate(kinds) if k == "conv"]
    first, last = (conv_pos[0], conv_pos[-1]) if conv_pos else (len(chain), -1)
    channels, outer = [], []
    prev = nodes[block.fork].meta["val"].shape[1]
    for i, n in enumerate(chain):
        out = n.meta["val"].shape[1]
        channels.append((prev, out))
        # Before the first conv and after the last one the tensor has the block's (outer) width.
        outer.append((i <= first, i < first or i >= last))
        prev = out
    params = 0
    for n in chain:
        if n.op == "call_module":
            params += sum(p.numel() for p in gm.get_submodule(n.target).parameters())
    modules = tuple(gm.get_submodule(n.target) if n.op == "call_module" else None for n in chain)
    return BranchSpec(tuple(block.branch), kinds, tuple(channels), tuple(outer), modules, params)


def _align(spec: BranchSpec) -> int:
    """Inner widths must be multiples of every group count that acts on them."""
    align = 1
    for mod, (o_in, o_out) in zip(spec.modules, spec.outer):
        if isinstance(mod, CONV_TYPES) and mod.groups > 1 and not _depthwise(mod) and not (o_in and o_out):
            align = math.lcm(align, mod.groups)
        if isinstance(mod, nn.GroupNorm) and not o_in:
            align = math.lcm(align, mod.num_groups)
    return align


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _new_width(c: int, is_outer: bool, half: int, scale: float, align: int) -> int:
    if is_outer:
        return half
    return max(align, int(round(c * scale / align)) * align)


def _widths(spec: BranchSpec, half: int, scale: float, align: int) -> list[tuple[int, int]]:
    """New (input, output) channel counts of every branch op, propagated along the chain so they
    always agree: a conv sets the width (outer -> half, inner -> scaled), a depthwise conv keeps it,
    every other op passes it through."""
    widths, cur = [], half
    for mod, (_, c_out), (_, o_out) in zip(spec.modules, spec.channels, spec.outer):
        kind = mod.type if isinstance(mod, _Desc) else type(mod)
        if mod is not None and issubclass(kind, CONV_TYPES):
            out = cur if _depthwise(mod) else _new_width(c_out, o_out, half, scale, align)
        else:
            out = cur
        widths.append((cur, out))
        cur = out
    return widths


def _count_params(spec: BranchSpec, half: int, scale: float, align: int) -> int:
    total = 0
    for mod, (w_in, w_out) in zip(spec.modules, _widths(spec, half, scale, align)):
        if mod is None:
            continue
        kind = mod.type if isinstance(mod, _Desc) else type(mod)
        if issubclass(kind, CONV_TYPES):
            groups = w_in if _depthwise(mod) else mod.groups
            total += w_in // groups * w_out * math.prod(mod.kernel_size) + (w_out if mod.bias is not None else 0)
        elif issubclass(kind, _NORMS):
            total += 2 * w_out if mod.affine else 0
        else:
            total += mod.other_params if isinstance(mod, _Desc) else sum(p.numel() for p in mod.parameters())
    return total


def choose_scale(spec: BranchSpec, half: int, width: str | float, multiple: int = 1) -> tuple[float, int]:
    """The inner-width scale (and alignment) for F and G.

    ``width="match-params"`` picks the scale whose two residual functions together have the
    parameter count closest to the original branch; ``"keep"`` keeps inner widths; a number scales
    them by that factor. Inner widths are multiples of ``multiple`` (hardware likes channel counts
    that are multiples of 8: tensor cores, CPU kernels blocking channels by 8 or 16) and of every
    group count acting on them; where rounding to ``multiple`` would move a matched coupling more
    than 10% away from the block's parameters, only the group counts are honoured.
    """
    groups = _align(spec)
    align = math.lcm(groups, max(1, multiple))
    if width == "keep":
        return 1.0, groups
    if not isinstance(width, str):
        return float(width), align
    signature = _signature(spec)
    scale = _match_params(signature, half, align)
    if align != groups and abs(2 * _count_params(spec, half, scale, align) - spec.params) > 0.10 * spec.params:
        return _match_params(signature, half, groups), groups
    return scale, align


def _signature(spec: BranchSpec) -> tuple:
    """Everything the parameter count depends on; blocks of one stage share it."""
    def desc(m: nn.Module | None) -> tuple:
        if m is None:
            return ()
        return (type(m), getattr(m, "kernel_size", None), getattr(m, "groups", None),
                getattr(m, "bias", None) is not None, getattr(m, "affine", None),
                getattr(m, "in_channels", None), getattr(m, "out_channels", None),
                sum(p.numel() for p in m.parameters()) if not isinstance(m, CONV_TYPES + _NORMS) else None)
    return (spec.channels, spec.outer, spec.params, tuple(desc(m) for m in spec.modules))


@functools.lru_cache(maxsize=256)
def _match_params(signature: tuple, half: int, align: int) -> float:
    spec = _SpecView(signature)
    target = signature[2]
    best = (math.inf, 1.0)
    for i in range(1, 801):  # scales 0.005 .. 4.0; two cheap integer sums per candidate
        s = i / 200
        err = abs(2 * _count_params(spec, half, s, align) - target)
        if err < best[0]:
            best = (err, s)
    return best[1]


class _SpecView:
    """Just enough of a BranchSpec, rebuilt from a signature, for :func:`_count_params`."""

    def __init__(self, signature: tuple) -> None:
        self.channels, self.outer = signature[0], signature[1]
        self.modules = tuple(_Desc(d) if d else None for d in signature[3])


class _Desc:
    def __init__(self, d: tuple) -> None:
        self.type, self.kernel_size, self.groups, has_bias, self.affine, self.in_channels, \
            self.out_channels, self.other_params = d
        self.bias = 0 if has_bias else None


def _init_conv(conv: nn.Module) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _rebuild(gm: fx.GraphModule, node: fx.Node, w_in: int, w_out: int, first: bool) -> nn.Module:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, CONV_TYPES):
            groups = w_in if _depthwise(mod) else mod.groups
            new = nn.utils.skip_init(type(mod), w_in, w_out, mod.kernel_size, stride=1, padding=mod.padding,
                                     dilation=mod.dilation, groups=groups, bias=mod.bias is not None,
                                     padding_mode=mod.padding_mode, device=mod.weight.device,
                                     dtype=mod.weight.dtype)
            _init_conv(new)  # skip_init: initialise once, the torchvision way
            return new
        if isinstance(mod, nn.GroupNorm):
            new = nn.GroupNorm(mod.num_groups, w_out, eps=mod.eps, affine=mod.affine)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            new = type(mod)(w_out, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                            track_running_stats=mod.track_running_stats)
        else:
            # The first op reads the caller's half; it must never overwrite it.
            return out_of_place_copy(gm, node) if first else copy.deepcopy(mod)
        ref = next(iter(mod.parameters()), None)
        if ref is None:
            ref = next((b for b in mod.buffers() if b.is_floating_point()), None)
        return new if ref is None else new.to(dtype=ref.dtype, device=ref.device)
    # functional forms
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and name in _DROPOUT_FN_TO_MODULE:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return _DROPOUT_FN_TO_MODULE[name](p)  # module form follows train/eval, unlike a traced flag
    return _node_op(node, out_of_place=first)


def _node_op(node: fx.Node, *, out_of_place: bool) -> NodeOp:
    """``node``'s function or method as a module; ``out_of_place`` swaps ``relu_`` for ``relu``
    and drops ``inplace=True``."""
    slot = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node))
    args = tuple(None if i == slot else a for i, a in enumerate(node.args))
    kwargs = dict(node.kwargs)
    target = node.target
    if out_of_place:
        name = getattr(target, "__name__", str(target))
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        if node.op == "call_method" and name.endswith("_"):
            target = name[:-1]
        elif node.op == "call_function" and name.endswith("_") and hasattr(torch, name[:-1]):
            target = getattr(torch, name[:-1])
    return NodeOp(node.op, target, args, kwargs, slot)


def out_of_place_copy(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """A fresh module applying ``node``'s element-wise op without overwriting its input (the
    activation moved to the front of F and G, or applied at a segment's exit)."""
    if node.op == "call_module":
        mod = copy.deepcopy(gm.get_submodule(node.target))
        if getattr(mod, "inplace", False):
            mod.inplace = False
        return mod
    return _node_op(node, out_of_place=True)


def build_residual_function(gm: fx.GraphModule, block: ResidualBlock, spec: BranchSpec, *,
                            scale: float, align: int, pre_activation: nn.Module | None,
                            zero_init: bool) -> nn.Sequential:
    """One residual function (F or G) for ``block``: ``[pre_activation,] *rebuilt branch layers``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    half = by_name[block.fork].meta["val"].shape[1] // 2
    layers: list[nn.Module] = []
    if pre_activation is not None:  # out of place already (out_of_place_copy); F and G each own one
        layers.append(copy.deepcopy(pre_activation))
    for name, (w_in, w_out) in zip(spec.nodes, _widths(spec, half, scale, align)):
        layers.append(_rebuild(gm, by_name[name], w_in, w_out, first=not layers))
    if zero_init:
        _zero_last(layers)
    return nn.Sequential(*layers)


def _zero_last(layers: list[nn.Module]) -> None:
    """Start the residual function at zero so the coupling starts as the identity map."""
    convs = [i for i, m in enumerate(layers) if isinstance(m, CONV_TYPES)]
    if not convs:
        return
    norms = [m for m in layers[convs[-1]:] if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
             and m.affine]
    if norms:
        nn.init.zeros_(norms[-1].weight)
    else:
        nn.init.zeros_(layers[convs[-1]].weight)
        if layers[convs[-1]].bias is not None:
            nn.init.zeros_(layers[convs[-1]].bias)

