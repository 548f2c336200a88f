"""Half couplings (``ReversibleCoupling(F)``: ``y1 = x1 + F(x2)``, ``y2 = x2``) through every path of
the runtime: the memory-saving backward, partial gradients, dropout, autocast, kept outputs, compiled
functions and the reconstruction check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import CountingBackend, OpCount, conv_bn
from revconvert.runtime import ReversibleCoupling, ReversibleSegment, ordinary_autograd


def _mixed(dropout: float = 0.0, keep=None) -> ReversibleSegment:  # noqa: ANN001
    """half, full, half couplings on 8 channels, every norm away from its identity start."""
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(4, dropout=dropout), keep=keep),
                             ReversibleCoupling(conv_bn(4, dropout=dropout), conv_bn(4), keep=keep),
                             ReversibleCoupling(conv_bn(4, dropout=dropout), keep=keep)],
                            exit_activation=nn.ReLU())
    for m in seg.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        if isinstance(m, ReversibleCoupling):
            m.keep_small = True  # tiny convolutions: keep them anyway, to test the mechanism
    return seg


def _step(seg: nn.Module, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor | None]:
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = seg(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y).to(y.device)).sum().backward()
    return [x.grad] + [p.grad for p in seg.parameters()]


def _compare(seg: ReversibleSegment, x: torch.Tensor, tol: float, autocast: bool = False) -> None:
    ref = copy.deepcopy(seg)
    ref.use_reversible_backward = False
    got, want = _step(seg, x, autocast), _step(ref, x, autocast)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None, i
            continue
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"gradient {i}: {m}")
    for (name, a), b in zip(seg.named_buffers(), ref.buffers(), strict=True):  # statistics updated once
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_a_half_coupling_passes_x2_through_and_inverts():
    torch.manual_seed(0)
    coupling = ReversibleCoupling(conv_bn(3)).double().eval()
    assert coupling.G is None and coupling.functions == (coupling.F,)
    x1, x2 = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    y1, y2 = coupling(x1, x2)
    assert y2 is x2
    torch.testing.assert_close(y1, x1 + coupling.F(x2), rtol=0, atol=0)
    r1, r2 = coupling.inverse(y1, y2)
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    assert r2 is x2


def test_half_couplings_match_ordinary_autograd_in_float64_with_dropout():
    _compare(_mixed(dropout=0.3).double(), torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True),
             tol=1e-10)


def test_a_half_coupling_runs_only_f_and_its_recomputation():
    seg = _mixed()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with OpCount() as count:
        _step(seg, x)
    # F of three couplings and G of one, each two convolutions: forward, recomputation, backward
    assert count.ops[torch.ops.aten.convolution.default] == 2 * 4 * 2
    assert count.ops[torch.ops.aten.convolution_backward.default] == 2 * 4


def test_half_couplings_with_frozen_first_functions_and_an_input_without_grad():
    # Nothing upstream of the last couplings needs a gradient: the backward stops early, and the
    # gradients it does give are ordinary autograd's.
    seg = _mixed().double()
    for p in (*seg.couplings[0].parameters(), *seg.couplings[1].F.parameters()):
        p.requires_grad_(False)
    _compare(seg, torch.randn(2, 8, 5, 5, dtype=torch.float64), tol=1e-10)


def test_half_couplings_under_cpu_bfloat16_autocast():
    _compare(_mixed(), torch.randn(2, 8, 6, 6, requires_grad=True), tol=2e-2, autocast=True)


def test_half_couplings_keeping_their_convolutions():
    seg = _mixed(keep="spatial-convs").double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    _compare(seg, x, tol=1e-10)
    with OpCount() as count:
        _step(seg, x)
    # every 3x3 convolution kept: the recomputation runs none
    assert count.ops[torch.ops.aten.convolution.default] == 2 * 4


def test_a_compiled_half_coupling_is_two_calls_with_the_eager_gradients():
    seg = _mixed().double()
    seg.compile_options = {"backend": "aot_eager"}
    plan = seg.plan(1)
    assert all(f is not None for f in plan.fused) and plan.g_calls[0] is None and plan.fused[0].g_call is None
    _compare(seg, torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True), tol=1e-10)
    # forward and F's backward step for each half coupling; forward, G's and F's steps for the full one
    backend = CountingBackend()
    seg.compile_options = {"backend": backend}
    _step(seg, torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True))
    assert backend.calls == 2 + 3 + 2


def test_reconstruction_errors_of_half_couplings():
    seg = _mixed(dropout=0.2)
    errors = seg.reconstruction_errors(torch.randn(2, 8, 5, 5))
    assert [e.index for e in errors] == [0, 1, 2]
    assert all(e.max_rel < 1e-5 for e in errors), errors
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    torch.manual_seed(2)
    with ordinary_autograd():  # and the plain forward agrees with the Function's
        plain = seg(x)
    torch.manual_seed(2)
    torch.testing.assert_close(seg(x), plain, rtol=0, atol=0)


def test_g_must_be_a_module_or_none():
    with pytest.raises(TypeError, match="G must be an nn.Module or None"):
        ReversibleCoupling(nn.Identity(), lambda t: t)
