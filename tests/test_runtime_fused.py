"""Compiled couplings (``runtime/_fused.py``): with ``compile=...``, a coupling whose F and G are
Sequentials of standard layers runs as three compiled calls per training step (its forward, and one
backward step per function that recomputes, reconstructs and back-propagates without autograd),
with the eager path's values, and falls back wherever the eager path would behave differently."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import revconvert
from conftest import CountingBackend, layer_specs, sequential_of
from revconvert import ConvertConfig, ReversibleCoupling, ReversibleSegment
from revconvert.runtime._direct import direct_call
from revconvert.runtime._fused import _fusable, step_back
from revconvert.runtime._state import frozen_running_stats


def _function(c: int, bias: bool = False) -> nn.Sequential:
    """Pre-activation F or G as the conversion builds them (a ReLU first), with a biased conv if asked."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, 2 * c, 1, bias=bias), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
                         nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


def _segment(depth: int = 3, c: int = 4, bias: bool = True) -> ReversibleSegment:
    """``depth`` couplings; the first F has a biased convolution unless ``bias`` is False."""
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(_function(c, bias=bias and k == 0), _function(c))
                             for k in range(depth)],
                            exit_activation=nn.ReLU())
    for m in seg.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return seg


def _steps(model: nn.Module, x: torch.Tensor, n: int = 2, autocast: bool = False) -> list[torch.Tensor]:
    """``n`` training steps on ``x``'s device; the input's and parameters' gradients of the last one."""
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            y = model(xi)
        y.float().square().sum().backward()
    return [xi.grad] + [p.grad for p in model.parameters()]


