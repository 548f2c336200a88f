"""Direct calls of F and G (``runtime/_direct.py``): the module call's results bit for bit, without
the modules' Python forward, and the module call itself wherever something could tell them apart."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import OpCount, conv_bn, layer_specs, sequential_of
from revconvert import ReversibleCoupling, ReversibleSegment, ordinary_autograd
from revconvert.runtime._direct import DirectSequential, cast_all, direct_call
from revconvert.runtime._state import frozen_running_stats


def _layers(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "bottleneck":
        seq = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                            nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                            nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8))
    elif kind == "strided":  # the settings below with numeric padding, which the direct backward takes
        seq = nn.Sequential(nn.Identity(), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=True),
                            nn.BatchNorm2d(8, affine=False, momentum=0.3, eps=1e-3), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2)), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    else:  # convolution settings the direct call must pass through, and a norm without affine
        seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=True), nn.Identity(),
                            nn.BatchNorm2d(8, affine=False, momentum=0.3, eps=1e-3), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2)))
    for m in seq.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return seq.double()


def _run(fn, seq: nn.Module, x: torch.Tensor):  # noqa: ANN001, ANN202
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), x.grad, [p.grad for p in seq.parameters()], [b.clone() for b in seq.buffers()]


def _assert_identical(a, b) -> None:  # noqa: ANN001
    for u, v in zip(a, b, strict=True):
        if isinstance(u, list):
            _assert_identical(u, v)
        else:
            assert torch.equal(u, v)


@pytest.fixture
def no_module_forward(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Makes the layers' own forward raise: a direct call must not need it."""
    def refuse(self, *args):  # noqa: ANN001, ANN002, ANN202
        raise AssertionError(f"{type(self).__name__}.forward called")
    def patch() -> None:
        for cls in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity):
            monkeypatch.setattr(cls, "forward", refuse)
    return patch


@pytest.mark.parametrize("kind", ["bottleneck", "settings"])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
def test_a_direct_call_is_the_module_call_bit_for_bit(kind, mode, no_module_forward):  # noqa: ANN001
    seq = _layers(kind).train(mode != "eval")
    twin = copy.deepcopy(seq)
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    direct = direct_call(twin)
    assert isinstance(direct, DirectSequential)
    norms, twin_norms = _norms(seq), _norms(twin)
    with frozen_running_stats(norms if mode == "frozen" else []):
        expected = _run(seq, seq, x)[:3]
    no_module_forward()
    with frozen_running_stats(twin_norms if mode == "frozen" else []):
        got = _run(direct, twin, x)[:3]
    _assert_identical(got, expected)
    _assert_identical(list(twin.buffers()), list(seq.buffers()))  # statistics and counters


def test_only_plain_sequentials_of_known_layers_get_a_direct_call():
    assert direct_call(nn.Sequential(nn.Conv2d(2, 2, 1), nn.GELU())) is None
    assert direct_call(nn.Conv2d(2, 2, 1)) is None
    assert direct_call(nn.Sequential()) is None

    class MyBN(nn.BatchNorm2d):
        pass

    assert direct_call(nn.Sequential(nn.Conv2d(2, 2, 1), MyBN(2))) is None


def _hook_on_layer(seq: nn.Sequential, fired: list) -> None:
    seq[1].register_forward_hook(lambda *_: fired.append("layer"))


def _pre_hook_on_sequential(seq: nn.Sequential, fired: list) -> None:
    seq.register_forward_pre_hook(lambda *_: fired.append("sequential"))


def _backward_hook_on_conv(seq: nn.Sequential, fired: list) -> None:
    seq[1].register_full_backward_hook(lambda *_: fired.append("backward"))


def _forward_replaced(seq: nn.Sequential, fired: list) -> None:
    conv = seq[1]
    conv.forward = lambda x: (fired.append("forward"), nn.Conv2d.forward(conv, x))[1]


@pytest.mark.parametrize("observe", [_hook_on_layer, _pre_hook_on_sequential, _backward_hook_on_conv,
                                     _forward_replaced])
def test_hooks_and_replaced_forwards_see_the_module_calls(observe):  # noqa: ANN001
    seq = _layers("bottleneck").train()
    twin = copy.deepcopy(seq)
    fired, twin_fired = [], []
    observe(seq, fired)
    observe(twin, twin_fired)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    _assert_identical(_run(direct_call(twin), twin, x), _run(seq, seq, x))
    assert twin_fired == fired and fired


