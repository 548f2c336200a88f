"""Find residual blocks in an fx graph, by graph analysis rather than by module class names.

A residual block is a *join* (an addition of two tensors) whose operands meet at a *fork*: the
fork is the join's immediate dominator in the dataflow graph. One operand is the fork itself
(identity shortcut) or a short path from it (projection shortcut); the other is the *branch*, the
nodes between fork and join. networkx is only a view built once for the graph algorithms; results
name fx nodes by ``node.name``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .channels import param_expressions

__all__ = ["ResidualBlock", "find_residual_blocks", "to_networkx", "ACTIVATION_MODULES",
           "ACTIVATION_FUNCTIONS", "is_activation"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.softplus,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}

_ROOT = "__root__"


@dataclass(frozen=True)
class ResidualBlock:
    """One residual connection found in the graph (node names refer to the traced graph).

    Attributes:
        name: the owning module's qualified name (``layer3.7``), else the join node's name.
        owner: qualified name of the module whose forward performs the join, if any.
        fork: the node both operands depend on (the block input).
        join: the addition node.
        branch: the branch nodes in graph order (fork and join excluded).
        branch_output: the join operand computed by the branch.
        shortcut: nodes on the shortcut path (empty for an identity shortcut).
        shortcut_output: the other join operand (``fork`` for an identity shortcut).
        post_op: the activation applied to the join's result and nothing else, if any.
        noop_shortcut: the shortcut nodes compute the identity (``nn.Identity()``, an
            Identity-only ``nn.Sequential``, ``.contiguous()``): the shortcut is the identity.
    """

    name: str
    owner: str | None
    fork: str
    join: str
    branch: tuple[str, ...]
    branch_output: str
    shortcut: tuple[str, ...]
    shortcut_output: str
    post_op: str | None
    noop_shortcut: bool = False

    @property
    def identity_shortcut(self) -> bool:
        """The shortcut is the fork itself, or only no-op nodes (``nn.Identity()``) on the way."""
        return self.shortcut_output == self.fork or self.noop_shortcut

    @property
    def output(self) -> str:
        """The node whose value leaves the block (the post-op if there is one)."""
        return self.post_op or self.join

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the block owns (branch, shortcut, join and post-op)."""
        return self.branch + self.shortcut + (self.join,) + ((self.post_op,) if self.post_op else ())


_NOOP_METHODS = {"contiguous", "clone"}


