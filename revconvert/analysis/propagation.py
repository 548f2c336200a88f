"""Following channel widths through a residual branch's fx graph (see :mod:`revconvert.analysis.channels`).

One walk over the branch in graph order gives every tensor a channel axis and a width group: ops are
sorted into a few families (element-wise, broadcasting binary ops, reductions, pooling, permute,
reshape, convolutions, ``Linear``, modules resized by their tensors); anything else stops the walk
with ``unsupported-layer`` and the op's name.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .channels import OUTER, WIDTH_ATTRS, ChannelPlan, Failure, ModulePlan, param_expression, resolve_attr
from .graph import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES, ResidualBlock
from .ops import CONV_TYPES, DROPOUT_TYPES, describe_op

__all__ = ["plan_channels", "REDUCED", "REWRITABLE_RESHAPES"]

_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
                     torch.div, torch.maximum, torch.minimum, operator.pow, torch.pow}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "pow"}
# element-wise over three broadcast operands (timm's GlobalResponseNorm: addcmul(bias, weight, x * n))
_TERNARY_FUNCTIONS = {torch.addcmul, torch.addcdiv}
_TERNARY_METHODS = {"addcmul", "addcdiv", "addcmul_", "addcdiv_"}
_UNARY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout,
                    torch.neg, operator.neg, torch.exp, torch.abs, torch.square, torch.sqrt, torch.rsqrt}
_UNARY_METHODS = {"contiguous", "clone", "neg", "exp", "abs", "square", "sqrt", "rsqrt", "float", "to",
                  "type_as", "detach"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# vector norms over some dimensions (``x.norm(p=2, dim=(1, 2), keepdim=True)``): the dimensions
# and keepdim come third and fourth, after the input and the order
_NORM_FUNCTIONS = {torch.norm, torch.linalg.vector_norm}
_NORM_METHODS = {"norm"}
#: The group of a tensor reduced over the channels with ``keepdim=True`` (a channel mean, as in
#: ConvNeXt-V2's GRN): one channel at every width, which broadcasts; not a width group.
REDUCED = -1
_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.max_pool1d, F.max_pool2d, F.max_pool3d}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk}
_SPLIT_METHODS = {"split", "chunk"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
#: Reshapes of a per-channel parameter whose one written-out channel count is rewritten as -1.
REWRITABLE_RESHAPES = ("view", "reshape", torch.reshape)
_PARAM_FREE_SHAPED = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                      nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.Flatten)
# torch norms that act on dimension 1 and on the last dimension(s); subclasses from other
# libraries (timm's LayerNorm2d normalises dimension 1) are checked by their tensor shapes only.
_CHANNELS_FIRST_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
                         nn.InstanceNorm2d, nn.InstanceNorm3d)


class _Groups:
    """Width groups: free ones, which the rebuild scales, and ones tied to others by a linear form.

    Tying two groups (:meth:`union`) is an equation between their forms over free groups; it is
    solved for the side with the newest free groups, each taking its share of the other side in
    proportion to its original width (two plain groups: the newer one becomes the older one; the
    outer group, whose width is fixed, is never solved for). A split along the channels makes
    pieces that are fixed fractions of their group, a concatenation their sum (:meth:`derived`).
    """

    def __init__(self, outer_width: int) -> None:
        self.width = [outer_width]
        self.alias: dict[int, dict[int, Fraction]] = {}  # group -> its form over other groups

    def new(self, width: int) -> int:
        self.width.append(width)
        return len(self.width) - 1

    def form(self, g: int) -> dict[int, Fraction]:
        """``g``'s width as a form over free groups."""
        if g not in self.alias:
            return {g: Fraction(1)}
        out: dict[int, Fraction] = {}
        for h, c in self.alias[g].items():
            for k, d in self.form(h).items():
                out[k] = out.get(k, Fraction(0)) + c * d
        return {k: c for k, c in out.items() if c}

    def find(self, g: int) -> int:
        """The free group ``g`` equals, if it equals one; else ``g`` (a derived group)."""
        if g == REDUCED or g not in self.alias:
            return g
        form = self.form(g)
        if len(form) == 1:
            (h, c), = form.items()
            if c == 1:
                return h
        return g

    def derived(self, form: dict[int, Fraction], width: int) -> int:
        """A group of ``width`` channels whose width is ``form``: a split piece, a concatenation."""
        form = {h: c for h, c in form.items() if c}
        if len(form) == 1 and next(iter(form.values())) == 1:
            return next(iter(form))
        g = self.new(width)
        self.alias[g] = form
        return g

    def union(self, a: int, b: int) -> None:
        diff = self.form(a)
        for h, c in self.form(b).items():
            diff[h] = diff.get(h, Fraction(0)) - c
        diff = {h: c for h, c in diff.items() if c}
        if not diff:
            return
        pos = {h: c for h, c in diff.items() if c > 0}
        neg = {h: -c for h, c in diff.items() if c < 0}
        sides = [side for side in (pos, neg) if side and OUTER not in side]
        solve = max(sides, key=max) if sides else None
        rest = neg if solve is pos else pos
        if solve is None or not rest:
            raise _Stop("unsupported-layer", "channel groups whose widths cannot be tied")
        total = sum(c * self.width[h] for h, c in solve.items())
        for h in solve:
            self.alias[h] = {k: Fraction(self.width[h]) / total * v for k, v in rest.items()}


