"""``cuda_graphs``: a segment's training step captured as two graphs and replayed.

On a CPU the orchestration runs against ``conftest.FakeGraphBackend``, which has a CUDA graph's static-memory
semantics: a capture runs nothing that stays (its outputs hold garbage until the first replay, and the
runtime puts back what it changed), and a replay recomputes the captured function and writes the result
into the captured outputs, so whatever holds those tensors sees them change. The CUDA tests at the end
replay real graphs.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import revconvert
from conftest import FakeGraphBackend as FakeBackend, conv_bn
from revconvert.runtime import ReversibleCoupling, ReversibleSegment, keep_spatial_convolutions
from revconvert.runtime import _graphs

CUDA = torch.cuda.is_available()


@pytest.fixture
def fake(monkeypatch):
    backend = FakeBackend()
    monkeypatch.setitem(_graphs.BACKENDS, "cpu", backend)
    return backend


def segment_of(depth=3, c=8, *, graphs=True, dropout=0.0):
    torch.manual_seed(0)
    couplings = [ReversibleCoupling(conv_bn(c // 2, dropout=dropout), conv_bn(c // 2, dropout=dropout))
                 for _ in range(depth)]
    segment = ReversibleSegment(couplings, exit_activation=nn.ReLU(), cuda_graphs=graphs).double()
    for m in segment.modules():  # away from the identity, so that every gradient is nonzero
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return segment


def train_steps(model, xs, *, lr=0.1, zero=True):
    """SGD steps on ``xs``; the outputs and the input gradients of each."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for x in xs:
        x = x.detach().clone().requires_grad_()
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), x.grad))
        opt.step()
        if zero:
            opt.zero_grad(set_to_none=True)
    return outs


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(s, t), name


def batches(n, shape=(4, 8, 6, 6)):
    torch.manual_seed(1)
    return [torch.randn(shape, dtype=torch.float64) for _ in range(n)]


def test_replayed_steps_equal_eager_steps(fake):
    graphed = segment_of()
    eager = segment_of(graphs=False)
    xs = batches(4)
    for (y, gx), (y_ref, gx_ref) in zip(train_steps(graphed, xs), train_steps(eager, xs)):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    # parameters after four SGD steps and the norms' statistics and counters (moved once per step)
    assert_same_state(graphed, eager)
    assert fake.captures == 2  # one forward and one backward graph, captured once
    assert fake.replays == 8  # and replayed at every step


def test_norm_statistics_move_once_per_step_not_in_the_warmups(fake):
    graphed = segment_of()
    eager = segment_of(graphs=False)
    x = batches(1)
    train_steps(graphed, x)
    train_steps(eager, x)
    counters = [b for n, b in graphed.named_buffers() if n.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 1 for c in counters)
    assert_same_state(graphed, eager)


def test_a_second_forward_before_the_backward(fake):
    """Two calls before one backward (a siamese model): each backward replays from its own output."""
    graphed, eager = segment_of(), segment_of(graphs=False)
    a, b = batches(2)
    grads = []
    for model in (graphed, eager):
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ya, yb = model(xa), model(xb)
        (ya * yb.detach().flip(0) + 2 * yb).sum().backward()
        grads.append((xa.grad, xb.grad, [p.grad.clone() for p in model.parameters()]))
    (ga, gb, gp), (ra, rb, rp) = grads
    assert torch.equal(ga, ra) and torch.equal(gb, rb)
    assert all(torch.equal(p, q) for p, q in zip(gp, rp))
    assert fake.captures == 2


def test_gradients_accumulate_across_steps_without_zeroing(fake):
    """A graph-owned tensor never becomes a ``.grad``: two backward passes add up, as eagerly."""
    graphed, eager = segment_of(), segment_of(graphs=False)
    xs = batches(2)
    train_steps(graphed, xs, lr=0.0, zero=False)
    train_steps(eager, xs, lr=0.0, zero=False)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad)
    grad = next(graphed.parameters()).grad
    assert all(grad.data_ptr() != s.data_ptr()
               for step in graphed._graphs.steps.values() for s in step.static_grads if s is not None)


def test_a_new_shape_mode_or_requires_grad_captures_again(fake):
    graphed, eager = segment_of(), segment_of(graphs=False)
    small, big = batches(1)[0], batches(1, (2, 8, 10, 10))[0]
    for model in (graphed, eager):
        train_steps(model, [small, big, small])
    assert fake.captures == 4  # two shapes; the first is replayed again at the third step
    assert_same_state(graphed, eager)
    for model in (graphed, eager):
        model.couplings[0].requires_grad_(False)
        train_steps(model, [small])
    assert fake.captures == 6
    assert graphed.couplings[0].F[0].weight.grad is None
    assert_same_state(graphed, eager)
    for model in (graphed, eager):
        model.eval()
        train_steps(model, [small])
    assert fake.captures == 8
    assert_same_state(graphed, eager)


