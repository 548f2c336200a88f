"""Channel surgery: rebuild a residual block's branch as the F and G of a reversible coupling.

The branch may be any graph the channel propagation (:mod:`revconvert.analysis.channels`) can
follow: chains of convolutions and norms, squeeze-excitation gates, channels-last MLPs with
``permute``/``LayerNorm``/``Linear``, layer scale, stochastic depth. F and G copy that graph at new
widths: the outer width is half the block's channels (the coupling's split), inner widths are
scaled by one factor chosen so that F and G together have about as many parameters as the branch.
Every module is rebuilt by copying it and resizing its parameters, buffers and width attributes,
so all its other settings (activation, eps, momentum, padding, drop rate) are kept. A chain of
layers becomes an ``nn.Sequential``, any other graph an ``fx.GraphModule``.

The activation that followed the original addition (``relu(x + B(x))``) is not invertible: it
moves to the front of F and G (pre-activation style).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..analysis.channels import OUTER, ChannelPlan, ModulePlan, param_expression, resolve_attr
from ..analysis.graph import ResidualBlock
from ..analysis.ops import mutated_inputs, zero_init_ends
from ..analysis.propagation import REWRITABLE_RESHAPES
from ..errors import ConversionError
from ..runtime._state import name_draws_random

__all__ = ["Widths", "alignments", "choose_widths", "build_residual_function", "NodeOp", "out_of_place_copy"]

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
class Widths:
    """The widths chosen for one block's F and G.

    Attributes:
        groups: new width of every width group of the plan.
        scale: the factor applied to inner widths.
        params: parameters of the residual functions rebuilt from the block (F and G together, or
            the one function of a paired coupling).
        target: parameters of the original branch.
    """

    groups: dict[int, int]
    scale: float
    params: int
    target: int

    @property
    def ratio(self) -> float:
        return self.params / max(self.target, 1)


def choose_widths(plan: ChannelPlan, width: str | float, multiple: int = 1, functions: int = 2) -> Widths:
    """The widths of the residual functions rebuilt from the block of ``plan``.

    ``functions`` is how many functions the block becomes: 2 (F and G of its own coupling), or 1 (F
    or G of a coupling shared with the next block, ``ConvertConfig(pair_blocks=True)``).
    ``width="match-params"`` picks the inner-width scale whose ``functions`` residual functions
    together have the parameter count closest to the original branch; ``"keep"`` keeps inner widths; a number
    scales them by that factor. Inner widths are multiples of every group count acting on them and
    of the coarsest of ``multiple``, ``multiple // 2``, ... (down to 1) that keeps the coupling within
    10% of the parameters it aims at (the branch's, or the unrounded factor's): convolution kernels
    run fastest on channel counts that are multiples of 32 (``benchmarks/widths.py``: a 3x3
    convolution at 192 channels does about 10% more FLOP/s than at 200 on this project's CPU), and
    a narrow block that cannot be rounded that coarsely still gets multiples of 16 or 8. A branch
    without inner widths (one convolution) cannot be matched: its coupling has about half the
    parameters, which :func:`revconvert.convert` reports.
    """
    half = plan.widths[OUTER] // 2
    target = plan.param_count(plan.original_widths)

    def at(p: ChannelPlan, scale: float) -> Widths:
        groups = p.new_widths(half, scale)
        return Widths(groups, scale, functions * p.param_count(groups), target)

    if width == "keep" or not plan.inner_groups:
        return at(plan, 1.0)
    matching = isinstance(width, str)
    goal = target if matching else at(plan, float(width)).params
    for m in alignments(multiple):  # the last, 1, is the group counts alone: taken whatever it misses by
        aligned = dataclasses.replace(plan, align={**plan.align, **{
            g: math.lcm(plan.align.get(g, 1), m) for g in plan.inner_groups}})
        widths = at(aligned, _best_scale(*_key(aligned), functions) if matching else float(width))
        if abs(widths.params / max(goal, 1) - 1) <= 0.10:
            break
    return widths


def alignments(multiple: int) -> list[int]:
    """``multiple``, then halved while it stays a whole number above 1 (32, 16, 8, 4, 2), then 1."""
    out = [max(1, multiple)]
    while out[-1] > 1 and out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return out if out[-1] == 1 else [*out, 1]


def _key(plan: ChannelPlan) -> tuple:
    return (tuple(sorted(plan.widths.items())), tuple(sorted(plan.align.items())), plan.counted,
            tuple(sorted(plan.derived.items())))


@functools.lru_cache(maxsize=256)
def _best_scale(widths: tuple, align: tuple, counted: tuple, derived: tuple, functions: int = 2) -> float:
    """The scale whose ``functions`` residual functions together come closest to the branch's
    parameters; blocks of one stage share the answer (cached on everything the count depends on)."""
    plan = ChannelPlan(axis=1, widths=dict(widths), align=dict(align), counted=counted, derived=dict(derived))
    half, target = plan.widths[OUTER] // 2, plan.param_count(plan.original_widths)
    best, best_err = 1.0, abs(functions * plan.param_count(plan.new_widths(half, 1.0)) - target)
    for i in range(1, 801):  # scales 0.005 .. 4.0; a parameter count is a few integer products
        err = abs(functions * plan.param_count(plan.new_widths(half, i / 200)) - target)
        if err < best_err:
            best, best_err = i / 200, err
    return best


# -- rebuilding modules ------------------------------------------------------------------------

def _resize(mod: nn.Module, plan: ModulePlan, widths: Widths, cplan: ChannelPlan) -> nn.Module:
    """A copy of ``mod`` with its tensors and width attributes at the new widths, freshly initialised."""
    # Copy everything but the tensors about to be replaced (a large conv weight need not be copied).
    memo: dict[int, Any] = {}
    for name, _ in plan.tensors:
        old = mod.get_parameter(name) if name in dict(mod.named_parameters()) else mod.get_buffer(name)
        memo[id(old)] = nn.Parameter(old.new_empty(0), requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else old.new_empty(0)
    new = copy.deepcopy(mod, memo)
    g = widths.groups
    for name, template in plan.tensors:
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path)
        old = mod.get_submodule(owner_path)._parameters.get(leaf)
        old = old if old is not None else mod.get_submodule(owner_path)._buffers[leaf]
        fresh = _filled(old, cplan.size(template, g))
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(leaf, fresh, persistent=leaf not in owner._non_persistent_buffers_set)
    for path, attr, group in plan.attrs:
        sub = new.get_submodule(path)
        value = getattr(sub, attr)
        setattr(sub, attr, type(value)([g[group]]) if isinstance(value, (tuple, list)) else g[group])
    if plan.kind == "conv":
        if new.groups > 1 and plan.in_group == plan.out_group:  # depthwise stays depthwise
            new.groups = g[plan.in_group]
        new.in_channels, new.out_channels = g[plan.in_group], g[plan.out_group]
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    elif plan.kind == "linear":
        new.in_features, new.out_features = g[plan.in_group], g[plan.out_group]
        new.reset_parameters()
    elif plan.tensors:  # a norm and kin: its own initialisation (weight 1, bias 0, fresh statistics)
        for sub in new.modules():
            owns = any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False))
            if owns and callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
    for name, template in plan.tensors:  # a reset_parameters that reads another width attribute
        t = new.get_parameter(name) if name in dict(new.named_parameters()) else new.get_buffer(name)
        if tuple(t.shape) != cplan.size(template, g):
            raise ConversionError(f"cannot rebuild {type(mod).__name__} at a new width: after resizing, its "
                                  f"{name} has shape {tuple(t.shape)} instead of {cplan.size(template, g)} (its "
                                  f"reset_parameters reads a width attribute revconvert does not know); "
                                  f"keep the block stored with ConvertConfig(select=...)")
    return new


def _filled(old: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``size`` filled with the mean of ``old`` (a constant such as layer scale's 1e-6 or a
    norm's weight 1 stays that constant); tensor ops only, so meta tensors work too."""
    with torch.no_grad():
        if old.is_floating_point() and old.numel():
            value = old.detach().mean()
        else:
            value = torch.zeros((), dtype=old.dtype, device=old.device)
        return value.expand(size).clone()


def out_of_place_copy(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """A fresh module applying ``node``'s element-wise op without overwriting its input (the
    activation moved to the front of F and G, or applied at a segment's exit)."""
    if node.op == "call_module":
        mod = copy.deepcopy(gm.get_submodule(node.target))
        if getattr(mod, "inplace", False):
            mod.inplace = False
        return mod
    return _node_op(node, out_of_place=True)


def _node_op(node: fx.Node, *, out_of_place: bool) -> NodeOp:
    """``node``'s function or method as a module; ``out_of_place`` swaps ``relu_`` for ``relu``
    and drops ``inplace=True``."""
    slot = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node))
    args = tuple(None if i == slot else a for i, a in enumerate(node.args))
    op, target, kwargs = _out_of_place(node) if out_of_place else (node.op, node.target, dict(node.kwargs))
    return NodeOp(op, target, args, kwargs, slot)