class _Stop(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise _Stop("unsupported-layer", f"{node.name} is not a tensor")
    return tuple(v.shape)


def _dims(arg: object, ndim: int) -> tuple[int, ...] | None:
    if arg is None:
        return None
    items = arg if isinstance(arg, (tuple, list)) else (arg,)
    return tuple(int(d) % ndim for d in items)


class _Propagation:
    def __init__(self, gm: fx.GraphModule, block: ResidualBlock, nodes: dict[str, fx.Node], axis: int) -> None:
        self.gm, self.block, self.nodes = gm, block, nodes
        fork = nodes[block.fork]
        shape = _shape(fork)
        self.groups = _Groups(shape[axis])
        # node name -> (axis, group) of its channels; None for non-tensors (shape reads)
        self.info: dict[str, tuple[int, int] | None] = {fork.name: (axis, OUTER)}
        self.modules: dict[str, tuple[str, int, int, tuple, tuple]] = {}
        self.attrs: dict[str, tuple] = {}
        self.align: list[tuple[int, int]] = []
        self.pieces: dict[str, list[tuple[int, int]]] = {}  # split node -> (axis, group) of each piece
        self.splits: dict[str, list[int]] = {}  # split along the channels -> its pieces' groups
        self.whole_slices: list[str] = []  # x[:, :n] keeping every channel, n written out
        self.axis = axis

    # -- helpers ----------------------------------------------------------------------------
    def channel(self, node: fx.Node) -> tuple[int, int]:
        if node.op == "get_attr":
            raise _Stop("unsupported-layer", f"parameter {node.target} used as an operation input")
        info = self.info.get(node.name)
        if info is None:
            raise _Stop("unsupported-layer", f"{node.name} has no channel axis")
        return info

    def width(self, node: fx.Node) -> int:
        axis, _ = self.channel(node)
        return _shape(node)[axis]

    def first(self, node: fx.Node) -> fx.Node:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node):
            raise _Stop("unsupported-layer", f"{node.name} has no tensor input")
        return arg

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for name in self.block.branch:
            node = self.nodes[name]
            try:
                self.info[name] = self.visit(node)
            except _Stop as stop:
                raise _Located(stop.code, name, stop.detail) from None
        out = self.nodes[self.block.branch_output]
        axis, group = self.channel(out)
        if group == REDUCED:
            raise _Located("unsupported-layer", out.name, "the branch output is reduced over the channels")
        if axis != self.axis:
            raise _Located("unsupported-layer", out.name, f"the branch output's channels are on dimension "
                                                         f"{axis}, not {self.axis}")
        try:
            self.groups.union(group, OUTER)
        except _Stop as stop:
            raise _Located(stop.code, out.name, stop.detail) from None

    def visit(self, node: fx.Node) -> tuple[int, int] | None:
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op == "get_attr":
            return None
        fn = node.target
        is_fn, is_method = node.op == "call_function", node.op == "call_method"
        tensors = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if (is_fn and fn in _SPLIT_FUNCTIONS) or (is_method and fn in _SPLIT_METHODS):
            return self.visit_split(node)
        if is_fn and fn is operator.getitem and isinstance(node.args[0], fx.Node) and \
                node.args[0].name in self.pieces and isinstance(node.args[1], int):
            return self.pieces[node.args[0].name][node.args[1]]
        if is_fn and fn in _CAT_FUNCTIONS:
            return self.visit_cat(node)
        if is_fn and fn is operator.getitem and isinstance(node.args[1], (tuple, slice)):
            return self.visit_slice(node)
        if not isinstance(_val(node), torch.Tensor):
            return None  # a shape read: re-evaluated at the new width by the rebuilt graph
        if (is_fn and fn in ACTIVATION_FUNCTIONS | _UNARY_FUNCTIONS) or \
                (is_method and fn in ACTIVATION_METHODS | _UNARY_METHODS):
            if len(tensors) != 1:
                return self.visit_binary(node, tensors)
            return self.same(node, tensors[0])
        if (is_fn and fn in _BINARY_FUNCTIONS) or (is_method and fn in _BINARY_METHODS):
            if len(tensors) == 1 and tensors[0].op != "get_attr":
                self.no_literal_width(node, tensors[0])
                return self.same(node, tensors[0])  # arithmetic with a number
            return self.visit_binary(node, tensors)
        if (is_fn and fn in _TERNARY_FUNCTIONS) or (is_method and fn in _TERNARY_METHODS):
            return self.visit_binary(node, tensors)
        if (is_fn and fn in _REDUCE_FUNCTIONS) or (is_method and fn in _REDUCE_METHODS):
            return self.visit_reduce(node, 1)
        if (is_fn and fn in _NORM_FUNCTIONS) or (is_method and fn in _NORM_METHODS):
            return self.visit_reduce(node, 2)
        if is_fn and fn in _POOL_FUNCTIONS:
            return self.channels_kept(node, self.first(node), need_axis=1)
        if (is_fn and fn in (torch.permute,)) or (is_method and fn == "permute"):
            return self.visit_permute(node)
        if (is_fn and fn in _RESHAPE_FUNCTIONS) or (is_method and fn in _RESHAPE_METHODS):
            return self.visit_reshape(node)
        raise _Stop("unsupported-layer", describe_op(self.gm, node))

    def same(self, node: fx.Node, inp: fx.Node) -> tuple[int, int]:
        info = self.channel(inp)
        if _shape(node) != _shape(inp):
            return self.channels_kept(node, inp)
        return info

    def channels_kept(self, node: fx.Node, inp: fx.Node, need_axis: int | None = None) -> tuple[int, int]:
        axis, group = self.channel(inp)
        out, shape = _shape(node), _shape(inp)
        if need_axis is not None and axis != need_axis:
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} acts on dimension {need_axis}, "
                                             f"the channels are on dimension {axis}")
        if len(out) != len(shape) or out[axis] != shape[axis]:
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} changes the channel dimension "
                                             f"({shape} -> {out})")
        return axis, group

    def no_literal_width(self, node: fx.Node, inp: fx.Node) -> None:
        """A literal equal to the channel count would not follow the new width (``view(-1, 64)``)."""
        width = self.width(inp)
        literals = [a for a in node.args[1:] if isinstance(a, int) and not isinstance(a, bool)]
        literals += [d for a in node.args[1:] if isinstance(a, (tuple, list)) for d in a if isinstance(d, int)]
        if width > 1 and width in literals and node.target not in (operator.mul, operator.truediv, "mul", "div",
                                                                   operator.pow, torch.pow, "pow"):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} has the channel count {width} "
                                             f"written into its arguments")

    # -- modules ----------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, mod: nn.Module) -> tuple[int, int]:
        if not isinstance(_val(node), torch.Tensor):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} (its output is not one tensor)")
        inp = self.first(node)
        axis, group = self.channel(inp)
        shape, out = _shape(inp), _shape(node)
        name = describe_op(self.gm, node)
        if group == REDUCED:
            if list(mod.parameters()) or list(mod.buffers()) or out != shape or len(node.all_input_nodes) != 1:
                raise _Stop("unsupported-layer", f"{name} acts on a tensor reduced over the channels")
            self.modules[node.name] = ("copy", group, group, (), ())
            return axis, group
        if isinstance(mod, (*CONV_TYPES, nn.Linear)):
            other = [n for n, _ in [*mod.named_parameters(), *mod.named_buffers()] if n not in ("weight", "bias")]
            if other:  # e.g. a scaled weight-standardised conv's gain: not resized with the weight
                raise _Stop("unsupported-layer", f"{name} has tensors besides weight and bias ({', '.join(other)})")
        if isinstance(mod, CONV_TYPES):
            if axis != 1:
                raise _Stop("unsupported-layer", f"{name} convolves dimension 1, the channels are on {axis}")
            if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
                k = tuple(mod.kernel_size)
                tensors = [("weight", ((group, 1), 1) + k)] + ([("bias", ((group, 1),))] if mod.bias is not None
                                                                else [])
                self.modules[node.name] = ("conv", group, group, tuple(tensors), ())
                return axis, group
            if mod.groups > 1 and mod.groups == mod.in_channels:
                raise _Stop("unsupported-layer", f"{name} is depthwise with a channel multiplier")
            new = self.groups.new(out[1])
            if mod.groups > 1:
                self.align += [(group, mod.groups), (new, mod.groups)]
            k = tuple(mod.kernel_size)
            tensors = [("weight", ((new, 1), (group, mod.groups)) + k)]
            tensors += [("bias", ((new, 1),))] if mod.bias is not None else []
            self.modules[node.name] = ("conv", group, new, tuple(tensors), ())
            return axis, new
        if isinstance(mod, nn.Linear):
            if axis != len(shape) - 1:
                raise _Stop("unsupported-layer", f"{name} acts on the last dimension, the channels are on {axis}")
            new = self.groups.new(out[-1])
            tensors = [("weight", ((new, 1), (group, 1)))] + ([("bias", ((new, 1),))] if mod.bias is not None else [])
            self.modules[node.name] = ("linear", group, new, tuple(tensors), ())
            return axis, new
        tensors = list(mod.named_parameters()) + list(mod.named_buffers())
        if not tensors:
            if len(node.all_input_nodes) != 1:
                raise _Stop("unsupported-layer", f"{name} takes {len(node.all_input_nodes)} inputs")
            if not isinstance(mod, (*ACTIVATION_MODULES, *DROPOUT_TYPES, nn.Identity, *_PARAM_FREE_SHAPED)) and \
                    out != shape:
                raise _Stop("unsupported-layer", f"{name} changes the tensor shape ({shape} -> {out})")
            if isinstance(mod, nn.Flatten):
                return self.visit_reshape(node)
            self.channels_kept(node, inp, need_axis=1 if isinstance(mod, _PARAM_FREE_SHAPED) else None)
            self.modules[node.name] = ("copy", group, group, (), self.width_attrs(mod, shape[axis], group, name))
            return axis, group
        # A module whose only width-dependence is its parameters and buffers: resized copy.
        if len(node.all_input_nodes) != 1 or out != shape:
            raise _Stop("unsupported-layer", name)
        if isinstance(mod, _CHANNELS_FIRST_NORMS) and axis != 1:
            raise _Stop("unsupported-layer", f"{name} normalises dimension 1, the channels are on {axis}")
        if type(mod) is nn.LayerNorm and (axis != len(shape) - 1 or len(mod.normalized_shape) != 1):
            raise _Stop("unsupported-layer", f"{name} normalises {tuple(mod.normalized_shape)} at the end, "
                                             f"the channels are dimension {axis} of {shape}")
        width = shape[axis]
        templates = []
        for tname, t in tensors:
            if t.dim() and not all(d in (width, 1) for d in t.shape):
                raise _Stop("unsupported-layer", f"{name} cannot be rebuilt at a new width: its tensor {tname} "
                                                 f"has shape {tuple(t.shape)} for {width} channels")
            templates.append((tname, tuple((group, 1) if d == width and d != 1 else d for d in t.shape)))
        num_groups = getattr(mod, "num_groups", None)
        if isinstance(num_groups, int) and num_groups > 1:
            self.align.append((group, num_groups))
        self.modules[node.name] = ("resize", group, group, tuple(templates),
                                   self.width_attrs(mod, width, group, name))
        return axis, group

    def width_attrs(self, mod: nn.Module, width: int, group: int, name: str) -> tuple:
        attrs = []
        for path, sub in mod.named_modules():
            for attr in WIDTH_ATTRS:
                value = sub.__dict__.get(attr)
                if value == width or value == (width,) or value == [width]:
                    attrs.append((path, attr, group))
        return tuple(attrs)

    # -- functions --------------------------------------------------------------------------
    def visit_binary(self, node: fx.Node, tensors: list[fx.Node]) -> tuple[int, int]:
        out = _shape(node)
        nd = len(out)
        carriers = []  # (position of the channel axis from the right, group, node)
        for t in tensors:
            if t.op == "get_attr":
                continue
            info = self.info.get(t.name)
            shape = _shape(t)
            if info is None:
                continue
            axis, group = info
            if shape[axis] == 1 and out[nd - len(shape) + axis] != 1:
                continue  # broadcast along the channels
            carriers.append((len(shape) - axis, group, t))
        if not carriers:
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} has no input with channels")
        pos = carriers[0][0]
        for p, g, t in carriers:
            if p != pos:
                raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} combines tensors whose channels "
                                                 f"are on different dimensions")
        # tensors reduced over the channels tie no width (only they may make a one-channel result)
        carriers = [c for c in carriers if c[1] != REDUCED] or carriers
        for p, g, t in carriers:
            self.groups.union(carriers[0][1], g)
        axis, group = nd - pos, carriers[0][1]
        width = out[axis]
        for t in tensors:
            shape = _shape(t)
            if t.op != "get_attr" and self.info.get(t.name) is not None:
                continue
            d = axis - (nd - len(shape))
            if param_expression(t):
                self.per_channel_param(t, d, width, group)
            elif 0 <= d < len(shape) and shape[d] not in (1,) and width > 1:
                raise _Stop("unsupported-layer", f"{t.name} ({shape}) has a size along the channels that "
                                                 f"would not follow a new width")
        return axis, group

    def per_channel_param(self, t: fx.Node, d: int, width: int, group: int) -> None:
        """A parameter used directly (layer scale ``gamma * x``), possibly reshaped on the way."""
        shape = _shape(t)
        root = t
        while root.op != "get_attr":
            shape_only = root.target in (*_RESHAPE_METHODS, *_RESHAPE_FUNCTIONS, *_UNARY_METHODS)
            if len(root.all_input_nodes) != 1 or not shape_only:
                raise _Stop("unsupported-layer",
                            f"{t.name} is computed from parameters by {describe_op(self.gm, root)}")
            literals = [a for a in root.args[1:] if isinstance(a, int)]
            literals += [x for a in root.args[1:] if isinstance(a, (tuple, list)) for x in a if isinstance(x, int)]
            # one size written out (timm's Scale: ``scale.view(dim, 1, 1)``) the rebuilt branch
            # writes as -1 (surgery.width_free_reshape); anything more would not follow the width
            rewritable = root.target in REWRITABLE_RESHAPES and literals.count(width) == 1 and -1 not in literals
            if width > 1 and width in literals and not rewritable:
                raise _Stop("unsupported-layer", f"{describe_op(self.gm, root)} has the channel count {width} "
                                                 f"written into its arguments")
            root = root.all_input_nodes[0]
        param = _shape(root)
        sized = [i for i, s in enumerate(param) if s != 1]
        at_channels = 0 <= d < len(shape) and shape[d] == width
        if sized and (len(sized) != 1 or param[sized[0]] != width or not at_channels or
                      any(s != 1 for i, s in enumerate(shape) if i != d)):
            raise _Stop("unsupported-layer", f"parameter {root.target} of shape {param} is not per channel")
        template = tuple((group, 1) if i in sized and width > 1 else s for i, s in enumerate(param))
        previous = self.attrs.get(str(root.target))
        if previous is not None and previous != template:
            raise _Stop("unsupported-layer", f"parameter {root.target} is used at two widths")
        self.attrs[str(root.target)] = template

    def visit_reduce(self, node: fx.Node, at: int) -> tuple[int, int]:
        """A reduction whose dimensions are argument ``at`` (or ``dim=``) and keepdim the next one.
        Over other dimensions the channels stay; over the channels with ``keepdim=True`` the result
        has one channel at any width (:data:`REDUCED`), which broadcasts back."""
        inp = self.first(node)
        axis, group = self.channel(inp)
        ndim = len(_shape(inp))
        dims = _dims(node.kwargs.get("dim", node.args[at] if len(node.args) > at else None), ndim)
        keep = node.kwargs.get("keepdim", node.args[at + 1] if len(node.args) > at + 1 else False)
        if dims is not None and axis in dims and keep is True:
            return axis, REDUCED
        if dims is None or axis in dims:
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} reduces over the channels")
        return (axis if keep else axis - sum(d < axis for d in dims)), group

    def visit_split(self, node: fx.Node) -> None:
        """``torch.split``/``chunk`` (function or method): along the channels each piece is a fixed
        fraction of the group (the rebuilt split is given the pieces' new widths); along another
        dimension every piece keeps the channels. The pieces are read by ``getitem``."""
        inp = self.first(node)
        axis, group = self.channel(inp)
        shape = _shape(inp)
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        pieces = _val(node)
        if not isinstance(dim, int) or not isinstance(pieces, (tuple, list)) or \
                not all(isinstance(p, torch.Tensor) for p in pieces):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} with arguments it cannot follow")
        if dim % len(shape) != axis:
            self.pieces[node.name] = [(axis, group)] * len(pieces)
            return None
        if group == REDUCED:
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} splits a tensor reduced over the channels")
        width = shape[axis]
        sizes = [p.shape[axis] for p in pieces]
        chunk = node.target in (torch.chunk, "chunk")
        if chunk and width % len(sizes):  # uneven chunks are not fractions that hold at every width
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} makes uneven pieces of {width} channels")
        form = self.groups.form(group)
        groups = [self.groups.derived({h: c * Fraction(n, width) for h, c in form.items()}, n) for n in sizes]
        self.pieces[node.name] = [(axis, g) for g in groups]
        if not chunk:
            self.splits[node.name] = groups
        return None

    def visit_slice(self, node: fx.Node) -> tuple[int, int]:
        """``x[:, :n]`` that keeps every channel (GhostNet's ``out[:, :out_chs]`` after concatenating
        two halves of ``out_chs``): the rebuilt branch keeps them all at the new width (its count
        is dropped from the slice). Slices of other dimensions are kept as they are."""
        inp = self.first(node)
        axis, group = self.channel(inp)
        shape = _shape(inp)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
            raise _Stop("unsupported-layer", describe_op(self.gm, node))
        if axis < len(index):
            cut = index[axis]
            whole = cut.start in (None, 0) and cut.step in (None, 1) and \
                (cut.stop is None or (isinstance(cut.stop, int) and cut.stop >= shape[axis]))
            if not whole:
                raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} takes part of the channels "
                                                 f"({cut.start}:{cut.stop} of {shape[axis]})")
            if cut.stop is not None:
                self.whole_slices.append(node.name)
        return self.channels_kept(node, inp)

    def visit_cat(self, node: fx.Node) -> tuple[int, int]:
        """``torch.cat``: along the channels the result's width is the sum of its parts' (a derived
        group); along another dimension the parts' channels are tied."""
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not isinstance(parts, (tuple, list)) or not parts or not isinstance(dim, int) or \
                not all(isinstance(p, fx.Node) for p in parts):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} with arguments it cannot follow")
        infos = [self.channel(p) for p in parts]
        ndim = len(_shape(node))
        if len({a for a, _ in infos}) != 1 or any(len(_shape(p)) != ndim for p in parts):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} joins tensors whose channels are on "
                                             f"different dimensions")
        axis = infos[0][0]
        if any(g == REDUCED for _, g in infos):
            raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} joins a tensor reduced over the channels")
        if dim % ndim != axis:
            for _, g in infos[1:]:
                self.groups.union(infos[0][1], g)
            return axis, infos[0][1]
        total: dict[int, Fraction] = {}
        for _, g in infos:
            for h, c in self.groups.form(g).items():
                total[h] = total.get(h, Fraction(0)) + c
        return axis, self.groups.derived(total, _shape(node)[axis])

    def visit_permute(self, node: fx.Node) -> tuple[int, int]:
        inp = self.first(node)
        axis, group = self.channel(inp)
        rest = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
        perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        perm = [int(p) % len(_shape(inp)) for p in perm]
        return perm.index(axis), group

    def visit_reshape(self, node: fx.Node) -> tuple[int, int]:
        inp = self.first(node)
        axis, group = self.channel(inp)
        shape, out = _shape(inp), _shape(node)
        if node.op != "call_module":
            self.no_literal_width(node, inp)
        before = math.prod(shape[:axis])
        for b in range(len(out)):
            if math.prod(out[:b]) == before and out[b] == shape[axis]:
                return b, group
        raise _Stop("unsupported-layer", f"{describe_op(self.gm, node)} splits or merges the channel dimension "
                                         f"({shape} -> {out})")

    # -- result -----------------------------------------------------------------------------
    def plan(self) -> ChannelPlan:
        find = self.groups.find
        gm = self.gm
        plan = ChannelPlan(axis=self.axis)
        align: dict[int, int] = {}
        for g in range(len(self.groups.width)):
            if g not in self.groups.alias:
                plan.widths[g] = self.groups.width[g]
            elif find(g) == g:
                form = self.groups.form(g)
                plan.derived[g] = tuple(sorted(form.items()))
                for h, c in form.items():  # every term a whole number of channels
                    align[h] = math.lcm(align.get(h, 1), c.denominator)
        plan.splits = {name: tuple(map(find, pieces)) for name, pieces in self.splits.items()}
        plan.whole_slices = (*self.whole_slices,)

        def tmpl(t: Template) -> Template:
            return tuple(d if isinstance(d, int) else (find(d[0]), d[1]) for d in t)
        for name, (kind, gi, go, tensors, attrs) in self.modules.items():
            plan.modules[name] = ModulePlan(kind, find(gi), find(go), tuple((n, tmpl(t)) for n, t in tensors),
                                            tuple((p, a, find(g)) for p, a, g in attrs))
        plan.attrs = {k: tmpl(t) for k, t in self.attrs.items()}
        counted = [t for k, t in plan.attrs.items() if isinstance(resolve_attr(gm, k), nn.Parameter)]
        for name, mp in plan.modules.items():
            params = {n for n, _ in gm.get_submodule(self.nodes[name].target).named_parameters()}
            counted += [t for n, t in mp.tensors if n in params]
        plan.counted = tuple(counted)
        for g, a in self.align:
            form = self.groups.form(g)
            if len(form) != 1:
                raise _Located("groups", self.block.branch[0], f"a grouped layer acts on concatenated channels "
                                                               f"({self.groups.width[g]})")
            (h, c), = form.items()  # c * width a multiple of a: width a multiple of q * a / gcd(a, p)
            align[h] = math.lcm(align.get(h, 1), c.denominator * a // math.gcd(a, c.numerator))
        plan.align = align
        return plan


class _Located(Exception):
    def __init__(self, code: str, node: str, detail: str) -> None:
        super().__init__(detail)
        self.failure = Failure(code, node, detail)


_LAST_AXIS_FUNCTIONS = {F.linear, F.layer_norm}
_FIRST_AXIS_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm}