def test_global_hooks_and_function_modes_see_the_module_calls():
    seq = _layers("bottleneck").train()
    direct = direct_call(copy.deepcopy(seq))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, *_: seen.append(type(m).__name__))
    try:
        direct(x)
    finally:
        handle.remove()
    assert seen.count("BatchNorm2d") == 3

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Calls() as calls:
        direct(x)
    assert "batch_norm" in calls.names and calls.names.count("relu") + calls.names.count("relu_") == 3


@pytest.mark.parametrize("change", ["reflect", "cumulative", "untracked", "one value"])
def test_layers_the_direct_path_does_not_reproduce_run_as_modules(change):  # noqa: ANN001
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double().train()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    if change == "reflect":
        seq[0].padding_mode = "reflect"
    elif change == "cumulative":
        seq[1].momentum = None
    elif change == "untracked":
        seq[1].track_running_stats = False
    else:
        x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    twin = copy.deepcopy(seq)
    if change == "one value":
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            seq(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            direct_call(twin)(x)
        return
    _assert_identical(_run(direct_call(twin), twin, x), _run(seq, seq, x))


def test_a_segment_runs_its_functions_directly_forward_and_backward(no_module_forward):  # noqa: ANN001
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(4), conv_bn(4)) for _ in range(3)]).double()
    ref = copy.deepcopy(seg)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with ordinary_autograd():
        expected = _run(ref, ref, x)
    plan = seg.plan(1)
    assert all(isinstance(call, DirectSequential) for call in plan.f_calls + plan.g_calls)
    no_module_forward()  # neither the forward nor the recomputation may call a layer module
    got = _run(seg, seg, x)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    for g, r in zip(got[1:3], expected[1:3]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    _assert_identical(got[3], expected[3])  # running statistics updated once, as ordinary autograd does


def test_keep_with_nothing_worth_keeping_runs_directly_from_the_second_step(no_module_forward):  # noqa: ANN001
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(4), conv_bn(4), keep="spatial-convs") for _ in range(2)])
    seg = seg.double()
    ref = copy.deepcopy(seg)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)  # 3x3 convolutions far below MIN_KEPT_FLOPS
    _run(seg, seg, x)  # the first step records, and its recomputation checks, that nothing is kept
    with ordinary_autograd():
        _run(ref, ref, x)
        expected = _run(ref, ref, x)
    no_module_forward()  # recording and replaying go through the layer modules: not any more
    got = _run(seg, seg, x)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)
    for g, r in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    _assert_identical(got[3], expected[3])


def test_tensor_subclasses_with_torch_function_see_the_module_calls():
    class Seen(torch.Tensor):
        funcs: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            cls.funcs.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    seq = _layers("bottleneck").train()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64).as_subclass(Seen)
    out = direct_call(copy.deepcopy(seq))(x)
    assert torch.nn.functional.batch_norm in Seen.funcs  # the module's own call, not torch.batch_norm
    assert torch.equal(out.as_subclass(torch.Tensor), seq(x).as_subclass(torch.Tensor))
    assert direct_call(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())) is not None


def _norms(seq: nn.Module) -> list[nn.Module]:
    return [m for m in seq.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("kind", ["bottleneck", "strided"])
@pytest.mark.parametrize("need_input", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, "autocast"])
def test_the_direct_backward_is_autograd_bit_for_bit(kind, need_input, dtype, no_module_forward):  # noqa: ANN001
    """DirectSequential.vjp, as the recomputation runs it (statistics frozen, grad mode on), against
    torch.autograd.grad over the module call: the same output, gradients and buffers, bit for bit.
    "autocast": float32 layers and input under CPU bfloat16 autocast (the casts and their backward)."""
    amp = dtype == "autocast"
    dtype = torch.float32 if amp else dtype
    seq = _layers(kind).to(dtype).train()
    twin = copy.deepcopy(seq)
    x = torch.randn(4, 8, 9, 9, dtype=dtype)
    with frozen_running_stats(_norms(seq)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        z = x.clone().requires_grad_(need_input)
        out = seq(z)
        assert (out.dtype == torch.bfloat16) == amp
        grad = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)  # float32: cast to out's dtype
        expected = torch.autograd.grad(out, ([z] if need_input else []) + list(seq.parameters()), grad)
    no_module_forward()
    with frozen_running_stats(_norms(twin)), torch.enable_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        got = direct_call(twin).vjp(x, grad, need_input)
    assert got is not None
    got_out, got_input, got_params = got
    assert torch.equal(got_out, out.detach()) and not got_out.requires_grad
    if need_input:
        assert torch.equal(got_input, expected[0])
    else:
        assert got_input is None
    _assert_identical(got_params, list(expected[need_input:]))
    _assert_identical(list(twin.buffers()), list(seq.buffers()))


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(layer_specs(), min_size=1, max_size=7), need_input=st.booleans(),
       amp=st.booleans(), seed=st.integers(0, 2**16))