def _assert_same(model: nn.Module, ref: nn.Module, got: list, want: list, tol: float = 0.0) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"gradient {i}: {m}")
    for (name, b), r in zip(model.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, r, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_a_compiled_coupling_is_three_calls_with_the_eager_values(autocast):
    backend = CountingBackend()
    seg, ref = _segment(), _segment()
    seg.compile_options = {"backend": backend}
    x = torch.randn(2, 8, 5, 5)
    want = _steps(ref, x, autocast=autocast)
    got = _steps(seg, x, autocast=autocast)
    # aot_eager-like execution runs the same aten ops: the values are the eager path's, bit for bit
    # in float32; under autocast the recomputed norms run on a float32 copy of their bfloat16 input
    # (see step_back), which rounds differently from the mixed-precision kernel in the last bits
    _assert_same(seg, ref, got, want, tol=1e-5 if autocast else 0.0)
    assert all(f is not None for f in seg.plan(1).fused)
    # the backward steps are inference graphs of backward ops, not autograd graphs
    assert {"convolution_backward", "native_batch_norm_backward", "threshold_backward"} <= backend.targets()
    backend.calls = 0
    _steps(seg, x, n=1, autocast=autocast)
    # call by call it is 4 per coupling with this backend (F's and G's forward and recomputation), 6
    # with inductor (AOTAutograd adds each recomputation's compiled backward)
    assert backend.calls == 3 * len(seg.couplings)


def test_compiled_couplings_share_graphs_whatever_the_depth():
    counts = []
    for depth in (3, 8):
        backend = CountingBackend()
        seg = _segment(depth, bias=False)
        seg.compile_options = {"backend": backend}
        _steps(seg, torch.randn(2, 8, 5, 5))
        counts.append(len(backend.graphs))
    assert counts[0] == counts[1] <= 6, counts


def test_compiled_couplings_match_ordinary_autograd_in_float64():
    seg = _segment().double()
    seg.compile_options = {"backend": "aot_eager"}
    ref = copy.deepcopy(seg)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    got = _steps(seg, x)
    with revconvert.ordinary_autograd():
        want = _steps(ref, x)
    _assert_same(seg, ref, got, want, tol=1e-10)
    assert seg.plan(1).fused[0] is not None


def _fallback(seg: ReversibleSegment, change, x: torch.Tensor) -> None:
    """With ``change`` made to every coupling of both copies, the compiled segment's step equals the
    eager one's and runs no compiled coupling."""
    ref = copy.deepcopy(seg)
    for coupling in (*seg.couplings, *ref.couplings):
        change(coupling)
    backend = CountingBackend()
    seg.compile_options = {"backend": backend}
    want = _steps(ref, x, n=1)
    got = _steps(seg, x, n=1)
    _assert_same(seg, ref, got, want)
    assert "convolution_backward" not in backend.targets()


def test_an_eval_mode_norm_falls_back_to_calls_of_f_and_g():
    _fallback(_segment(), lambda c: c.G[2].eval(), torch.randn(2, 8, 5, 5))


def test_a_hook_falls_back_to_calls_of_f_and_g():
    seen = []
    _fallback(_segment(), lambda c: c.F[1].register_forward_hook(lambda *a: seen.append(1)),
              torch.randn(2, 8, 5, 5))
    assert seen


def test_an_in_place_first_relu_is_not_compiled_and_still_refused():
    seg = _segment(depth=1)
    seg.couplings[0].F[0].inplace = True
    seg.compile_options = {"backend": "aot_eager"}
    x = torch.randn(2, 8, 5, 5)
    assert seg.plan(1).fused == (None,)
    with pytest.raises(RuntimeError, match=r"couplings\[0\].F modified its input in place"):
        _steps(seg, x, n=1)


def test_a_converted_resnet_compiles_its_couplings():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    compiled = revconvert.convert(model, x.shape, config=ConvertConfig(compile={"backend": "aot_eager"}))
    eager = revconvert.convert(model, x.shape)
    eager.load_state_dict(compiled.state_dict())
    segments = [m for m in compiled.modules() if isinstance(m, ReversibleSegment)]
    _assert_same(compiled, eager, _steps(compiled, x), _steps(eager, x))
    assert segments and all(f is not None for s in segments for f in s._plan.fused)


def test_inductor_on_cpu_under_autocast_runs_call_by_call():
    # torch 2.14's inductor CPU code for the backward step under bfloat16 autocast was found wrong
    # (see FusedCoupling.usable); the plan still holds the coupling for float32 and for CUDA
    seg = _segment(depth=1)
    seg.compile_options = {"backend": "inductor"}
    fused = seg.plan(1).fused[0]
    x = torch.randn(2, 4, 5, 5)
    assert fused is not None and fused.usable(x)
    with torch.autocast("cpu", torch.bfloat16):
        assert not fused.usable(x)
    seg.compile_options = {"backend": "aot_eager"}
    with torch.autocast("cpu", torch.bfloat16):
        assert seg.plan(1).fused[0].usable(x)


def _compiled_against_eager(device: str, backend: str, autocast: bool) -> None:
    """Compiled couplings' gradients against the eager path's, on two calls (inductor's CPU code under
    autocast gave a gradient that changed from call to call).

    float64: within 1e-9 of the largest gradient (a conv bias before a norm has a gradient of rounding
    noise only, so no tensor is held to its own scale). bfloat16 autocast: a compiler that fuses across
    the eager kernels' bf16 rounding points gives other bf16 results, so each path is held against
    float64 ordinary autograd instead: the compiled path's error may be at most twice the largest of
    the eager path's, ordinary bf16 autograd's and ordinary autograd's compiled by the same backend
    (what ``torch.compile`` of an unconverted model gives), plus 1e-3 of the largest gradient."""
    dtype = torch.float32 if autocast else torch.float64
    seg = _segment(depth=2).to(device, dtype)
    eager = copy.deepcopy(seg)
    seg.compile_options = {"backend": backend}
    x = torch.randn(4, 8, 6, 6, device=device, dtype=dtype)
    got, again = (_steps(seg, x, n=1, autocast=autocast) for _ in range(2))
    assert all(f is not None and f.usable(x) for f in seg.plan(1).fused)
    want = _steps(eager, x, n=1, autocast=autocast)
    if not autocast:
        floor = 1e-9 * max(w.abs().max().item() for w in want)
        for i, (g, w, a) in enumerate(zip(got, want, again, strict=True)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=floor, msg=lambda m: f"gradient {i}: {m}")
            torch.testing.assert_close(a, g, rtol=1e-9, atol=floor, msg=lambda m: f"gradient {i}, again: {m}")
        return
    ordinary = copy.deepcopy(eager)
    ordinary.use_reversible_backward = False
    truth = _steps(copy.deepcopy(ordinary).double(), x.double(), n=1)
    compiled_bf16 = _steps(torch.compile(copy.deepcopy(ordinary), backend=backend), x, n=1, autocast=True)
    bf16 = _steps(ordinary, x, n=1, autocast=True)
    floor = 1e-3 * max(t.abs().max().item() for t in truth)
    for i, (g, a, w, b, c, t) in enumerate(zip(got, again, want, bf16, compiled_bf16, truth, strict=True)):
        err = {k: (v.double() - t).abs().max().item() for k, v in
               {"compiled": g, "again": a, "eager": w, "ordinary bf16": b, "compiled ordinary": c}.items()}
        bound = 2 * max(err["eager"], err["ordinary bf16"], err["compiled ordinary"]) + floor
        assert err["compiled"] <= bound and err["again"] <= bound, (i, err, bound)
        assert (a - g).abs().max().item() <= bound, (i, "calls differ", err, bound)


def test_aot_eager_couplings_hold_the_gradient_bounds_of_the_cuda_test():
    # the CPU run of the CUDA test's checks (aot_eager runs the eager kernels, so its bounds hold trivially
    # here; what this checks is that the bounds and references themselves are well formed)
    for autocast in (False, True):
        _compiled_against_eager("cpu", "aot_eager", autocast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16-autocast"])
def test_cuda_inductor_couplings_match_the_eager_path(autocast):
    # the GPU check of what CPU tests run with aot_eager: inductor's own (Triton) code for the
    # forward and the backward steps
    _compiled_against_eager("cuda", "inductor", autocast)


def test_compiled_couplings_run_compiled_inside_torch_compile_of_the_model():
    # the segment asks for its plan in its forward; traced by the outer compile, the plan's
    # compiled calls were made inside dynamo's trace and the forward ran them eagerly ever after
    backend = CountingBackend()
    seg = _segment()
    seg.compile_options = {"backend": backend}
    model = torch.compile(nn.Sequential(nn.Conv2d(8, 8, 1), seg), backend="eager")
    x = torch.randn(2, 8, 5, 5)
    for _ in range(2):
        model(x).sum().backward()
    backend.calls = 0
    model(x).sum().backward()
    assert backend.calls == 3 * len(seg.couplings)


@pytest.mark.parametrize("options", [{"mode": "reduce-overhead"}, {"mode": "max-autotune"},
                                     {"options": {"triton.cudagraphs": True}}])
def test_compile_options_that_capture_cuda_graphs_are_refused(options):
    # a CUDA graph's outputs are overwritten by its next replay, and a segment hands its compiled
    # calls' outputs on as activations and parameter gradients: refused, not silently risked
    with pytest.raises(ValueError, match=r"captures CUDA graphs.*max-autotune-no-cudagraphs"):
        ReversibleSegment([ReversibleCoupling(_function(4), _function(4))], compile=options)
    with pytest.raises(ValueError, match="captures CUDA graphs"):
        ConvertConfig(compile=options)
    seg = _segment(depth=1)
    seg.compile_options = options  # set directly: refused when the plan is made
    with pytest.raises(ValueError, match="captures CUDA graphs"):
        seg(torch.randn(2, 8, 5, 5, requires_grad=True))
    ConvertConfig(compile={"mode": "max-autotune-no-cudagraphs"})  # accepted


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(layer_specs(), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_the_backward_step_is_autograd_for_any_layer_sequence(layers, seed):
    """step_back, run as plain code in float64, against autograd over the module call: the
    reconstruction, the accumulated input gradient and every parameter gradient, in
    ``parameters()`` order, for any Sequential the compiled couplings accept."""
    torch.manual_seed(seed)
    seq = sequential_of(layers).double()
    relus = [m for m in seq if not isinstance(m, nn.Identity)]
    refused = any(isinstance(m, nn.ReLU) and m.inplace and isinstance(p, nn.ReLU) for p, m in zip(relus, relus[1:]))
    assert _fusable(direct_call(seq)) is not refused  # autograd refuses an in-place ReLU after a ReLU
    if refused:
        return
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        shape = seq(x).shape
    other, grad = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    acc = torch.randn_like(x)
    buffers = [b.clone() for b in seq.buffers()]
    with torch.no_grad():
        rebuilt, grad_x, grads = step_back(seq, x, other, grad, acc, None)
    for b, before in zip(seq.buffers(), buffers, strict=True):
        assert torch.equal(b, before)  # running statistics untouched
    with frozen_running_stats([m for m in seq.modules() if isinstance(m, nn.BatchNorm2d)]):
        z = x.clone().requires_grad_()
        out = seq(z)
        expected = torch.autograd.grad(out, [z, *seq.parameters()], grad, allow_unused=True)
    torch.testing.assert_close(rebuilt, other - out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x, acc + expected[0], rtol=1e-10, atol=1e-10)
    assert len(grads) == len(expected) - 1
    for g, e in zip(grads, expected[1:]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