def _channel_axis(gm: fx.GraphModule, block: ResidualBlock, nodes: dict[str, fx.Node], ndim: int) -> int:
    """The block's channel axis, from the first layer of its branch that says which axis it mixes or
    normalises: a convolution or batch/group norm -> dimension 1; ``Linear`` or ``LayerNorm`` ->
    the last one (a transformer's tokens, a channels-last layout). Dimension 1 if none does."""
    for name in block.branch:
        node = nodes[name]
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (*CONV_TYPES, *_CHANNELS_FIRST_NORMS)):
                return 1
            if isinstance(mod, nn.Linear) or type(mod) is nn.LayerNorm:
                return ndim - 1
        elif node.op == "call_function" and node.target in _FIRST_AXIS_FUNCTIONS:
            return 1
        elif node.op == "call_function" and node.target in _LAST_AXIS_FUNCTIONS:
            return ndim - 1
    return 1


def plan_channels(gm: fx.GraphModule, block: ResidualBlock, nodes: dict[str, fx.Node] | None = None) -> ChannelPlan:
    """Propagate channel widths through ``block``'s branch; see the module docstring.

    The block's channel axis is read from the graph (:func:`_channel_axis`), not assumed: a ViT
    block's input ``(N, 197, 768)`` has 768 channels, not 197. A plan with ``failure`` set says
    where and why the branch cannot be rebuilt.
    """
    nodes = nodes or {n.name: n for n in gm.graph.nodes}
    shape = _val(nodes[block.fork])
    ndim = shape.dim() if isinstance(shape, torch.Tensor) else 0
    if ndim < 2:
        return ChannelPlan(axis=1, failure=Failure("odd-channels", block.fork, f"input of shape "
                                                   f"{tuple(shape.shape) if ndim else shape} has no channel axis"))
    axis = _channel_axis(gm, block, nodes, ndim)
    prop = _Propagation(gm, block, nodes, axis)
    try:
        prop.run()
        plan = prop.plan()
    except _Located as stop:
        return ChannelPlan(axis=axis, failure=stop.failure)
    half, a = plan.widths[OUTER] // 2, plan.align.get(OUTER, 1)
    if half % a and plan.widths[OUTER] % 2 == 0:  # odd widths are the odd-channels rule's
        return ChannelPlan(axis=axis, widths=plan.widths, failure=Failure(
            "groups", block.branch[0], f"a grouped layer or a channel split needs widths that are multiples "
                                       f"of {a}, which does not divide {half} channels"))
    return plan