def test_changed_settings_or_tensors_capture_again(fake):
    graphed, eager = segment_of(), segment_of(graphs=False)
    x = batches(1)
    for model in (graphed, eager):
        train_steps(model, x)
    for model in (graphed, eager):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.5  # an attribute, not a tensor: a graph would keep the old value
        train_steps(model, x)
    assert fake.captures == 4
    assert_same_state(graphed, eager)
    for model in (graphed, eager):
        model.float()  # new tensors at new addresses
        train_steps(model, [t.float() for t in x])
    assert fake.captures == 6
    assert_same_state(graphed, eager)


def test_at_most_max_steps_captured_steps_are_kept(fake, monkeypatch):
    monkeypatch.setattr(_graphs, "MAX_STEPS", 2)
    graphed = segment_of()
    train_steps(graphed, [torch.randn(n, 8, 4, 4, dtype=torch.float64) for n in (1, 2, 3)])
    assert len(graphed._graphs.steps) == 2


@pytest.mark.parametrize("case", ["dropout", "keep", "hook", "momentum-none", "compile"])
def test_runs_eagerly_with_a_warning_where_a_graph_cannot_reproduce_the_step(fake, case):
    graphed = segment_of(dropout=0.3 if case == "dropout" else 0.0)
    if case == "keep":
        graphed.couplings[0].keep = keep_spatial_convolutions
    elif case == "hook":
        graphed.couplings[1].G[0].register_forward_hook(lambda m, i, o: None)
    elif case == "momentum-none":
        graphed.couplings[2].F[1].momentum = None
    elif case == "compile":
        graphed.compile_options = {}
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    xs = batches(2)
    with pytest.warns(UserWarning, match="cuda_graphs=True. runs eagerly") as record:
        if case == "compile":  # the plan alone: compiling here would take minutes
            graphed.plan(1)
            graphed._graphs = _graphs.SegmentGraphs()
            assert graphed._graphs.step_for(graphed, graphed.plan(1), xs[0]) is None
        else:
            torch.manual_seed(3)
            out = train_steps(graphed, xs)
    assert len(record) == 1  # once per segment and reason
    assert fake.captures == 0
    if case != "compile":
        torch.manual_seed(3)
        for (y, gx), (y_ref, gx_ref) in zip(out, train_steps(eager, xs)):
            assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_watched_ops_run_eagerly_without_a_warning(fake):
    graphed = segment_of()
    x = batches(1)[0].requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            graphed(x).sum().backward()
    assert counter.get_total_flops() > 0
    assert fake.captures == 0


def test_a_failed_capture_runs_that_input_eagerly(fake):
    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    fake.capture = broken
    graphed, eager = segment_of(), segment_of(graphs=False)
    xs = batches(2)
    with pytest.warns(UserWarning, match="its capture failed .RuntimeError: operation not permitted"):
        out = train_steps(graphed, xs)
    for (y, gx), (y_ref, gx_ref) in zip(out, train_steps(eager, xs)):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert_same_state(graphed, eager)  # the warm-ups' statistics were put back
    assert len(graphed._graphs.failed) == 1


def test_no_cuda_device_warns_and_runs_eagerly():
    graphed, eager = segment_of(), segment_of(graphs=False)
    xs = batches(1)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device") as record:
        out = train_steps(graphed, xs)
    assert record[0].filename == __file__  # the caller's line that ran the model
    assert torch.equal(out[0][1], train_steps(eager, xs)[0][1])


def test_double_backward_is_refused(fake):
    graphed = segment_of()
    x = batches(1)[0].requires_grad_()
    y = graphed(x)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_copies_and_pickles_drop_the_captured_steps(fake):
    graphed = segment_of()
    train_steps(graphed, batches(1))
    assert graphed._graphs.steps
    for twin in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert twin._graphs is None and twin.cuda_graphs
        train_steps(twin, batches(1))
    assert fake.captures == 6


def test_convert_config_sets_cuda_graphs_on_every_segment(fake):
    import torchvision
    model = torchvision.models.resnet18(num_classes=4).double()
    converted = revconvert.convert(model, torch.randn(1, 3, 32, 32, dtype=torch.float64),
                                   config=revconvert.ConvertConfig(cuda_graphs=True))
    segments = [m for m in converted.modules() if isinstance(m, ReversibleSegment)]
    assert segments and all(s.cuda_graphs for s in segments)
    eager = copy.deepcopy(converted)
    for s in eager.modules():
        if isinstance(s, ReversibleSegment):
            s.cuda_graphs = False
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    for (y, gx), (y_ref, gx_ref) in zip(train_steps(converted, xs), train_steps(eager, xs)):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert_same_state(converted, eager)
    assert fake.captures == 2 * len(segments)
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        revconvert.ConvertConfig(cuda_graphs="yes")


# --- CUDA ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _cuda_pair(dtype=torch.float32, pair=False):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    config = revconvert.ConvertConfig(cuda_graphs=True, pair_blocks=pair)
    graphed = revconvert.convert(model, torch.randn(1, 3, 64, 64), config=config).cuda().to(dtype)
    eager = copy.deepcopy(graphed)
    for s in eager.modules():
        if isinstance(s, ReversibleSegment):
            s.cuda_graphs = False
    for m in graphed.modules():  # away from the identity start
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    eager.load_state_dict(graphed.state_dict())
    return graphed, eager


