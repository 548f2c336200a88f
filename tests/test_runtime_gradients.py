"""Reversible backward == ordinary autograd, reconstruction, API errors and the plain paths."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import conv_bn
from revconvert.runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd
from revconvert.runtime._function import ReversibleFunction

# float32: the reconstruction rounds at ~1e-7 relative per coupling and the errors compound through
# the recomputed F and G; 16 conv-BN couplings stay below 1e-4 relative to the largest gradient.
FLOAT32_RTOL = 1e-4


def conv_segment(depth: int, channels: int, **kwargs) -> ReversibleSegment:
    half = channels // 2
    return ReversibleSegment([ReversibleCoupling(conv_bn(half), conv_bn(half)) for _ in range(depth)], **kwargs)


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def run_step(segment: nn.Module, x: torch.Tensor, *, seed: int = 0):
    """One forward+backward; returns (output, input grad, {param name: grad})."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = segment(x)
    # A non-uniform upstream gradient, so every path of the backward matters.
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in segment.named_parameters()}


def compare(segment: ReversibleSegment, x: torch.Tensor, *, rtol: float) -> None:
    ordinary = copy.deepcopy(segment)
    ordinary.use_reversible_backward = False
    y, gx, grads = run_step(segment, x)
    y_ref, gx_ref, grads_ref = run_step(ordinary, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert max_rel_diff(gx, gx_ref) <= rtol
    for name, grad in grads_ref.items():
        assert grads[name] is not None, name
        assert max_rel_diff(grads[name], grad) <= rtol, name


def uses_function(segment: ReversibleSegment, x: torch.Tensor) -> bool:
    y = segment(x)
    return y.grad_fn is not None and "ReversibleFunction" in type(y.grad_fn).__name__


@pytest.mark.parametrize("depth", [1, 2, 5, 16])
def test_conv_bn_float64_matches_ordinary_autograd(depth):
    torch.manual_seed(depth)
    segment = conv_segment(depth, 8).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert uses_function(copy.deepcopy(segment), x.requires_grad_())
    compare(segment, x, rtol=1e-10)


def test_conv_bn_float32_within_documented_tolerance():
    torch.manual_seed(0)
    segment = conv_segment(16, 8)
    compare(segment, torch.randn(4, 8, 8, 8), rtol=FLOAT32_RTOL)


def _random_residual(rng: torch.Generator, kind: str, c: int, hidden: int) -> nn.Module:
    if kind == "mlp":
        act = [nn.Tanh(), nn.ReLU(), nn.GELU()][int(torch.randint(3, (1,), generator=rng))]
        return nn.Sequential(nn.Linear(c, hidden), act, nn.Linear(hidden, c))
    return nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, c, 1))


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["mlp", "conv"]),
    depth=st.integers(1, 16),
    half=st.integers(1, 4),
    hidden=st.integers(1, 6),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    halves=st.integers(0, 2**16),
)
def test_random_couplings_float64_match_ordinary_autograd(kind, depth, half, hidden, batch, seed, halves):
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # bit k of ``halves`` set: coupling k is a half coupling (F only)
    couplings = [
        ReversibleCoupling(_random_residual(rng, kind, half, hidden),
                           None if halves >> k & 1 else _random_residual(rng, kind, half, hidden))
        for k in range(depth)
    ]
    segment = ReversibleSegment(couplings).double()
    shape = (batch, 2 * half) if kind == "mlp" else (batch, 2 * half, 4, 3)
    compare(segment, torch.randn(shape, dtype=torch.float64, generator=rng), rtol=1e-10)


def test_other_split_dim_and_exit_activation():
    torch.manual_seed(0)
    couplings = [ReversibleCoupling(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Tanh())) for _ in range(3)]
    segment = ReversibleSegment(couplings, dim=-1, exit_activation=nn.ReLU()).double()
    compare(segment, torch.randn(2, 5, 6, dtype=torch.float64), rtol=1e-10)


def test_inplace_exit_activation_does_not_corrupt_saved_output():
    torch.manual_seed(0)
    act = nn.ReLU(inplace=True)
    segment = conv_segment(3, 4, exit_activation=act).double()
    compare(segment, torch.randn(2, 4, 5, 5, dtype=torch.float64), rtol=1e-10)
    assert segment.exit_activation is act and act.inplace  # the caller's module is left as it was


def test_coupling_inverse_recovers_input():
    torch.manual_seed(0)
    coupling = ReversibleCoupling(conv_bn(3), conv_bn(3)).double().eval()
    x1, x2 = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    r1, r2 = coupling.inverse(*coupling(x1, x2))
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "limit"), [(torch.float64, 1e-13), (torch.float32, 1e-5), (torch.bfloat16, 0.1), (torch.float16, 1e-2)]
)
def test_reconstruction_errors_per_dtype_and_state_untouched(dtype, limit):
    torch.manual_seed(0)
    half = 4
    couplings = [ReversibleCoupling(conv_bn(half, dropout=0.2), conv_bn(half, dropout=0.2)) for _ in range(4)]
    segment = ReversibleSegment(couplings).to(dtype)
    x = torch.randn(2, 2 * half, 6, 6).to(dtype)
    buffers = {n: b.clone() for n, b in segment.named_buffers()}
    rng = torch.get_rng_state()
    errors = segment.reconstruction_errors(x)
    assert [e.index for e in errors] == [0, 1, 2, 3]
    assert all(0 <= e.max_rel <= limit for e in errors), errors
    assert errors[0].max_abs > 0 or dtype == torch.float64  # rounding is visible in low precision
    assert torch.equal(torch.get_rng_state(), rng)
    for name, buf in segment.named_buffers():
        torch.testing.assert_close(buf, buffers[name], rtol=0, atol=0)


def test_plain_forward_without_grad():
    segment = conv_segment(2, 4)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert segment(x).grad_fn is None
    with torch.inference_mode():
        assert segment(torch.randn(1, 4, 3, 3)).grad_fn is None
    for p in segment.parameters():
        p.requires_grad_(False)
    assert segment(torch.randn(1, 4, 3, 3)).grad_fn is None


def test_ordinary_autograd_switches():
    torch.manual_seed(0)
    segment = conv_segment(2, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert uses_function(segment, x)
    with ordinary_autograd():
        assert not uses_function(segment, x)
    assert uses_function(segment, x)
    segment.use_reversible_backward = False
    assert not uses_function(segment, x)
    assert issubclass(ReversibleFunction, torch.autograd.Function)


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"couplings\[0\]"):
        ReversibleSegment([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="F must be an nn.Module"):
        ReversibleCoupling(lambda t: t, nn.Identity())
    segment = conv_segment(1, 4)
    with pytest.raises(ValueError, match="odd size 5 along dim 1"):
        segment(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        ReversibleSegment([], dim=4)(torch.randn(2, 2))
    with pytest.raises(TypeError, match="dim must be an int"):
        ReversibleSegment([], dim=True)
