"""ConvertConfig(checkpoint_stored=True): the stored parts run under activation checkpointing."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from revconvert import ConvertConfig
from revconvert.cli import main
from revconvert.memory import measure_memory, memory_profile
from revconvert.passes.checkpoint_stored import checkpoint_stored_parts
from revconvert.runtime.checkpoint import CheckpointedRun
from conftest import RESNET_FAMILY, assert_unchanged, saved_bytes, snapshot, tv_model
from toy_models import CifarResNet, DropoutStemNet, InplaceInputNet, PreActResNet

CKPT = ConvertConfig(checkpoint_stored=True)
BASIC = ["ckpt_stem", "ckpt_layer2_0", "ckpt_layer3_0", "ckpt_layer4_0"]  # resnet18/34
BOTTLENECK = ["ckpt_stem", "ckpt_layer1_0", "ckpt_layer2_0", "ckpt_layer3_0", "ckpt_layer4_0"]


def _runs(model: nn.Module) -> dict[str, CheckpointedRun]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CheckpointedRun)}


def _pair(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """(default conversion, checkpointed conversion) of ``model`` with identical weights."""
    torch.manual_seed(0)  # the couplings' fresh weights are drawn alike
    default = revconvert.convert(model, shape)
    torch.manual_seed(0)
    checkpointed = revconvert.convert(model, shape, config=CKPT)
    assert list(default.state_dict()) == list(checkpointed.state_dict())
    for a, b in zip(default.state_dict().values(), checkpointed.state_dict().values()):
        assert a.is_meta or torch.equal(a, b)
    return default, checkpointed


def _randomize_norms(*models: nn.Module) -> None:
    """Leave the zero-initialised identity start, so F and G matter; the same weights in each."""
    for model in models:
        torch.manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)


def _assert_recomputes(default: nn.Module, ckpt: nn.Module, x: torch.Tensor) -> None:
    """The runs really checkpoint: the step saves less than the default conversion's."""
    assert _runs(ckpt) and saved_bytes(ckpt, x) < saved_bytes(default, x)


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("factory,shape,runs", [
    (lambda: tv_model("resnet18"), (2, 3, 32, 32), BASIC),
    (lambda: tv_model("resnet50"), (2, 3, 32, 32), BOTTLENECK),
    (lambda: PreActResNet(n=2), (2, 3, 16, 16), ["ckpt_stem", "ckpt_blocks_2"]),
    (lambda: CifarResNet(n=2), (2, 3, 32, 32), ["ckpt_stem", "ckpt_layer2_0", "ckpt_layer3_0"]),
], ids=["resnet18", "resnet50", "preact", "cifar"])
def test_float64_gradients_equal_the_default_conversion(factory, shape, runs):
    default, ckpt = _pair(factory().double(), shape)
    assert list(_runs(ckpt)) == runs and not _runs(default)
    _randomize_norms(default, ckpt)
    x = torch.randn(*shape, dtype=torch.float64)
    _assert_recomputes(default, ckpt, x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    default(x1).square().sum().backward()
    ckpt(x2).square().sum().backward()
    pairs = [(x2.grad, x1.grad)] + list(zip([p.grad for p in ckpt.parameters()],
                                            [p.grad for p in default.parameters()], strict=True))
    for got, want in pairs:
        assert _max_rel(got, want) <= 1e-10


@pytest.mark.parametrize("name", sorted(RESNET_FAMILY))
def test_family_checkpoints_the_stem_and_projection_blocks(name):
    # On meta tensors: the structure and a forward/backward cost no compute.
    with torch.device("meta"):
        model = tv_model(name)
    ckpt = revconvert.convert(model, (2, 3, 64, 64), config=CKPT)
    assert list(_runs(ckpt)) == (BASIC if name in ("resnet18", "resnet34") else BOTTLENECK)
    assert ckpt.revconvert_summary.checkpointed == {r: [m.parts[0]] for r, m in _runs(ckpt).items()}
    # layer2.0's run starts with the exit activation of the segment before it (deferred into it)
    names = ckpt.ckpt_layer2_0.module_names
    assert names[0].startswith("layer1.rev_") and names[0].endswith(".exit_activation")
    assert names[1:3] == ("layer2.0.conv1", "layer2.0.bn1")
    # every stored parameter keeps its name: the original's keys minus the replaced blocks'
    replaced = set(ckpt.revconvert_summary.converted_blocks)
    kept = {k for k in model.state_dict() if not any(k.startswith(b + ".") for b in replaced)}
    keys = set(ckpt.state_dict())
    assert kept <= keys and all(".rev_" in k for k in keys - kept)
    assert ckpt(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 1000)


def _conv_forward_flops(model: nn.Module, parts: list[str], x: torch.Tensor) -> int:
    """Forward FLOPs of the convolutions of the original model's stored parts (stem = conv1), from
    their output shapes: 2 * outputs * (in_channels / groups) * kernel area."""
    total = 0

    def count(conv: nn.Conv2d, _inp, out) -> None:
        nonlocal total
        kh, kw = conv.kernel_size
        total += 2 * out.numel() * conv.in_channels // conv.groups * kh * kw

    owners = ["conv1" if p == "stem" else p for p in parts]
    hooks = [m.register_forward_hook(count) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and any(n == o or n.startswith(o + ".") for o in owners)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name,limit", [("resnet18", 0.30), ("resnet50", 0.35)])
def test_saved_bytes_drop_and_flops_rise_by_the_stored_parts_forward(name, limit):
    with torch.device("meta"):
        model = tv_model(name)
    x = torch.empty(2, 3, 64, 64, device="meta")
    default, ckpt = _pair(model, (2, 3, 64, 64))
    saved, flops = [], []
    for m in (default, ckpt):
        saved.append(saved_bytes(m, x))
        with FlopCounterMode(display=False) as fc:
            m(x).sum().backward()
        flops.append(fc.get_total_flops())
    assert saved[1] <= limit * saved[0]
    parts = [p for run in _runs(ckpt).values() for p in run.parts]
    assert flops[1] - flops[0] == _conv_forward_flops(model, parts, x) > 0


def test_batchnorm_statistics_are_updated_once():
    default, ckpt = _pair(tv_model("resnet18").double(), (2, 3, 32, 32))
    for m in (default, ckpt):
        m.bn1.momentum = None  # a cumulative average reads num_batches_tracked: it must be exact too
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (default, ckpt):
        m(x).sum().backward()
    assert "bn1" in ckpt.ckpt_stem.module_names
    _assert_recomputes(default.eval(), ckpt.eval(), x)  # eval: leaves the statistics alone
    for (key, a), b in zip(default.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)
        if key.endswith("num_batches_tracked"):
            assert b.item() == 1, key
    assert ckpt.ckpt_stem.region.bn1.momentum is None  # put back after the recomputation


def test_dropout_in_a_stored_part_recomputes_the_same_mask():
    default, ckpt = _pair(DropoutStemNet(p=0.3).double(), (2, 3, 8, 8))
    assert "stem.3" in ckpt.ckpt_stem.module_names  # the dropout runs under checkpointing
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_recomputes(default, ckpt, x)
    states = []
    for m in (default, ckpt):
        torch.manual_seed(5)
        m(x).square().sum().backward()
        states.append(torch.get_rng_state())
    for p, q in zip(ckpt.parameters(), default.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert torch.equal(states[0], states[1])  # the recomputation draws no random numbers of its own


def test_autocast_is_replayed_in_the_recomputation():
    default, ckpt = _pair(tv_model("resnet18"), (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_recomputes(default, ckpt, x)
    for m in (default, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
    for p, q in zip(ckpt.parameters(), default.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_inplace_change_of_an_input_stays_outside_the_runs():
    # x.sub_ in the stem: inside the run, the recomputation would read the shifted input.
    default, ckpt = _pair(InplaceInputNet().double(), (2, 3, 8, 8))
    assert list(_runs(ckpt)) == ["ckpt_stem"]
    assert "x.sub_(0.5)" in ckpt.code
    assert all(n.op == "placeholder" or n.target != "sub_" for n in ckpt.ckpt_stem.region.graph.nodes)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_recomputes(default, ckpt, x.clone())
    for m in (default, ckpt):
        m(x.clone()).sum().backward()
    for p, q in zip(ckpt.parameters(), default.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def test_keys_copies_and_serialisation_follow_the_parent(tmp_path):
    model = tv_model("resnet18")
    before = snapshot(model)
    default, ckpt = _pair(model, (1, 3, 64, 64))
    assert_unchanged(model, before)
    assert list(ckpt.state_dict()) == list(default.state_dict())
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in default.named_parameters()]
    assert ckpt.ckpt_stem.region.conv1 is ckpt.conv1  # the parent's own module, not a copy
    assert "CheckpointedRun(parts=['layer2.0']" in str(ckpt)

    x = torch.randn(2, 3, 64, 64)
    ckpt.eval()
    assert all(not m.training for m in ckpt.ckpt_stem.region.modules() if m is not ckpt.ckpt_stem.region)
    y = ckpt(x)
    torch.testing.assert_close(y, default.eval()(x), rtol=0, atol=0)
    twin = copy.deepcopy(ckpt)
    assert twin.ckpt_stem.region.conv1 is twin.conv1 and twin.conv1 is not ckpt.conv1
    with torch.no_grad():
        twin.conv1.weight.mul_(2)
    assert not torch.equal(twin(x), y) and torch.equal(ckpt(x), y)
    torch.save(ckpt, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.ckpt_layer2_0.region.get_submodule("layer2.0.conv1") is loaded.get_submodule("layer2.0.conv1")
    assert torch.equal(loaded(x), y)
    assert loaded.revconvert_summary.checkpointed == ckpt.revconvert_summary.checkpointed
    doubled = copy.deepcopy(ckpt).to(torch.float64)
    assert doubled.ckpt_stem.region.conv1.weight.dtype == torch.float64
    torch.testing.assert_close(doubled(x.double()).float(), y, rtol=1e-4, atol=1e-4)
    # the original's weights load into the stored parts, and the runs use them
    fresh = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64), config=CKPT).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=False)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool).eval()
    torch.testing.assert_close(fresh.ckpt_stem(x), stem(x), rtol=0, atol=0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_distributed_data_parallel_reduces_the_runs_gradients(tmp_path):
    _, ckpt = _pair(tv_model("resnet18"), (2, 3, 32, 32))
    assert list(_runs(ckpt)) == BASIC
    reference = copy.deepcopy(ckpt)
    x = torch.randn(2, 3, 32, 32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(ckpt)
        ddp(x).square().sum().backward()
    finally:
        dist.destroy_process_group()
    reference(x).square().sum().backward()
    for p, q in zip(ckpt.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert ckpt.conv1.weight.grad is not None


def test_memory_profile_matches_measurement():
    model = tv_model("resnet18")
    profile = memory_profile(model, (3, 64, 64), 2, config=CKPT)
    estimate = profile.converted
    measured = measure_memory(revconvert.convert(model, (1, 3, 64, 64), config=CKPT), torch.randn(2, 3, 64, 64))
    assert estimate.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.01)
    assert estimate.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10)
    assert estimate.param_bytes == measured.param_bytes
    for est, meas in zip(estimate.segments, measured.segments, strict=True):
        assert est.name == meas.name and est.kind == meas.kind
        assert est.activation_bytes == pytest.approx(meas.activation_bytes, rel=0.01)
    # rows line up with the original's plan; the stored parts are reported as checkpointed
    assert [s.name for s in estimate.segments] == [s.name for s in profile.original.segments]
    kinds = {s.name: s.kind for s in estimate.segments}
    assert [n for n, k in kinds.items() if k == "checkpointed"] == ["stem", "layer2.0", "layer3.0", "layer4.0"]
    for name in ("stem", "layer2.0"):
        assert estimate.segment(name).activation_bytes < 0.1 * profile.original.segment(name).activation_bytes
    default = memory_profile(model, (3, 64, 64), 2).converted
    assert estimate.param_bytes == default.param_bytes  # the same parameters, all of them counted
    assert estimate.activation_bytes < 0.5 * default.activation_bytes
    assert "stored -> checkpointed" in str(profile)


def test_audit_reports_checkpointed_parts():
    ckpt = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64), config=CKPT)
    report = revconvert.audit(ckpt, (1, 3, 64, 64))
    assert [s.name for s in report.segments if s.checkpointed] == ["stem", "layer2.0", "layer3.0", "layer4.0"]
    assert len(report.converted_segments) == 4
    assert "layer2.0 [stored, checkpointed]" in str(report)


def test_checkpoint_stored_parts_of_a_converted_model():
    converted = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64))
    before = snapshot(converted)
    lean = checkpoint_stored_parts(converted)
    assert_unchanged(converted, before)
    assert not _runs(converted) and list(_runs(lean)) == BASIC
    assert lean.revconvert_summary.checkpointed == {r: [m.parts[0]] for r, m in _runs(lean).items()}
    assert not converted.revconvert_summary.checkpointed
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(lean.eval()(x), converted.eval()(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(converted, buf)
    with pytest.raises(ValueError, match="carry no segment.*checkpoint_stored=True"):
        checkpoint_stored_parts(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    with pytest.raises(TypeError, match="fx.GraphModule"):
        checkpoint_stored_parts(tv_model("resnet18"))


def test_converting_a_checkpointed_model_keeps_its_parameters():
    ckpt = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64), config=CKPT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already converted"
        again = revconvert.convert(ckpt, (1, 3, 64, 64), config=CKPT)
    assert list(_runs(again)) == BASIC  # no run inside a run
    assert set(again.state_dict()) == set(ckpt.state_dict())


def test_bad_options_say_what_is_wrong():
    with pytest.raises(TypeError, match="checkpoint_stored must be True or False"):
        ConvertConfig(checkpoint_stored="yes")
    with pytest.raises(ValueError, match="'leaf_modules'.*in config"):
        memory_profile(tv_model("resnet18"), (3, 32, 32), 2, config=CKPT, leaf_modules=[nn.ReLU])


def test_cli_flag(tmp_path, capsys):
    out = tmp_path / "c.pt"
    assert main(["convert", "resnet18", "-o", str(out), "--input-size", "64", "--checkpoint-stored", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpointed"] == {"ckpt_stem": ["stem"], "ckpt_layer2_0": ["layer2.0"],
                                       "ckpt_layer3_0": ["layer3.0"], "ckpt_layer4_0": ["layer4.0"]}
    assert _runs(torch.load(out, weights_only=False))
    assert main(["convert", "resnet18", "-o", str(out), "--input-size", "64"]) == 0
    assert "activation checkpointing" not in capsys.readouterr().out
    assert main(["convert", "resnet18", "-o", str(out), "--input-size", "64", "--checkpoint-stored"]) == 0
    assert "Stored parts under activation checkpointing" in capsys.readouterr().out
    assert main(["memory", "resnet18", "--input-size", "32", "--batch-size", "2", "--checkpoint-stored"]) == 0
    assert "stored -> checkpointed" in capsys.readouterr().out


def test_segment_boundaries_keep_one_tensor_the_exit_activation_runs_in_the_next_part(monkeypatch):
    import revconvert.passes.checkpoint_stored as stored

    torch.manual_seed(0)
    model = tv_model("resnet50")
    shape = (2, 3, 32, 32)
    x = torch.randn(*shape, requires_grad=True)
    deferred = revconvert.convert(model, shape, config=CKPT)
    monkeypatch.setattr(stored, "_defer_exit_activations", lambda gm, parts=None: [])
    inline = revconvert.convert(model, shape, config=CKPT)
    # The outputs of the segments read by layer2.0, layer3.0 and layer4.0 (N x C x H x W float32)
    # are no longer kept twice (segment output + its ReLU's output).
    boundary = sum(2 * c * s * s * 4 for c, s in ((256, 8), (512, 4), (1024, 2)))
    assert saved_bytes(inline, x) - saved_bytes(deferred, x) == boundary
    segments = {n: m for n, m in deferred.named_modules() if type(m).__name__ == "ReversibleSegment"}
    assert [n for n, m in segments.items() if m.apply_exit_activation] == ["layer4.rev_1_2"]  # before the head
    with torch.no_grad():
        torch.testing.assert_close(deferred.eval()(x), inline.eval()(x), rtol=0, atol=0)