def _is_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` returns its single input unchanged (fx traces an empty ``nn.Sequential`` away, but
    ``nn.Identity`` is a leaf and stays a node)."""
    if len(node.all_input_nodes) != 1 or node.kwargs:
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.Identity) or (isinstance(mod, nn.Sequential) and
                                                all(isinstance(m, nn.Identity) for m in mod))
    return node.op == "call_method" and node.target in _NOOP_METHODS and len(node.args) == 1


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Dataflow view of ``graph``: an edge from every input node to its user."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies an element-wise activation (module, function or method form)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def _is_tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def _join_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an addition node, else None (``alpha`` != 1 is not residual)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (_is_tensor(a) and _is_tensor(b)) or a is b:
        return None
    return a, b


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] or None


def _common_owner(modules: list[fx.Node]) -> str | None:
    """Longest common dotted prefix of the called modules' names (``layer2.0.conv1`` and
    ``layer2.0.downsample.0`` -> ``layer2.0``): the owner when the graph has no module stack, as in
    a re-traced GraphModule."""
    if not modules:
        return None
    parts = [str(n.target).split(".")[:-1] for n in modules]
    prefix = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        prefix.append(atoms[0])
    return ".".join(prefix) or None


def _fork(idom: dict[str, str], order: dict[str, int], g: nx.DiGraph, a: fx.Node, b: fx.Node) -> str | None:
    """The node where the two operands of a join meet.

    Walking up each operand's dominator chain, the first node that the other operand also
    depends on; the later (closer to the join) of the two candidates wins. Unlike the join's own
    dominator this still finds the fork when the branch also reads another input.
    """
    candidates = []
    for start, other in ((a, b), (b, a)):
        reach = nx.ancestors(g, other.name) | {other.name}
        node = start.name
        while node != _ROOT and node not in reach:
            node = idom[node]
        if node != _ROOT:
            candidates.append(node)
    return max(candidates, key=order.__getitem__) if candidates else None


def _path_length(end: fx.Node, fork: str) -> int:
    """Nodes on the single-input chain from ``end`` back to ``fork`` (-1 if it is not a chain)."""
    count, node = 0, end
    while node.name != fork:
        if len(node.all_input_nodes) != 1:
            return -1
        node, count = node.all_input_nodes[0], count + 1
    return count


def find_residual_blocks(gm: fx.GraphModule) -> list[ResidualBlock]:
    """All residual blocks of a traced graph, in graph order.

    A join nested inside another block's branch (a residual connection within a residual
    function) is not reported separately: the outer block owns it.

    Example:
        >>> gm = revconvert.tracing.trace(torchvision.models.resnet18())
        >>> [b.name for b in find_residual_blocks(gm)][:2]
        ['layer1.0', 'layer1.1']
    """
    graph = gm.graph
    g = to_networkx(graph)
    # Parameters, and what is computed from them alone (a layer scale's ``scale.view(C, 1, 1)``), are
    # constants of the dataflow: left in, they would make the root dominate every node that reads
    # one, and a block with a scaled shortcut and a parameter read in its branch would have no fork.
    constants = param_expressions(graph)
    g.remove_nodes_from(constants)
    for name in [n for n in g.nodes if g.in_degree(n) == 0]:
        g.add_edge(_ROOT, name)
    idom = nx.immediate_dominators(g, _ROOT)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    by_name = {node.name: node for node in graph.nodes}

    blocks: list[ResidualBlock] = []
    for node in graph.nodes:
        operands = _join_operands(node)
        if operands is None or any(o.name in constants for o in operands):
            continue  # not an addition of two tensors, or one of them is a constant (a bias)
        fork = _fork(idom, order, g, *operands)
        if fork is None:
            continue  # the operands share no input: not a residual connection
        below_fork = nx.descendants(g, fork)

        def between(operand: fx.Node) -> set[str]:
            if operand.name == fork:
                return set()
            return (nx.ancestors(g, operand.name) & below_fork) | {operand.name}

        a, b = operands
        nodes_a, nodes_b = between(a), between(b)
        # The branch is the operand with more work between fork and join; the shortcut is the
        # fork itself (identity) or the shorter path (projection).
        if len(nodes_a) >= len(nodes_b):
            branch_out, short_out, branch_set, short_set = a, b, nodes_a, nodes_b
        else:
            branch_out, short_out, branch_set, short_set = b, a, nodes_b, nodes_a
        branch_set -= short_set
        if not branch_set:
            continue
        post_op = None
        if len(node.users) == 1:
            (user,) = node.users
            if is_activation(gm, user) and user.all_input_nodes == [node]:
                post_op = user.name
        owner = _owner(node) or _common_owner(
            [by_name[n] for n in branch_set | short_set if by_name[n].op == "call_module"])
        blocks.append(ResidualBlock(
            name=owner or node.name,
            owner=owner,
            fork=fork,
            join=node.name,
            branch=tuple(sorted(branch_set, key=order.__getitem__)),
            branch_output=branch_out.name,
            shortcut=tuple(sorted(short_set, key=order.__getitem__)),
            shortcut_output=short_out.name,
            post_op=post_op,
            noop_shortcut=bool(short_set) and all(_is_noop(gm, by_name[n]) for n in short_set)
            and len(short_set) == _path_length(short_out, fork),
        ))
    # Drop joins nested inside another block's branch; keep the outermost residual connection.
    inner = {b.join for b in blocks for o in blocks if o is not b and b.join in o.branch}
    blocks = [b for b in blocks if b.join not in inner]
    # Two joins in one module (rare) need distinct names.
    seen: dict[str, int] = {}
    unique = []
    for b in blocks:
        if b.name in seen:
            seen[b.name] += 1
            b = ResidualBlock(**{**b.__dict__, "name": f"{b.name}@{seen[b.name]}"})
        else:
            seen[b.name] = 0
        unique.append(b)
    return unique
