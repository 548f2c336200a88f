"""Eligibility rules: can a residual block become a reversible coupling? A table, not an if-chain.

Each rule has a stable reason code (scripts may rely on it), a sentence a user understands, and a
check that returns None when the block passes or a short detail when it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .graph import ResidualBlock
from .ops import CONV_TYPES, describe_op, is_inplace, op_kind
from .tracing import tensor_shape

__all__ = ["Rule", "RULES", "Violation", "BlockContext", "check_block", "REASONS"]


@dataclass(frozen=True)
class BlockContext:
    """What a rule may look at: the traced graph and one block."""

    gm: fx.GraphModule
    block: ResidualBlock
    nodes: dict[str, fx.Node]

    def node(self, name: str) -> fx.Node:
        return self.nodes[name]

    def branch_nodes(self) -> list[fx.Node]:
        return [self.nodes[n] for n in self.block.branch]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return tensor_shape(self.nodes[self.block.fork])

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return tensor_shape(self.nodes[self.block.join])


@dataclass(frozen=True)
class Rule:
    code: str
    message: str  # may use {detail}
    check: Callable[[BlockContext], str | None]


@dataclass(frozen=True)
class Violation:
    code: str
    detail: str
    message: str


def _projection(ctx: BlockContext) -> str | None:
    if ctx.block.identity_shortcut:
        return None
    ops = [describe_op(ctx.gm, ctx.node(n)) for n in ctx.block.shortcut]
    return " -> ".join(ops) or ctx.block.shortcut_output


def _stride(ctx: BlockContext) -> str | None:
    for node in ctx.branch_nodes():
        mod = ctx.module(node)
        if isinstance(mod, CONV_TYPES) and any(s != 1 for s in mod.stride):
            return f"{node.target} has stride {tuple(mod.stride)}"
        if node.op != "call_module" and "stride" in node.kwargs and node.kwargs["stride"] not in (1, (1, 1)):
            return f"{node.name} has stride {node.kwargs['stride']}"
    return None


def _shape_change(ctx: BlockContext) -> str | None:
    if ctx.in_shape != ctx.out_shape:
        return f"{ctx.in_shape} -> {ctx.out_shape}"
    return None


def _odd_channels(ctx: BlockContext) -> str | None:
    shape = ctx.in_shape
    if shape is None or len(shape) < 2:
        return f"input of shape {shape} has no channel dimension"
    if shape[1] % 2:
        return f"{shape[1]} channels"
    return None


def _branch_escapes(ctx: BlockContext) -> str | None:
    inside = set(ctx.block.branch) | {ctx.block.join}
    for node in ctx.branch_nodes():
        outside = [u.name for u in node.users if u.name not in inside]
        if outside:
            return f"{node.name} is also used by {', '.join(outside)}"
    return None


def _extra_input(ctx: BlockContext) -> str | None:
    allowed = set(ctx.block.branch) | {ctx.block.fork}
    for node in ctx.branch_nodes():
        for inp in node.all_input_nodes:
            if inp.name not in allowed and inp.op != "get_attr":
                return f"{node.name} reads {inp.name}"
    return None


def _inplace_fork(ctx: BlockContext) -> str | None:
    fork = ctx.node(ctx.block.fork)
    for node in ctx.branch_nodes():
        if node.args and node.args[0] is fork and is_inplace(ctx.gm, node):
            return f"{node.name} ({describe_op(ctx.gm, node)}) modifies the block input in place"
    return None


def _unsupported(ctx: BlockContext) -> str | None:
    for node in ctx.branch_nodes():
        if op_kind(ctx.gm, node) is None:
            return describe_op(ctx.gm, node)
    return None


def _not_sequential(ctx: BlockContext) -> str | None:
    prev = ctx.block.fork
    for node in ctx.branch_nodes():
        inputs = [i.name for i in node.all_input_nodes if i.op != "get_attr"]
        if inputs != [prev]:
            return f"{node.name} takes {inputs or 'no tensor'} instead of the previous op's output"
        prev = node.name
    if prev != ctx.block.branch_output:
        return f"the branch ends at {prev}, not at the join"
    return None


def _groups(ctx: BlockContext) -> str | None:
    shape = ctx.in_shape
    if not shape or len(shape) < 2:
        return None
    half = shape[1] // 2
    nodes = ctx.branch_nodes()
    convs = [n for n in nodes if isinstance(ctx.module(n), CONV_TYPES)]
    # Only the first conv's input and the last conv's output have the outer (split) width; inner
    # widths are chosen by the surgery to fit every group count.
    touching_outer = {convs[0].name, convs[-1].name} if convs else set()
    outer_norms = {n.name for n in nodes if not convs or
                   nodes.index(n) < nodes.index(convs[0]) or nodes.index(n) > nodes.index(convs[-1])}
    for node in nodes:
        mod = ctx.module(node)
        if isinstance(mod, CONV_TYPES) and node.name in touching_outer and mod.groups > 1:
            depthwise = mod.groups == mod.in_channels == mod.out_channels
            if not depthwise and half % mod.groups:
                return f"{node.target} has groups={mod.groups}, which does not divide {half} channels"
            if depthwise and node is convs[-1] and len(convs) > 1:
                return f"{node.target} is depthwise and writes the block output from an inner width"
        if isinstance(mod, nn.GroupNorm) and node.name in outer_norms and half % mod.num_groups:
            return f"{node.target} has {mod.num_groups} groups, which does not divide {half} channels"
    return None


RULES: tuple[Rule, ...] = (
    Rule("projection-shortcut",
         "the shortcut is a projection ({detail}), not the identity: the block is not invertible", _projection),
    Rule("stride", "the branch is strided ({detail}): it discards information", _stride),
    Rule("shape-change", "the block changes the tensor shape ({detail})", _shape_change),
    Rule("odd-channels", "the channels cannot be split in two equal halves ({detail})", _odd_channels),
    Rule("branch-escapes", "a branch result is used outside the block ({detail})", _branch_escapes),
    Rule("extra-input", "the branch depends on more than the block input ({detail})", _extra_input),
    Rule("inplace-fork", "the branch overwrites the block input ({detail})", _inplace_fork),
    Rule("unsupported-layer", "the channel surgery cannot rebuild a layer of the branch: {detail}", _unsupported),
    Rule("non-sequential-branch", "the branch is not a simple chain of layers ({detail})", _not_sequential),
    Rule("groups", "grouped layers do not fit half the channels ({detail})", _groups),
)

REASONS: dict[str, str] = {r.code: r.message for r in RULES}


def check_block(ctx: BlockContext) -> list[Violation]:
    """Every rule the block breaks, in table order (empty when it can become reversible)."""
    out = []
    for rule in RULES:
        detail = rule.check(ctx)
        if detail is not None:
            out.append(Violation(rule.code, detail, rule.message.format(detail=detail)))
    return out
