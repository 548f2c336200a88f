from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))  # tests import toy_models

# REVCONVERT_TEST_THREADS=1 avoids OpenMP spin contention when the machine is shared.
torch.set_num_threads(int(os.environ.get("REVCONVERT_TEST_THREADS", 1)))

# The torchvision ResNet family, with the block counts the architecture papers give: blocks,
# eligible (stride-1 identity) blocks; every ineligible block is a stage's first block (layerN.0),
# which has a projection shortcut.
RESNET_FAMILY = {
    "resnet18": (8, 5), "resnet34": (16, 13), "resnet50": (16, 12), "resnet101": (33, 29),
    "resnet152": (50, 46), "resnext50_32x4d": (16, 12), "resnext101_32x8d": (33, 29),
    "resnext101_64x4d": (33, 29), "wide_resnet50_2": (16, 12), "wide_resnet101_2": (33, 29),
}


def layer_specs():  # noqa: ANN201 - a hypothesis strategy
    """A hypothesis strategy for one layer of a plain Sequential the direct and compiled backwards
    take (see :func:`sequential_of`)."""
    from hypothesis import strategies as st

    return st.one_of(
        st.tuples(st.just("conv"), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
                  st.booleans(), st.sampled_from([1, 2])),  # kernel, stride, groups, bias, dilation
        st.tuples(st.just("norm"), st.booleans(), st.sampled_from([0.1, 0.5])),  # affine, momentum
        st.tuples(st.just("relu"), st.booleans()),  # in place (never first: F may not modify its input)
        st.tuples(st.just("identity")),
    )


def sequential_of(specs: list[tuple]) -> torch.nn.Sequential:
    """The train-mode Sequential ``layer_specs()`` draws describe, on 4 input channels, norms with
    weights in [0.5, 1.5] and biases in [-0.5, 0.5]."""
    from torch import nn

    modules, channels = [], 4
    for spec in specs:
        if spec[0] == "conv":
            _, k, stride, groups, bias, dilation = spec
            modules.append(nn.Conv2d(channels, 4, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                                     groups=groups, bias=bias))
            channels = 4
        elif spec[0] == "norm":
            modules.append(nn.BatchNorm2d(channels, affine=spec[1], momentum=spec[2]))
        elif spec[0] == "relu":
            # in place only after a layer that computes: F may not modify its input (the segment's
            # forward refuses that)
            modules.append(nn.ReLU(inplace=spec[1] and any(not isinstance(m, nn.Identity) for m in modules)))
        else:
            modules.append(nn.Identity())
    seq = nn.Sequential(*modules).train()
    for m in seq.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return seq


def conv_bn(c: int, *, dropout: float = 0.0) -> torch.nn.Module:
    """conv-BN-ReLU[-dropout]-conv-BN on ``c`` channels: a residual function for the couplings."""
    from torch import nn

    layers = [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def _counting_saved(owner: torch.nn.Module):
    """Yields a dict storage id -> bytes of what autograd saves inside the block, parameters and
    buffers of ``owner`` excluded. Independent of revconvert's own counter; works on meta tensors."""
    skip = {t.untyped_storage()._cdata for t in [*owner.parameters(), *owner.buffers()]}
    seen, keep = {}, []

    def pack(t):
        st = t.untyped_storage()
        keep.append(st)  # keep storages alive so their ids stay unique
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in ``model(x)``, once per storage, parameters and buffers
    excluded."""
    with _counting_saved(model) as seen:
        model(x)
    return sum(seen.values())


def grads_against_ordinary(converted: torch.nn.Module, x: torch.Tensor) -> tuple[list, torch.nn.Module]:
    """One ``square().sum()`` backward of ``converted`` (its memory-saving backward) and of a deep copy
    under ``revconvert.ordinary_autograd()`` on the same input. Returns the (got, want) gradient
    pairs, the input's first, then every parameter's, and the copy (to compare buffers)."""
    import copy

    import revconvert

    reference = copy.deepcopy(converted)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    converted(x1).square().sum().backward()
    with revconvert.ordinary_autograd():
        reference(x2).square().sum().backward()
    return [(x1.grad, x2.grad)] + [(p.grad, q.grad) for p, q in zip(converted.parameters(),
                                                                    reference.parameters())], reference


class OpCount(TorchDispatchMode):
    """Counts the aten ops run below autograd, per op overload (a dispatch mode: direct calls still run)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def by_name(self) -> Counter:
        """The same counts by op name, overloads merged (``"convolution"``, ``"add_"``)."""
        names: Counter = Counter()
        for func, n in self.ops.items():
            names[func._overloadpacket.__name__] += n
        return names


def tv_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything the caller could notice changing: tensors, modes, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["types"] == before["types"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        torch.testing.assert_close(after["state"][k], before["state"][k], rtol=0, atol=0, msg=k)


@pytest.fixture
def make_tv():
    return tv_model


def _meta_flops_and_bytes(fn, x, owner=None, *, ordinary: bool = False) -> tuple[int, int]:
    """(FLOPs of forward + backward, bytes saved for backward) of ``fn(x)``; works on meta tensors.
    ``owner``: the module whose parameters and buffers are not counted (default ``fn``)."""
    from torch.utils.flop_counter import FlopCounterMode

    import revconvert

    counter = FlopCounterMode(display=False)
    ctx = revconvert.ordinary_autograd() if ordinary else contextlib.nullcontext()
    with counter, ctx:
        with _counting_saved(fn if owner is None else owner) as seen:
            out = fn(x)
        out.sum().backward()
    return counter.get_total_flops(), sum(seen.values())


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts graphs and calls."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)

        def run(*args: object) -> object:
            self.calls += 1
            return gm.forward(*args)
        return run

    def targets(self) -> set[str]:
        return {getattr(n.target, "__name__", str(n.target)) for gm in self.graphs for n in gm.graph.nodes
                if n.op == "call_function"}


class FakeGraph:
    """A captured function (see :class:`FakeGraphBackend`)."""

    def __init__(self, fn, outputs, backend):
        self.fn, self.outputs, self.backend = fn, outputs, backend

    def replay(self) -> None:
        self.backend.replays += 1
        with torch.no_grad():
            for out, new in zip(self.outputs, self.fn()):
                if out is not None:
                    out.copy_(new)


class FakeGraphBackend:
    """A CUDA graph's static-memory semantics on any device, for ``runtime._graphs.BACKENDS``: a
    capture runs the function once and leaves garbage in its outputs (a real capture computes
    nothing), a replay runs it again and writes the results into those same output tensors."""

    def __init__(self):
        self.captures = self.replays = 0
        self.capturing_now = False

    def warmup(self, device):
        return contextlib.nullcontext()

    def capture(self, fn, device):
        self.captures += 1
        outputs = fn()
        with torch.no_grad():
            for out in outputs:  # a real capture computes nothing
                if out is not None:
                    out.fill_(float("nan"))
        return FakeGraph(fn, outputs, self), outputs

    def capturing(self, device):
        return self.capturing_now