def _out_of_place(node: fx.Node) -> tuple[str, Any, dict]:
    kwargs = dict(node.kwargs)
    target = node.target
    name = getattr(target, "__name__", str(target))
    if kwargs.get("inplace"):
        kwargs["inplace"] = False
    if node.op == "call_method" and name.endswith("_"):
        target = name[:-1]
    elif node.op == "call_function" and name.startswith("__i") and name.endswith("__"):
        target = getattr(operator, name[3:-2], target)
    elif node.op == "call_function" and name.endswith("_") and hasattr(torch, name[:-1]):
        target = getattr(torch, name[:-1])
    return node.op, target, kwargs


def _dropout_module(node: fx.Node) -> nn.Module | None:
    """A traced ``F.dropout(x, p, training=...)`` froze the training flag; its module form follows
    the coupling's train/eval mode."""
    name = getattr(node.target, "__name__", "")
    if node.op != "call_function" or name not in _DROPOUT_FN_TO_MODULE:
        return None
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return _DROPOUT_FN_TO_MODULE[name](p)


# -- building F and G --------------------------------------------------------------------------

def _local(target: str, owner: str | None) -> str:
    if owner and target.startswith(owner + "."):
        return target[len(owner) + 1:]
    return target


def build_residual_function(gm: fx.GraphModule, block: ResidualBlock, plan: ChannelPlan, widths: Widths, *,
                            pre_activation: nn.Module | None, zero_init: bool) -> nn.Module:
    """One residual function (F or G) for ``block``: ``[pre_activation,] *rebuilt branch``.

    An ``nn.Sequential`` when the branch is a chain of one-input layers, else an ``fx.GraphModule``
    with the branch's graph at the new widths.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    branch = [nodes[n] for n in block.branch]
    inside = set(block.branch)
    # Parameters the branch uses directly, and what is computed from them (``gamma.reshape(...)``).
    extra: dict[str, fx.Node] = {}
    for n in branch:
        stack = [i for i in n.all_input_nodes if i.name not in inside and i.name != block.fork]
        while stack:
            i = stack.pop()
            if i.name not in extra and param_expression(i):
                extra[i.name] = i
                stack += i.all_input_nodes
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    copied = sorted([*extra.values(), *branch], key=lambda n: order[n.name])

    graph = fx.Graph()
    root: dict[str, Any] = {}
    x = graph.placeholder("x")
    env: dict[str, fx.Node] = {block.fork: x}
    if pre_activation is not None:  # out of place already (out_of_place_copy); F and G each own one
        root["pre_activation"] = copy.deepcopy(pre_activation)
        env[block.fork] = graph.call_module("pre_activation", (x,))
    reads_input = {block.fork} if pre_activation is None else set()
    for n in copied:
        args = fx.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.map_arg(n.kwargs, lambda a: env[a.name])
        overwrites_input = any(m.name in reads_input for m in mutated_inputs(gm, n))
        if n.op == "get_attr":
            tensor = resolve_attr(gm, str(n.target))
            template = plan.attrs.get(str(n.target))
            new = tensor.detach().clone()
            if template is not None:  # a per-channel parameter at the new width, filled with its mean
                new = _filled(tensor, plan.size(template, widths.groups))
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            target = _local(str(n.target), block.owner)
            root[target] = new
            env[n.name] = graph.get_attr(target)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            new_mod = _resize(mod, plan.modules[n.name], widths, plan)
            if overwrites_input and getattr(new_mod, "inplace", False):
                new_mod.inplace = False  # F and G must not overwrite the coupling's input half
            target = _local(str(n.target), block.owner)
            root[target] = new_mod
            env[n.name] = graph.call_module(target, args, kwargs)
        elif _dropout_module(n) is not None:
            target = f"dropout_{n.name}"
            root[target] = _dropout_module(n)
            env[n.name] = graph.call_module(target, (args[0],))
        else:
            if n.name in extra:
                args = width_free_reshape(gm, n, plan, args)
            if n.name in plan.whole_slices:  # x[:, :n] keeping every channel: n would not follow
                args = (args[0], _whole_channels(args[1], plan.axis))
            if n.name in plan.splits:  # the pieces at their new widths
                args, kwargs = _split_sizes(args, kwargs, [widths.groups[g] for g in plan.splits[n.name]])
            op, fn, kwargs = _out_of_place(n) if overwrites_input else (n.op, n.target, kwargs)
            if op == "call_method":
                env[n.name] = graph.call_method(fn, args, kwargs)
            else:
                env[n.name] = graph.call_function(fn, args, kwargs)
        env[n.name].meta.update(source=n.name, val=n.meta.get("val"))
    graph.output(env[block.branch_output])
    fn = fx.GraphModule(root, graph, class_name="ResidualFunction")
    fn.train(gm.training)  # containers and function wrappers follow the model; copies keep their own
    for n in copied:
        if n.op == "call_module":
            fn.get_submodule(_local(str(n.target), block.owner)).train(gm.get_submodule(n.target).training)
    fn.graph.lint()
    if zero_init:
        _zero_last(fn, env[block.branch_output])
    for n in fn.graph.nodes:  # the original's shapes served the zero-init walk only
        n.meta.pop("val", None)
    return _as_sequential(fn) or fn


def _whole_channels(index: Any, axis: int) -> Any:
    """``index`` (a slice or a tuple of slices) with the slice of dimension ``axis`` made ``:``."""
    if isinstance(index, slice):
        return slice(None) if axis == 0 else index
    return tuple(slice(None) if i == axis else s for i, s in enumerate(index))


def _split_sizes(args: tuple, kwargs: dict, sizes: list[int]) -> tuple[tuple, dict]:
    """A split's arguments with its sizes (``split_size_or_sections``, positional or not) replaced."""
    for key in ("split_size_or_sections", "split_size"):
        if key in kwargs:
            return args, {**kwargs, key: sizes}
    return (args[0], sizes, *args[2:]), kwargs


