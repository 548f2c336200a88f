"""Channel-width propagation through a residual branch: which widths are tied, and how to resize.

A branch is rebuilt at new widths (its outer width halved for the coupling's split, its inner
widths scaled to match parameters). Which widths must change together follows from the graph, as
channel-pruning tools build a dependency graph of coupled channels: every tensor of the branch gets
a *channel axis* and a *width group*; a convolution or ``Linear`` starts a new group at its output,
element-wise ops and broadcasting (``x * gate``, ``gamma * x``) tie the groups of their operands,
``permute``/``reshape`` move the axis, reductions over other axes keep it. A split along the channels
makes *derived* groups, fixed fractions of the group split, and a concatenation their sum; a derived
group's width is a linear form of free groups (Res2Net's pieces, a MixNet or FasterNet
concatenation), and tying two forms solves the equation for the newest free groups. Group 0 is the *outer*
width: the block's input and the branch's output. The result, a :class:`ChannelPlan`, says for every
module and every parameter used directly (``get_attr``) which of its dimensions belong to which
group, so the surgery can resize them and count parameters at any width without building anything.

The propagation itself is :func:`revconvert.analysis.propagation.plan_channels`; a branch it cannot
follow is reported with the node and a reason, which the audit shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch.fx as fx

__all__ = ["ChannelPlan", "ModulePlan", "Failure", "param_expression", "resolve_attr", "OUTER", "WIDTH_ATTRS",
           "Template"]

OUTER = 0

# A tensor's shape at new widths: per dimension a fixed size, or (group, divisor): the group's new
# width divided by ``divisor`` (a grouped convolution's weight has in_channels / groups columns).
Template = tuple  # tuple[int | tuple[int, int], ...]

# Attributes that record a module's width; resized together with its tensors. Not ``dim``, which
# as often names an axis (``nn.Softmax(dim=2)``) as a width.
WIDTH_ATTRS = ("num_features", "normalized_shape", "num_channels", "num_parameters", "in_channels",
               "out_channels", "in_features", "out_features", "channels")


@dataclass(frozen=True)
class ModulePlan:
    """How one module of the branch is rebuilt.

    Attributes:
        kind: ``"conv"`` and ``"linear"`` (new weights at the new widths), ``"resize"`` (a copy
            whose parameters, buffers and width attributes are resized), ``"copy"`` (parameter-free:
            a copy as it is).
        in_group / out_group: width groups of its input and output channels.
        tensors: qualified parameter/buffer name -> template of its new shape.
        attrs: (submodule path, attribute) -> group, for the width attributes to reset.
    """

    kind: str
    in_group: int
    out_group: int
    tensors: tuple[tuple[str, Template], ...] = ()
    attrs: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class Failure:
    """Why the propagation stopped: a reason code of the rule table, the node, a detail."""

    code: str
    node: str
    detail: str


@dataclass
class ChannelPlan:
    """Channel axes and width groups of one branch (see the module docstring).

    Attributes:
        axis: the channel axis of the block's input (1 for NCHW; the last axis for a token layout).
        widths: original width of every group; group 0 (:data:`OUTER`) is the block's width.
        align: every new width of a group must be a multiple of this (group counts acting on it).
        modules: branch node name -> :class:`ModulePlan`, for every ``call_module`` node.
        attrs: ``get_attr`` target -> template, for parameters the branch uses directly.
        failure: set when the branch cannot be rebuilt.
    """

    axis: int
    widths: dict[int, int] = field(default_factory=dict)
    align: dict[int, int] = field(default_factory=dict)
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    attrs: dict[str, Template] = field(default_factory=dict)
    failure: Failure | None = None
    counted: tuple[Template, ...] = ()  # templates of every parameter (for counting)
    # derived group -> its width as a form over free groups: ((group, coefficient), ...); the
    # alignment of those groups makes every term a whole number
    derived: dict[int, tuple[tuple[int, Fraction], ...]] = field(default_factory=dict)
    # split node name -> the groups of its pieces, whose new widths the rebuilt split takes
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # getitem nodes ``x[:, :n]`` whose n covers every channel: the rebuilt slice drops n
    whole_slices: tuple[str, ...] = ()

    def new_widths(self, half: int, scale: float) -> dict[int, int]:
        """The width of every group when the outer width is ``half`` and inner widths scale by ``scale``."""
        out = {}
        for g, w in self.widths.items():
            a = self.align.get(g, 1)
            out[g] = half if g == OUTER else max(a, int(round(w * scale / a)) * a)
        for g, form in self.derived.items():
            out[g] = int(sum(c * out[h] for h, c in form))
        return out

    @property
    def original_widths(self) -> dict[int, int]:
        """The original width of every group, derived ones included."""
        out = dict(self.widths)
        for g, form in self.derived.items():
            out[g] = int(sum(c * out[h] for h, c in form))
        return out

    def size(self, template: Template, widths: dict[int, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else widths[d[0]] // d[1] for d in template)

    def param_count(self, widths: dict[int, int]) -> int:
        """Parameters of one rebuilt branch at ``widths`` (buffers not counted)."""
        return sum(math.prod(self.size(t, widths)) for t in self.counted)

    @property
    def inner_groups(self) -> list[int]:
        return [g for g in self.widths if g != OUTER]


def resolve_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def param_expression(node: fx.Node) -> bool:
    """``node`` is a parameter or computed from parameters and constants only (timm's
    ``self.gamma.reshape(1, -1, 1, 1)``): the rebuilt branch recomputes it from the resized parameter."""
    if node.op == "get_attr":
        return True
    return node.op in ("call_function", "call_method") and bool(node.all_input_nodes) and \
        all(param_expression(i) for i in node.all_input_nodes)


def param_expressions(graph: fx.Graph) -> set[str]:
    """The names of the nodes of ``graph`` for which :func:`param_expression` holds, in one pass
    (asking it node by node walks back through every node's inputs)."""
    found: set[str] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and node.all_input_nodes
                                     and all(i.name in found for i in node.all_input_nodes)):
            found.add(node.name)
    return found