@needs_cuda
@pytest.mark.parametrize("pair", [False, True])
def test_cuda_graphs_equal_eager_in_float64(pair):
    graphed, eager = _cuda_pair(torch.float64, pair)
    xs = [torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float64) for _ in range(3)]
    torch.backends.cudnn.deterministic = True
    try:
        for (y, gx), (y_ref, gx_ref) in zip(train_steps(graphed, xs), train_steps(eager, xs)):
            assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-12)
            assert torch.allclose(gx, gx_ref, rtol=1e-8, atol=1e-12)
        for (name, s), t in zip(graphed.state_dict().items(), eager.state_dict().values()):
            assert torch.allclose(s.double(), t.double(), rtol=1e-8, atol=1e-10), name
    finally:
        torch.backends.cudnn.deterministic = False
    segments = [m for m in graphed.modules() if isinstance(m, ReversibleSegment)]
    assert all(s._graphs.captures == 1 for s in segments)


@needs_cuda
def test_cuda_graphs_under_bf16_autocast_match_eager():
    graphed, eager = _cuda_pair()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    grads = []
    for model in (graphed, eager):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-2


@needs_cuda
def test_cuda_replayed_steps_do_not_synchronise():
    graphed, _ = _cuda_pair()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    opt = torch.optim.SGD(graphed.parameters(), lr=0.1)
    for sync_mode in ("default", "error"):  # the first step captures; the second must replay
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            graphed(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_memory_profile_estimates_the_eager_step_without_capturing(fake):
    import torchvision
    model = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed = revconvert.memory_profile(model, batch_size=2, input_size=32,
                                            config=revconvert.ConvertConfig(cuda_graphs=True))
    eager = revconvert.memory_profile(model, batch_size=2, input_size=32)
    assert graphed.converted.peak_bytes == eager.converted.peak_bytes
    assert fake.captures == 0


def test_reset_cuda_graphs_captures_again(fake):
    graphed = segment_of()
    train_steps(graphed, batches(2))
    graphed.reset_cuda_graphs()
    train_steps(graphed, batches(1))
    assert fake.captures == 4


def test_a_stream_already_capturing_runs_eagerly_without_a_warning(fake):
    """A user who captures a whole step themselves: the segment runs inside their graph."""
    graphed, eager = segment_of(), segment_of(graphs=False)
    fake.capturing_now = True
    xs = batches(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = train_steps(graphed, xs)
    assert torch.equal(out[0][1], train_steps(eager, xs)[0][1])
    assert fake.captures == 0


def test_bf16_autocast_replays_the_eager_casts(fake):
    """Captured with autocast's weight cache off, replayed under the caller's: the same bits."""
    graphed, eager = segment_of().float(), segment_of(graphs=False).float()
    xs = [x.float() for x in batches(3)]
    outs = []
    for model in (graphed, eager):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(train_steps(model, xs))
    for (y, gx), (y_ref, gx_ref) in zip(*outs):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert_same_state(graphed, eager)
    assert fake.captures == 2


def _converted(config, model):
    torch.manual_seed(0)
    return revconvert.convert(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), config=config)


@pytest.mark.parametrize("options", [{"pair_blocks": True}, {"checkpoint_stored": True}], ids=str)
def test_conversion_options_replay_like_eager(fake, options):
    """resnet50 paired (runs of 3 and 5 blocks end with half couplings) and with checkpointed stored
    parts (the exit activation runs in the next checkpointed part)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=4).double()
    graphed = _converted(revconvert.ConvertConfig(cuda_graphs=True, **options), model)
    eager = _converted(revconvert.ConvertConfig(**options), model)
    eager.load_state_dict(graphed.state_dict())
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    for (y, gx), (y_ref, gx_ref) in zip(train_steps(graphed, xs), train_steps(eager, xs)):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert_same_state(graphed, eager)
    assert fake.captures == 2 * sum(isinstance(m, ReversibleSegment) for m in graphed.modules())


def test_under_torch_compile_the_segments_replay(fake):
    """torch.compile(converted): the segment is a graph break, and the graph break replays."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=4).double()
    graphed = _converted(revconvert.ConvertConfig(cuda_graphs=True), model)
    eager = _converted(revconvert.ConvertConfig(), model)
    eager.load_state_dict(graphed.state_dict())
    torch._dynamo.reset()
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    for (y, gx), (y_ref, gx_ref) in zip(train_steps(torch.compile(graphed, backend="eager"), xs),
                                        train_steps(eager, xs)):
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    segments = sum(isinstance(m, ReversibleSegment) for m in graphed.modules())
    assert fake.captures == 2 * segments and fake.replays == 4 * segments


@pytest.mark.parametrize("options", [{"compile": True}, {"keep": "spatial-convs"}], ids=str)
def test_options_that_would_leave_every_segment_eager_are_refused(options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"cuda_graphs=True with {name}=.*every segment would run eagerly"):
        revconvert.ConvertConfig(cuda_graphs=True, **options)
    revconvert.ConvertConfig(cuda_graphs=True, keep="spatial-convs", recompute_budget=0.2)  # some couplings keep
