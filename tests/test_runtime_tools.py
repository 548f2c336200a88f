"""Saved memory, PyTorch's analysis tools, fake tensors, channels_last and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from conftest import conv_bn, saved_bytes
from revconvert.runtime import ReversibleCoupling, ReversibleSegment


def segment_of(depth: int, c: int = 8, **kwargs) -> ReversibleSegment:
    return ReversibleSegment([ReversibleCoupling(conv_bn(c // 2), conv_bn(c // 2)) for _ in range(depth)], **kwargs)


def ordinary_copy(segment: ReversibleSegment) -> ReversibleSegment:
    ordinary = copy.deepcopy(segment)
    ordinary.use_reversible_backward = False
    return ordinary


# --- Memory ----------------------------------------------------------------------------------------


def test_saved_bytes_do_not_grow_with_depth():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    output_bytes = x.numel() * x.element_size()
    figures = {depth: saved_bytes(segment_of(depth), x) for depth in (2, 8, 32)}
    assert figures == {2: output_bytes, 8: output_bytes, 32: output_bytes}
    # Ordinary autograd keeps every coupling's internals.
    assert saved_bytes(ordinary_copy(segment_of(8)), x) > 20 * output_bytes


# --- Analysis tools --------------------------------------------------------------------------------


def test_flop_counter_sees_one_extra_forward():
    torch.manual_seed(0)
    # Convolutions only, so FLOPs are exactly: forward 1, backward 2 (input + weight), recompute 1.
    def conv():
        return nn.Conv2d(4, 4, 3, padding=1, bias=False)

    segment = ReversibleSegment([ReversibleCoupling(conv(), conv()) for _ in range(4)])
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    totals = []
    for seg in (segment, ordinary_copy(segment)):
        with FlopCounterMode(display=False) as counter:
            seg(x).sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[0] * 3 == totals[1] * 4


def test_module_tracker_and_hooks_over_forward_and_backward():
    torch.manual_seed(0)
    segment = segment_of(2, exit_activation=nn.ReLU())
    calls: list[str] = []
    segment.register_forward_hook(lambda m, i, o: calls.append("segment.forward"))
    segment.register_full_backward_hook(lambda m, gi, go: calls.append("segment.backward"))
    conv = segment.couplings[0].F[0]
    conv.register_forward_pre_hook(lambda m, i: calls.append("conv.pre"))
    conv.register_full_backward_hook(lambda m, gi, go: calls.append("conv.backward"))
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    seen: set[str] = set()
    with ModuleTracker() as tracker:
        orig = tracker._fw_pre_hook

        def spy(mod, input):
            seen.update(tracker.parents)
            return orig(mod, input)

        tracker._fw_pre_hook = spy
        with FlopCounterMode(display=False):
            segment(x).sum().backward()
    # Forward once, recomputation once; the backward hook fires during the recomputation's backward.
    assert calls.count("conv.pre") == 2 and calls.count("conv.backward") == 1
    assert calls.count("segment.forward") == 1 and calls.count("segment.backward") == 1
    assert x.grad is not None


def test_module_tracker_with_input_views_regression():
    # The Function must detach its input before chunking; otherwise views that require grad without
    # a grad_fn reach ModuleTracker's hooks, which then fail in register_multi_grad_hook.
    torch.manual_seed(0)
    segment = ReversibleSegment([ReversibleCoupling(nn.Linear(2, 2), nn.Linear(2, 2))])
    x = torch.randn(3, 4, requires_grad=True)
    with ModuleTracker():
        segment(x).sum().backward()
    assert x.grad is not None


# --- Fake tensors ----------------------------------------------------------------------------------


def test_forward_and_backward_under_fake_tensor_mode():
    segment = copy.deepcopy(segment_of(3, exit_activation=nn.ReLU()))
    rng = torch.get_rng_state()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = torch.empty(64, 8, 32, 32, requires_grad=True)
        y = segment(x)
        assert isinstance(y, torch._subclasses.FakeTensor) and y.shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.fake_mode is mode
    assert all(p.grad is not None for p in segment.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# --- channels_last and torch.compile ---------------------------------------------------------------


def grads_of(model: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    segment = segment_of(3).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    y, gx, grads = grads_of(copy.deepcopy(segment).to(memory_format=torch.channels_last),
                            x.to(memory_format=torch.channels_last))
    y_ref, gx_ref, grads_ref = grads_of(ordinary_copy(segment), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_falls_back_to_eager_segment_with_equal_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), segment_of(2, exit_activation=nn.ReLU()), nn.Flatten(), nn.Linear(8 * 16, 2))
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(model)
    y, gx, grads = grads_of(compiled, x)
    y_ref, gx_ref, grads_ref = grads_of(eager, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    # The segment ran as the reversible Function (eagerly), not as ordinary autograd.
    assert saved_bytes(model[1], torch.randn(2, 8, 4, 4, requires_grad=True)) == 2 * 8 * 16 * 4 * 2