def test_the_direct_backward_is_autograd_bit_for_bit_for_any_layer_sequence(layers, need_input, amp, seed):  # noqa: ANN001
    """Any plain Sequential of the four layer kinds the direct path runs, with float32 tensors
    (optionally under CPU bfloat16 autocast): the direct backward's output, gradients and statistics
    equal autograd's bit for bit; where autograd refuses (an in-place ReLU overwriting a tensor its
    backward needs), the direct backward declines, so that the caller's autograd raises the same."""
    torch.manual_seed(seed)
    seq = sequential_of(layers)
    twin = copy.deepcopy(seq)
    x = torch.randn(3, 4, 7, 7)
    params = list(seq.parameters())
    with frozen_running_stats(_norms(seq)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        z = x.clone().requires_grad_(need_input)
        out = seq(z)
        grad = torch.linspace(-1, 1, out.numel()).view_as(out)
        inputs = ([z] if need_input else []) + params
        try:
            expected = torch.autograd.grad(out, inputs, grad, allow_unused=True) if out.requires_grad else None
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)  # a ReLU in place after a ReLU
            expected = "refused"
    with frozen_running_stats(_norms(twin)), torch.enable_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        got = direct_call(twin).vjp(x, grad, need_input)
    if expected == "refused":
        assert got is None
        return
    if expected is None:  # nothing requires grad (no parameters, input not needed): nothing to compare
        return
    if got is None:
        # the direct backward declines every in-place ReLU after a ReLU, also where autograd would not
        # need the overwritten result (the first ReLU's backward, when the input's gradient is not asked)
        computing = [spec for spec in layers if spec[0] != "identity"]
        assert any(a[0] == "relu" and b == ("relu", True) for a, b in zip(computing, computing[1:]))
        return
    got_out, got_input, got_params = got
    assert torch.equal(got_out, out.detach())
    if need_input:
        assert torch.equal(got_input, expected[0])
    for g, e in zip(got_params, expected[need_input:], strict=True):
        assert (g is None and e is None) or torch.equal(g, e)
    _assert_identical(list(twin.buffers()), list(seq.buffers()))


@pytest.mark.parametrize("case", ["eval", "string padding", "hook", "reflect", "input in place",
                                  "relu result in place"])
def test_the_direct_backward_declines_what_only_autograd_reproduces(case):  # noqa: ANN001
    seq = _layers("settings" if case == "string padding" else "bottleneck").train(case != "eval")
    if case == "input in place":
        seq[0].inplace = True  # the first layer, a ReLU
    if case == "relu result in place":
        seq.insert(4, nn.ReLU(inplace=True))  # after the in-place ReLU at 3: overwrites what it saved
    if case == "hook":
        seq[2].register_forward_hook(lambda *_: None)
    if case == "reflect":
        seq[1].padding_mode = "reflect"
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    grad = torch.ones_like(direct_call(copy.deepcopy(seq))(x))
    assert direct_call(seq).vjp(x, grad, True) is None


