"""Eligibility rules: can a residual block become a reversible coupling? A table, not an if-chain.

Each rule has a stable reason code (scripts may rely on it), a sentence a user understands, and a
check that returns None when the block passes or a short detail when it does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .channels import ChannelPlan, param_expression
from .propagation import plan_channels
from .graph import ResidualBlock
from .ops import CONV_TYPES, describe_op, is_inplace, zero_init_ends
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

    @functools.cached_property
    def channels(self) -> ChannelPlan:
        """The branch's channel axis and width groups (:mod:`revconvert.analysis.channels`)."""
        return plan_channels(self.gm, self.block, self.nodes)

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
    axis = ctx.channels.axis  # from the graph: dimension 1, or the last one for a token layout
    if shape[axis] % 2:
        return f"{shape[axis]} channels on dimension {axis}"
    return None


def _branch_escapes(ctx: BlockContext) -> str | None:
    inside = set(ctx.block.branch) | {ctx.block.join}
    for node in ctx.branch_nodes():
        # A user nothing reads (the unused half of ``out, _ = attention(...)``) is dead code.
        outside = [u.name for u in node.users if u.name not in inside and (u.users or u.op == "output")]
        if outside:
            return f"{node.name} is also used by {', '.join(outside)}"
    return None


def _extra_input(ctx: BlockContext) -> str | None:
    allowed = set(ctx.block.branch) | {ctx.block.fork}
    for node in ctx.branch_nodes():
        for inp in node.all_input_nodes:
            if inp.name not in allowed and not param_expression(inp):
                return f"{node.name} reads {inp.name}"
    return None


def _inplace_fork(ctx: BlockContext) -> str | None:
    fork = ctx.node(ctx.block.fork)
    for node in ctx.branch_nodes():
        if node.args and node.args[0] is fork and is_inplace(ctx.gm, node):
            return f"{node.name} ({describe_op(ctx.gm, node)}) modifies the block input in place"
    return None


def _plan_failure(code: str) -> Callable[[BlockContext], str | None]:
    def check(ctx: BlockContext) -> str | None:
        failure = ctx.channels.failure
        if failure is None or failure.code != code:
            return None
        return failure.detail
    check.__name__ = f"_{code.replace('-', '_')}"
    return check


def _identity_path(ctx: BlockContext) -> str | None:
    """A concatenation on the zero-init walk back from the branch output (:func:`zero_init_ends`)
    one of whose parts is the block input, passed through without a layer (XCiT's class-attention
    block: ``cat([mlp(x[:, :1]), x[:, 1:]])``). That part cannot start at zero, so the coupling could
    not start as the identity."""
    fork = ctx.block.fork
    ends = zero_init_ends(ctx.gm, ctx.node(ctx.block.branch_output), stop={fork})
    found = next((cat for end, cat in ends if end.name == fork and cat is not None), None)
    return f"{found} keeps a part of the block input" if found else None


RULES: tuple[Rule, ...] = (
    Rule("projection-shortcut",
         "the shortcut is a projection ({detail}), not the identity: the block is not invertible", _projection),
    Rule("stride", "the branch is strided ({detail}): it discards information", _stride),
    Rule("shape-change", "the block changes the tensor shape ({detail})", _shape_change),
    Rule("odd-channels", "the channels cannot be split in two equal halves ({detail})", _odd_channels),
    Rule("branch-escapes", "a branch result is used outside the block ({detail})", _branch_escapes),
    Rule("extra-input", "the branch depends on more than the block input ({detail})", _extra_input),
    Rule("inplace-fork", "the branch overwrites the block input ({detail})", _inplace_fork),
    Rule("unsupported-layer", "the channel surgery cannot rebuild a layer of the branch: {detail}",
         _plan_failure("unsupported-layer")),
    Rule("groups", "grouped layers do not fit half the channels ({detail})", _plan_failure("groups")),
    Rule("identity-path", "the branch passes part of its input through unchanged ({detail}): its coupling "
         "could not start as the identity", _identity_path),
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
