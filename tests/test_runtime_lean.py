"""The lean backward: per coupling only the work the algorithm needs, counted in aten ops.

Each test removes one piece of overhead the runtime used to pay and would fail if it came back:
norm-statistics snapshots, RNG capture for deterministic F/G, autocast re-entry, plan rebuilding,
per-op Python dispatch for kept outputs. Also issue 12's checkpointed-part items: functional norms
updated once, torch.compile, the training flag.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

import revconvert
import revconvert.runtime._function as function
import revconvert.runtime._keep as keep_module
from conftest import OpCount, conv_bn
from revconvert import ConvertConfig, ReversibleCoupling, ReversibleSegment
from revconvert.runtime._state import autocast_as, capture_autocast, module_generation


def _segment(depth: int = 3, c: int = 8, dropout: float = 0.0) -> ReversibleSegment:
    torch.manual_seed(0)
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(c, dropout=dropout), conv_bn(c, dropout=dropout))
                             for _ in range(depth)], exit_activation=nn.ReLU())
    for m in seg.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return seg


def _step_counts(seg: nn.Module, x: torch.Tensor) -> collections.Counter[str]:
    with OpCount() as counter:
        seg(x).sum().backward()
    return counter.by_name


def test_the_memory_saving_step_adds_only_the_recomputation():
    depth, c = 3, 8
    seg = _segment(depth, c)
    x = torch.randn(2, 2 * c, 6, 6, requires_grad=True)
    _step_counts(seg, x)  # first call builds the plan
    lean = _step_counts(seg, x)
    seg.use_reversible_backward = False
    ordinary = _step_counts(seg, x)
    extra = lean - ordinary
    # Recomputing F and G once each per coupling: their convolutions, norms and ReLUs ...
    assert extra["convolution"] == depth * 2 * 2
    assert extra["native_batch_norm"] + extra["_native_batch_norm_legit_functional"] \
        + extra["_native_batch_norm_legit"] == depth * 2 * 2
    # ... and nothing else of size: no snapshot of the norm statistics, no batch-counter updates.
    for op in ("clone", "copy_", "add_", "fill_", "zero_"):
        assert extra[op] == 0, (op, extra)


def test_norm_statistics_are_updated_once_without_copies():
    seg = _segment()
    ref = copy.deepcopy(seg)
    ref.use_reversible_backward = False
    x = torch.randn(2, 16, 6, 6)
    for model in (seg, ref):
        for _ in range(2):
            model(x).sum().backward()
    for (name, a), b in zip(ref.named_buffers(), seg.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    bn = seg.couplings[0].F[1]
    assert bn.momentum == 0.1 and bn.num_batches_tracked.item() == 2


def test_rng_is_captured_only_for_functions_that_draw_random_numbers(monkeypatch):
    calls = []
    original = function.capture_rng
    monkeypatch.setattr(function, "capture_rng", lambda devices: calls.append(1) or original(devices))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    _segment()(x).sum().backward()
    assert calls == []
    _segment(dropout=0.2)(x).sum().backward()
    assert len(calls) == 3 * 2


def test_autocast_is_entered_only_when_the_state_differs(monkeypatch):
    state = capture_autocast()

    def refuse(*args, **kwargs):
        raise AssertionError("autocast entered although the state is the same")

    monkeypatch.setattr(torch, "autocast", refuse)
    with autocast_as(state):
        pass
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = capture_autocast()
    with autocast_as(other):
        assert torch.is_autocast_enabled("cpu")


def test_the_plan_is_made_once_and_remade_when_a_module_changes(monkeypatch):
    made = []
    original = function.make_plan
    import revconvert.runtime.segment as segment_module

    monkeypatch.setattr(segment_module, "make_plan", lambda *a: made.append(1) or original(*a))
    seg = _segment(2)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    for _ in range(3):
        seg(x).sum().backward()
    assert len(made) == 1
    before = module_generation()
    seg.couplings[1].G = conv_bn(8)  # a new module: its parameters must be in the plan
    assert module_generation() != before
    seg(x).sum().backward()
    assert len(made) == 2
    assert all(p.grad is not None for p in seg.couplings[1].G.parameters())


def test_named_keep_policies_run_no_dispatch_mode(monkeypatch):
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(8), conv_bn(8), keep="spatial-convs") for _ in range(2)])
    for coupling in seg.couplings:
        coupling.keep_small = True  # tiny convolutions: keep them anyway
    ref = copy.deepcopy(seg)
    ref.use_reversible_backward = False

    def refuse(self):
        raise AssertionError("a dispatch mode was entered for a named policy")

    monkeypatch.setattr(keep_module.Record, "__enter__", refuse)
    monkeypatch.setattr(keep_module.Replay, "__enter__", refuse)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    grads = []
    for model in (seg.double(), ref.double()):
        xi = x.clone().requires_grad_()
        model(xi).sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    counts = _step_counts(seg, x.clone().requires_grad_())
    seg_plain = copy.deepcopy(seg)
    for c in seg_plain.couplings:
        c.keep = None
    plain = _step_counts(seg_plain, x.clone().requires_grad_())
    assert plain["convolution"] - counts["convolution"] == 2 * 2 * 2  # both 3x3 convs of F and G


def test_a_custom_keep_policy_still_works_through_the_dispatch_mode():
    def keep_all_convs(func, args, kwargs):
        return func is torch.ops.aten.convolution.default

    seg = ReversibleSegment([ReversibleCoupling(conv_bn(8), conv_bn(8), keep=keep_all_convs)]).double()
    ref = copy.deepcopy(seg)
    ref.use_reversible_backward = False
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    out = []
    for model in (seg, ref):
        xi = x.clone().requires_grad_()
        model(xi).sum().backward()
        out.append(xi.grad)
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-10)


class FunctionalNormStem(nn.Module):
    """A stem whose batch norm is written with F.batch_norm: fx bakes its momentum into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.zeros(8))
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, 1e-5)
        x = F.relu(x)
        x = F.relu(x + self.block(x))
        x = F.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def test_checkpointed_functional_norms_update_their_statistics_once():
    torch.manual_seed(0)
    model = FunctionalNormStem().double()
    converted = revconvert.convert(model, (2, 3, 8, 8), config=ConvertConfig(checkpoint_stored=True))
    assert any(type(m).__name__ == "CheckpointedRun" for m in converted.modules())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    reference(x).sum().backward()
    converted(x).sum().backward()
    torch.testing.assert_close(converted.running_mean, reference.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(converted.running_var, reference.running_var, rtol=0, atol=1e-12)


def test_checkpointed_traced_norm_activation_layers_update_once():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = BatchNormAct2d(8)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            x = self.bn(self.conv(x))
            return (x + self.block(x)).relu()

    del timm
    torch.manual_seed(0)
    model = Net().double()
    converted = revconvert.convert(model, (2, 3, 8, 8), config=ConvertConfig(checkpoint_stored=True))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    reference(x).sum().backward()
    converted(x).sum().backward()
    want = dict(reference.named_buffers())
    for name, buf in converted.named_buffers():
        if name.startswith("bn."):
            torch.testing.assert_close(buf, want[name], rtol=0, atol=1e-12, msg=name)


def test_checkpointed_runs_follow_the_models_mode():
    model = revconvert.convert(torchvision_resnet18().eval(), (1, 3, 32, 32),
                               config=ConvertConfig(checkpoint_stored=True))
    runs = [m for m in model.modules() if type(m).__name__ == "CheckpointedRun"]
    assert runs and not any(r.training for r in runs)
    model.train()
    assert all(r.training for r in runs)


def torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


def test_torch_compile_runs_a_checkpointed_conversion():
    torch.manual_seed(0)
    model = FunctionalNormStem()
    converted = revconvert.convert(model, (2, 3, 8, 8), config=ConvertConfig(checkpoint_stored=True))
    reference = copy.deepcopy(converted)
    compiled = torch.compile(converted, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x).sum().backward()
    reference(x).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_step_never_synchronises():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).cuda()
    resnet34 = torchvision.models.resnet34(num_classes=10).cuda()  # paired: odd runs end in half couplings
    for model, config in ((model, ConvertConfig()),
                          (model, ConvertConfig(checkpoint_stored=True, keep="spatial-convs")),
                          (resnet34, ConvertConfig(pair_blocks=True))):
        converted = revconvert.convert(model, (2, 3, 64, 64), config=config).cuda()
        x = torch.randn(2, 3, 64, 64, device="cuda")
        converted(x).sum().backward()  # warm-up: plans and lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            converted(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_graph_captures_the_converted_training_step():
    """Host-bound GPUs: the memory-saving step makes no host-side decision on device values, so the
    whole step can be captured in one CUDA graph (the README's recipe); a replay on a new batch gives
    the eager step's gradients and BatchNorm statistics. In float64: two float32 runs of a
    reversible backward differ by far more than rounding wherever a nondeterministic kernel (max
    pooling's backward, cuDNN's weight gradients) feeds the reconstruction, which amplifies it."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).cuda()
    for config in (ConvertConfig(), ConvertConfig(checkpoint_stored=True, keep="spatial-convs")):
        graphed = revconvert.convert(model, (4, 3, 64, 64), config=config).cuda().double()
        eager = copy.deepcopy(graphed)
        x, x2 = torch.randn(2, 4, 3, 64, 64, device="cuda", dtype=torch.float64)
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph asks
                graphed.zero_grad(set_to_none=True)
                graphed(static_x).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graphed.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records, runs nothing: the statistics move only at replays
            graphed(static_x).sum().backward()
        static_x.copy_(x2)
        graph.replay()
        for _ in range(3):
            eager(x).sum().backward()
        eager.zero_grad(set_to_none=True)
        eager(x2).sum().backward()
        torch.cuda.synchronize()
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
        for (name, a), b in zip(eager.named_buffers(), graphed.buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _per_call_segment(depth: int = 3, c: int = 8) -> ReversibleSegment:
    """A segment whose F and G compile call by call: a SiLU keeps them from running as compiled
    couplings (test_runtime_fused.py covers those)."""
    seg = _segment(depth, c)
    for coupling in seg.couplings:
        for fn in (coupling.F, coupling.G):
            fn[2] = nn.SiLU()
    return seg


def test_compiled_functions_give_the_eager_gradients_and_statistics():
    seg = _per_call_segment().double()
    ref = copy.deepcopy(seg)
    seg.compile_options = {"backend": "aot_eager"}
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    grads = []
    for model in (seg, ref):
        for _ in range(2):  # the second step runs the cached compiled graphs
            xi = x.clone().requires_grad_()
            model(xi).sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(ref.named_buffers(), seg.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    plan = seg.plan(1)
    assert all(isinstance(call, function.CompiledCall) for call in plan.f_calls)  # really compiled
    assert not any(plan.fused)  # call by call, not as compiled couplings
    seg.compile_options = None
    assert not any(isinstance(call, function.CompiledCall) for call in seg.plan(1).f_calls)


def test_couplings_of_one_structure_share_their_compiled_graphs():
    graphs = []

    def counting_backend(gm, example_inputs):  # noqa: ANN001 - torch.compile's backend protocol
        graphs.append(gm)
        return gm.forward

    seg = _per_call_segment(depth=4)  # 8 functions of one structure (F and G alike)
    seg.compile_options = {"backend": counting_backend}
    ref = copy.deepcopy(seg)
    ref.compile_options = None
    x = torch.randn(2, 16, 6, 6)
    for model in (seg, ref):
        for _ in range(2):
            model(x.clone().requires_grad_()).sum().backward()
    # One graph for the forward (no grad), one for the recomputation (grad, frozen statistics):
    # compiling each of the 8 functions on its own would give 16.
    assert 1 <= len(graphs) <= 3, len(graphs)
    for p, r in zip(seg.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    calls = seg.plan(1).f_calls + seg.plan(1).g_calls
    assert len({id(c.runner) for c in calls}) == 1
    wider = ReversibleSegment([ReversibleCoupling(conv_bn(8), conv_bn(8)),
                               ReversibleCoupling(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)), conv_bn(8))],
                              compile={"backend": counting_backend})
    plan = wider.plan(1)
    assert plan.f_calls[0].runner is not plan.f_calls[1].runner  # another structure, its own cache
    assert plan.f_calls[0].runner is plan.g_calls[1].runner


def test_functions_that_draw_random_numbers_stay_eager_when_compiling():
    seg = ReversibleSegment([ReversibleCoupling(conv_bn(8, dropout=0.2), conv_bn(8))],
                            compile={"backend": "aot_eager"})
    plan = seg.plan(1)
    assert plan.f_calls[0] is seg.couplings[0].F and isinstance(plan.g_calls[0], function.CompiledCall)
    with pytest.raises(TypeError, match="compile"):
        ReversibleSegment([ReversibleCoupling(conv_bn(8), conv_bn(8))], compile="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_with_kept_outputs_matches_ordinary_autograd():
    from test_runtime_traps import AUTOCAST_BF16_RTOL, assert_grads_close, ordinary_copy, segment_of

    torch.manual_seed(0)
    seg = segment_of(3, 16, dtype=torch.float32).cuda()
    for coupling in seg.couplings:
        coupling.keep = keep_module.keep_spatial_convolutions
        coupling.keep_small = True  # small test convolutions: keep them anyway
    ordinary = ordinary_copy(seg)
    x = torch.randn(4, 16, 8, 8, device="cuda")

    def cuda_step(model):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(xx)
        # A weighted loss: a plain sum through a batch norm has (nearly) zero gradient.
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        return xx.grad, {n: p.grad for n, p in model.named_parameters()}

    assert_grads_close(cuda_step(seg), cuda_step(ordinary), AUTOCAST_BF16_RTOL)