def test_a_segment_backward_uses_the_direct_backward_and_gets_autograds_gradients(monkeypatch):  # noqa: ANN001
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(4), conv_bn(4)) for _ in range(3)]).double()
    ref = copy.deepcopy(seg)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    vjp = DirectSequential.vjp
    calls = []
    monkeypatch.setattr(DirectSequential, "vjp", lambda self, *a: calls.append(1) or vjp(self, *a))
    got = _run(seg, seg, x)
    assert len(calls) == 6  # every F and G of the three couplings
    monkeypatch.setattr(DirectSequential, "vjp", lambda self, *a: None)  # autograd's recomputation
    _assert_identical(got, _run(ref, ref, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["bottleneck", "strided"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_the_direct_backward_matches_autograd_on_cuda(kind, amp):  # noqa: ANN001
    """On CUDA the norms run cuDNN's kernels, whose backward the direct path calls through
    _batch_norm_impl_index_backward. float64 with a tight tolerance (cuDNN's weight gradients may sum
    in any order); under autocast float32 layers, with the reduced precision's tolerance."""
    seq = _layers(kind).cuda().train()
    if amp is not None:
        seq = seq.float()
    twin = copy.deepcopy(seq)
    dtype = torch.float64 if amp is None else torch.float32
    tol = {"rtol": 1e-10, "atol": 1e-12} if amp is None else {"rtol": 2e-2, "atol": 2e-2}
    x = torch.randn(4, 8, 9, 9, dtype=dtype, device="cuda")
    with frozen_running_stats(_norms(seq)), torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
        z = x.clone().requires_grad_()
        out = seq(z)
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device="cuda").view_as(out)
        expected = torch.autograd.grad(out, [z, *seq.parameters()], grad)
    with frozen_running_stats(_norms(twin)), torch.enable_grad(), \
            torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
        got = direct_call(twin).vjp(x, grad, True)
    assert got is not None
    torch.testing.assert_close(got[0], out.detach(), **tol)
    for g, e in zip([got[1], *got[2]], expected, strict=True):
        torch.testing.assert_close(g, e, **tol)  # dtypes too: each gradient in its tensor's dtype
    for b, e in zip(twin.buffers(), seq.buffers(), strict=True):
        torch.testing.assert_close(b, e, **tol)


def test_a_direct_call_counts_its_norms_batches_in_one_op():
    # three training norms: one _foreach_add_ for their batch counters instead of one add_ each;
    # the counters end where the module call leaves them (a frozen norm's counter is untouched)
    seq = nn.Sequential(*(m for _ in range(3) for m in (nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())))
    seq[4].eval()
    twin = copy.deepcopy(seq)
    x = torch.randn(2, 4, 3, 3)
    with OpCount() as count:
        direct_call(seq)(x)
    twin(x)
    assert count.ops[torch.ops.aten._foreach_add_.Scalar] == 1
    assert count.ops[torch.ops.aten.add_.Tensor] == 0
    _assert_identical(list(seq.buffers()), list(twin.buffers()))
    assert [int(m.num_batches_tracked) for m in seq if isinstance(m, nn.BatchNorm2d)] == [1, 0, 1]


@pytest.mark.parametrize("kind", ["bottleneck", "strided"])
def test_under_autocast_a_direct_call_casts_its_weights_in_one_op(kind):  # noqa: ANN001
    # autocast casts each convolution's weight (and bias) on its own: one kernel each. The forward (as
    # the segment runs it, outside autograd) casts them all in one _foreach_copy_; the recomputation
    # does too, and casts the parameter gradients back in one more. Values: those of the module call
    # and of autograd, bit for bit; only the input of the first convolution is cast alone.
    seq = _layers(kind).float().train()
    twin = copy.deepcopy(seq)
    convs = sum(isinstance(m, nn.Conv2d) for m in seq)
    x = torch.randn(4, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        expected = seq(x)
        with OpCount() as count:
            got = direct_call(twin)(x)
    assert torch.equal(got, expected) and got.dtype == torch.bfloat16
    _assert_identical(list(twin.buffers()), list(seq.buffers()))
    assert count.ops[torch.ops.aten._foreach_copy_.default] == 1
    assert count.ops[torch.ops.aten._to_copy.default] == 1  # the input
    assert count.ops[torch.ops.aten.convolution.default] == convs

    grad = torch.linspace(-1, 1, got.numel()).view_as(got)
    with frozen_running_stats(_norms(seq)), torch.autocast("cpu", dtype=torch.bfloat16):
        z = x.clone().requires_grad_()
        out = seq(z)
        want = torch.autograd.grad(out, [z, *seq.parameters()], grad)
    with frozen_running_stats(_norms(twin)), torch.autocast("cpu", dtype=torch.bfloat16), OpCount() as count:
        got_out, got_input, got_params = direct_call(twin).vjp(x, grad, True)
    assert torch.equal(got_out, out.detach())
    _assert_identical([got_input, *got_params], list(want))
    assert count.ops[torch.ops.aten._foreach_copy_.default] == 2  # the weights, then their gradients
    # besides those: the input's cast, the incoming gradient's, and the input gradient's cast back
    assert count.ops[torch.ops.aten._to_copy.default] == 3


def test_cast_all_gives_what_to_gives_in_one_op_per_pair_of_dtypes():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 3, 3), torch.randn(5).half()
    c = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    d = torch.randn(3, dtype=torch.float64)
    tensors = [a, None, b, c, d, a]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, None, torch.float32]
    with OpCount() as count:
        got = cast_all(tensors, dtypes)
    assert got[1] is None and got[4] is d and got[5] is a  # nothing to cast: the tensor itself
    for g, t, dtype in zip(got, tensors, dtypes):
        if t is not None and dtype is not None:
            want = t.to(dtype)
            assert g.dtype == dtype and torch.equal(g, want) and g.stride() == want.stride()
    # float32 -> bfloat16 (a, c) in one op; float16 -> bfloat16 (b) alone, as Tensor.to
    assert count.ops[torch.ops.aten._foreach_copy_.default] == 1
    assert count.ops[torch.ops.aten._to_copy.default] == 1


@pytest.mark.parametrize("amp", [False, True, "no-cache"], ids=["float32", "bf16-autocast", "bf16-no-cache"])
def test_a_segment_forward_casts_and_counts_for_all_its_functions_at_once(amp):  # noqa: ANN001
    # One _foreach_copy_ casts every F's and G's convolution weights for the segment's forward (under
    # autocast), one _foreach_add_ counts every norm's batch; the backward casts each coupling's F and
    # G weights in one op, and each function's gradients back in one. Values, gradients, statistics
    # and counters: those of the same segment run through module calls (a global hook), bit for bit.
    # With autocast's weight cache off, nothing is held: each function casts its own weights.
    torch.manual_seed(0)
    couplings = 3
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(4), conv_bn(4)) for _ in range(couplings)])
    via_modules = copy.deepcopy(seg)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", torch.bfloat16, enabled=bool(amp), cache_enabled=amp != "no-cache"):
        with OpCount() as count:
            got = _run(seg, seg, x)
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
        try:
            expected = _run(via_modules, via_modules, x)
        finally:
            hook.remove()
    _assert_identical(got, expected)
    assert [int(m.num_batches_tracked) for m in _norms(seg)] == [1] * 4 * couplings
    assert count.ops[torch.ops.aten._foreach_add_.Scalar] == 1
    assert count.ops[torch.ops.aten.add_.Tensor] == 0
    # forward: once for the segment; each recomputed function: its weights, its gradients back
    forward = {False: 0, True: 1, "no-cache": 2 * couplings}[amp]
    assert count.ops[torch.ops.aten._foreach_copy_.default] == forward + (3 * couplings if amp else 0)