def width_free_reshape(gm: fx.GraphModule, node: fx.Node, plan: ChannelPlan, args: tuple) -> tuple:
    """``args`` of a reshape of a resized per-channel parameter with its written-out channel count
    as -1 (``scale.view(320, 1, 1)`` -> ``view(-1, 1, 1)``), which the new width then fills; the
    propagation allows one such count per reshape (``REWRITABLE_RESHAPES``). Other nodes as they are."""
    if node.target not in REWRITABLE_RESHAPES or not node.all_input_nodes:
        return args
    root = node.all_input_nodes[0]
    while root.op != "get_attr" and root.all_input_nodes:
        root = root.all_input_nodes[0]
    template = plan.attrs.get(str(root.target)) if root.op == "get_attr" else None
    if template is None:
        return args
    tensor = resolve_attr(gm, str(root.target))
    widths = {tensor.shape[i] for i, d in enumerate(template) if not isinstance(d, int)}

    def free(a: Any) -> Any:
        if isinstance(a, (tuple, list)):
            return type(a)(free(x) for x in a)
        return -1 if isinstance(a, int) and not isinstance(a, bool) and a in widths else a
    return (args[0], *(free(a) for a in args[1:]))


def _as_sequential(fn: fx.GraphModule) -> nn.Sequential | None:
    """The graph as an ``nn.Sequential`` when it is a chain of one-tensor layers (easier to read)."""
    layers: list[nn.Module] = []
    prev = None
    for n in fn.graph.nodes:
        if n.op == "placeholder":
            prev = n
            continue
        if n.op == "output":
            return nn.Sequential(*layers) if n.args[0] is prev else None
        tensors = n.all_input_nodes
        if n.op == "get_attr" or tensors != [prev] or len(prev.users) != 1:
            return None
        if n.op == "call_module":
            if len(n.args) != 1 or n.kwargs:
                return None
            layers.append(fn.get_submodule(n.target))
        else:
            layers.append(_node_op(n, out_of_place=False))
        prev = n
    return None


def _zero_last(fn: fx.GraphModule, out: fx.Node) -> None:
    """Start the residual function at zero so the coupling starts as the identity map: zero where
    the walk back from the output ends (:func:`~revconvert.analysis.ops.zero_init_ends`), a module's
    weight and bias (a norm's scale, else the last convolution or Linear) or a parameter (layer
    scale), on every path of a sum or a concatenation. Other parametrised modules are left as
    initialised."""
    for end, _ in zero_init_ends(fn, out):
        if end.op == "get_attr":
            t = resolve_attr(fn, str(end.target))
            if isinstance(t, nn.Parameter):
                nn.init.zeros_(t)
        elif end.op == "call_module":
            mod = fn.get_submodule(end.target)
            if isinstance(getattr(mod, "weight", None), nn.Parameter):
                nn.init.zeros_(mod.weight)
                if isinstance(getattr(mod, "bias", None), nn.Parameter):
                    nn.init.zeros_(mod.bias)
