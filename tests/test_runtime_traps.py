"""The traps public RevNet libraries fall into: BN statistics, dropout RNG, autocast, inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import conv_bn
from revconvert.runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd

# CPU bfloat16 autocast: ordinary autograd and the recomputation run the same bf16 kernels on inputs
# that differ only by float32 reconstruction rounding, which bf16 re-rounding occasionally flips.
AUTOCAST_BF16_RTOL = 2e-2


def segment_of(depth: int, c: int = 8, *, dropout: float = 0.0, dtype=torch.float64) -> ReversibleSegment:
    half = c // 2
    couplings = [ReversibleCoupling(conv_bn(half, dropout=dropout), conv_bn(half, dropout=dropout)) for _ in range(depth)]
    return ReversibleSegment(couplings).to(dtype)


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.float() - expected.float()).abs().max() / scale.float())


def step(segment: nn.Module, x: torch.Tensor, *, seed: int = 0, autocast: bool = False):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = segment(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return x.grad, {n: p.grad for n, p in segment.named_parameters()}


def ordinary_copy(segment: ReversibleSegment) -> ReversibleSegment:
    ordinary = copy.deepcopy(segment)
    ordinary.use_reversible_backward = False
    return ordinary


def assert_grads_close(a, b, rtol):
    gx, grads = a
    gx_ref, grads_ref = b
    assert max_rel_diff(gx, gx_ref) <= rtol
    for name, grad in grads_ref.items():
        assert max_rel_diff(grads[name], grad) <= rtol, name


# --- BatchNorm running statistics -------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_updated_once(momentum):
    torch.manual_seed(0)
    segment = segment_of(3)
    for m in segment.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ordinary = ordinary_copy(segment)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    for _ in range(2):
        step(segment, x)
        step(ordinary, x)
    for (name, buf), (_, ref) in zip(segment.named_buffers(), ordinary.named_buffers()):
        torch.testing.assert_close(buf, ref, rtol=1e-12, atol=1e-14, msg=name)
    assert int(segment.couplings[0].F[1].num_batches_tracked) == 2


def test_batchnorm_recomputation_uses_batch_statistics():
    # Running statistics far from the batch ones: a recomputation that used them (eval mode) would
    # give different gradients; the forward used batch statistics, so must the recomputation.
    torch.manual_seed(0)
    segment = segment_of(2)
    for m in segment.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    assert_grads_close(step(segment, x), step(ordinary_copy(segment), x), 1e-10)


# --- Dropout and the global generator --------------------------------------------------------------


def test_dropout_masks_replayed_and_generator_not_reseeded():
    torch.manual_seed(0)
    segment = segment_of(3, dropout=0.5)
    ordinary = ordinary_copy(segment)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    grads = step(segment, x, seed=123)
    state_after = torch.get_rng_state()
    grads_ref = step(ordinary, x, seed=123)
    assert torch.equal(state_after, torch.get_rng_state())
    assert_grads_close(grads, grads_ref, 1e-10)


def test_random_op_in_functional_code_replayed():
    class Noisy(nn.Module):
        def forward(self, t):
            return torch.tanh(t) * torch.rand_like(t)

    torch.manual_seed(0)
    segment = ReversibleSegment([ReversibleCoupling(Noisy(), nn.Sequential(nn.Linear(3, 3), Noisy())) for _ in range(4)])
    segment = segment.double()
    x = torch.randn(5, 6, dtype=torch.float64)
    grads = step(segment, x, seed=7)
    state_after = torch.get_rng_state()
    assert_grads_close(grads, step(ordinary_copy(segment), x, seed=7), 1e-10)
    assert torch.equal(state_after, torch.get_rng_state())


# --- Autocast --------------------------------------------------------------------------------------


class DtypeRecorder(nn.Module):
    """Identity that records the dtype it sees, to check the recomputation's autocast state."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def forward(self, t):
        self.seen.append(t.dtype)
        return t


def test_cpu_autocast_bfloat16_recomputation_matches_forward():
    torch.manual_seed(0)
    recorder = DtypeRecorder()
    couplings = [
        ReversibleCoupling(conv_bn(4), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), recorder)) for _ in range(2)
    ]
    segment = ReversibleSegment(couplings)
    x = torch.randn(2, 8, 6, 6)
    grads = step(segment, x, autocast=True)
    # Forward and recomputation both ran the conv in bfloat16 (2 couplings share the recorder).
    assert recorder.seen == [torch.bfloat16] * 4
    recorder.seen.clear()
    assert_grads_close(grads, step(ordinary_copy(segment), x, autocast=True), AUTOCAST_BF16_RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_ordinary(dtype):
    torch.manual_seed(0)
    segment = segment_of(3, dropout=0.2, dtype=torch.float32).cuda()
    ordinary = ordinary_copy(segment)
    x = torch.randn(4, 8, 8, 8, device="cuda")

    def cuda_step(seg):
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=dtype):
            y = seg(xx)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        return xx.grad, {n: p.grad for n, p in seg.named_parameters()}

    grads = cuda_step(segment)
    state = torch.cuda.get_rng_state()
    assert_grads_close(grads, cuda_step(ordinary), AUTOCAST_BF16_RTOL)
    assert torch.equal(state, torch.cuda.get_rng_state())


# --- Inputs ----------------------------------------------------------------------------------------


def test_leaf_input_grad_not_doubled_and_input_untouched():
    torch.manual_seed(0)
    segment = segment_of(2)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    before, version = x.detach().clone(), x._version
    segment(x).sum().backward()
    assert torch.equal(x.detach(), before) and x._version == version
    x_ref = before.clone().requires_grad_(True)
    ordinary_copy(segment)(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=0)


def test_input_without_grad_and_frozen_parameters():
    torch.manual_seed(0)
    segment = segment_of(3)
    frozen = list(segment.couplings[1].parameters()) + list(segment.couplings[0].F.parameters())
    for p in frozen:
        p.requires_grad_(False)
    ordinary = ordinary_copy(segment)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    y = segment(x)
    assert y.grad_fn is not None
    y.square().sum().backward()
    ordinary(x).square().sum().backward()
    for (name, p), (_, q) in zip(segment.named_parameters(), ordinary.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)
        else:
            assert p.grad is None, name


def test_gradient_accumulation_over_two_backwards():
    torch.manual_seed(0)
    segment = segment_of(2)
    ordinary = ordinary_copy(segment)
    xs = [torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        segment(x).square().sum().backward()
        ordinary(x).square().sum().backward()
    for (name, p), (_, q) in zip(segment.named_parameters(), ordinary.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)


def test_double_backward_raises_with_remedy():
    segment = segment_of(1)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"ReversibleSegment.*create_graph.*ordinary_autograd\(\)"):
        torch.autograd.grad(segment(x).sum(), x, create_graph=True)
    with ordinary_autograd():
        (gx,) = torch.autograd.grad(segment(x).square().sum(), x, create_graph=True)
    assert gx.requires_grad


def test_inplace_first_layer_is_refused():
    segment = ReversibleSegment([ReversibleCoupling(nn.ReLU(inplace=True), nn.Identity())])
    # Detected after the fact (the F call already ran); ordinary autograd would fail here too.
    with pytest.raises(RuntimeError, match=r"couplings\[0\]\.F modified its input in place"):
        segment(torch.randn(2, 4, requires_grad=True))
