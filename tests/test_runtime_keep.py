"""Kept outputs (coupling.keep): the recomputation skips the kept ops, gradients stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import saved_bytes
from revconvert.runtime import ReversibleCoupling, ReversibleSegment, keep_spatial_convolutions
from revconvert.runtime._keep import MIN_KEPT_FLOPS


def bottleneck(c: int, mid: int, *, dropout: float = 0.0) -> nn.Sequential:
    """1x1 -> 3x3 -> 1x1 with BN and ReLU, as a converted bottleneck's F or G."""
    layers = [nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
              nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))


def segment(depth: int, c: int = 8, mid: int = 6, keep=None, dropout: float = 0.0) -> ReversibleSegment:
    torch.manual_seed(0)
    couplings = [ReversibleCoupling(bottleneck(c, mid, dropout=dropout), bottleneck(c, mid, dropout=dropout),
                                    keep=keep) for _ in range(depth)]
    for coupling in couplings:
        coupling.keep_small = True  # these convolutions are tiny: keep them anyway, to test the mechanism
    return ReversibleSegment(couplings, exit_activation=nn.ReLU()).double()


def step(seg: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = seg(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [x.grad] + [p.grad for p in seg.parameters()]


def test_keep_matches_ordinary_autograd_float64_with_dropout_and_bn():
    kept = segment(4, keep="spatial-convs", dropout=0.3)
    ordinary = copy.deepcopy(kept)
    ordinary.use_reversible_backward = False
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    grads, ref = step(kept, x), step(ordinary, x)
    for g, r in zip(grads, ref):
        assert g is not None
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # Running statistics updated once, exactly as ordinary autograd does.
    for a, b in zip(kept.buffers(), ordinary.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def flops_of_step(seg: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step(seg, x)
    return counter.get_total_flops()


def test_keep_skips_exactly_the_spatial_convolutions_and_saves_their_outputs():
    depth, c, mid, n, hw = 3, 8, 6, 2, 5
    x = torch.randn(n, 2 * c, hw, hw, dtype=torch.float64)
    plain, kept = segment(depth, c, mid), segment(depth, c, mid, keep=keep_spatial_convolutions)
    # Per coupling, F and G each have one 3x3 conv mid -> mid: 2 * N*H*W * mid * mid*9 FLOPs.
    conv3x3 = 2 * n * hw * hw * mid * mid * 9
    assert flops_of_step(plain, x) - flops_of_step(kept, x) == depth * 2 * conv3x3
    # ... and their outputs (N x mid x H x W float64) are what is saved in addition.
    out_bytes = n * mid * hw * hw * 8
    assert saved_bytes(kept, x.requires_grad_()) - saved_bytes(plain, x) == depth * 2 * out_bytes


def test_keep_under_cpu_autocast_matches_ordinary_autograd():
    kept = segment(2, keep="spatial-convs").float()
    ordinary = copy.deepcopy(kept)
    ordinary.use_reversible_backward = False
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads, ref = step(kept, x), step(ordinary, x)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))


class SwitchingConv(nn.Module):
    """A 3x3 conv on the first call only: the recomputation runs different ops than the forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) if self.calls == 1 else x * 2


def test_keep_refuses_a_recomputation_that_runs_other_ops():
    seg = ReversibleSegment([ReversibleCoupling(SwitchingConv(4), nn.Conv2d(4, 4, 1), keep="spatial-convs")])
    y = seg(torch.randn(1, 8, 4, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"couplings\[0\]\.F ran 0 kept op"):
        y.sum().backward()


def test_keep_rejects_unknown_policies_with_the_choices():
    with pytest.raises(ValueError, match="spatial-convs"):
        ReversibleCoupling(nn.Identity(), nn.Identity(), keep="everything")


def test_keep_is_shown_and_survives_deepcopy():
    coupling = ReversibleCoupling(nn.Identity(), nn.Identity(), keep="spatial-convs")
    assert "keep=keep_spatial_convolutions" in repr(coupling)
    assert copy.deepcopy(coupling).keep is keep_spatial_convolutions


def test_convolutions_too_small_to_be_worth_keeping_are_recomputed():
    depth, c, mid, n, hw = 2, 8, 6, 2, 5
    x = torch.randn(n, 2 * c, hw, hw, dtype=torch.float64)
    plain, kept = segment(depth, c, mid), segment(depth, c, mid, keep="spatial-convs")
    for coupling in kept.couplings:
        coupling.keep_small = False
    # 2 * N*H*W * mid * mid*9 = 32400 FLOPs per 3x3 conv: under the CPU threshold, so nothing is kept.
    assert 2 * n * hw * hw * mid * mid * 9 < MIN_KEPT_FLOPS["cpu"]
    assert flops_of_step(kept, x) == flops_of_step(plain, x)
    assert saved_bytes(kept, x.requires_grad_()) == saved_bytes(plain, x)
    grads, ref = step(kept, x), step(plain, x)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