@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16-autocast"])
def test_kept_outputs_run_directly_and_skip_their_convolutions(autocast, no_module_forward):  # noqa: ANN001
    # keep="spatial-convs" through the direct calls: the forward keeps each 3x3 convolution's output,
    # the backward hands it back instead of recomputing it. F's first convolution feeds an in-place
    # ReLU, which changes its output after it was kept: that one is recomputed, as the replay does.
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.float64

    def function(inplace: bool) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(inplace=inplace),
                             nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    seg = ReversibleSegment([ReversibleCoupling(function(True), function(False), keep="spatial-convs")
                             for _ in range(2)]).to(dtype)
    for coupling in seg.couplings:
        coupling.keep_small = True  # tiny convolutions: keep them anyway
    via_modules, ordinary = copy.deepcopy(seg), copy.deepcopy(seg)
    ordinary.use_reversible_backward = False
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        expected = _run(ordinary, ordinary, x)
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
        try:  # a global hook: the functions are called as modules, the kept outputs replayed through them
            modules_path = _run(via_modules, via_modules, x)
        finally:
            hook.remove()
        no_module_forward()
        with OpCount() as count:
            got = _run(seg, seg, x)
    assert count.ops[torch.ops.aten.convolution.default] == 8 + 2  # 8 in the forward; recomputed: only the 2 convolutions changed in place
    _assert_identical(got, modules_path)
    tol = 2e-2 if autocast else 1e-10
    for g, r in zip([got[1], *got[2]], [expected[1], *expected[2]], strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * float(r.abs().max()))
