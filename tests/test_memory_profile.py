"""memory_profile (fake tensors) against measure_memory (real tensors), and the report around them."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from conftest import assert_unchanged, snapshot, tv_model
from torch import nn
from toy_models import LibraryNormNet

import revconvert
from revconvert.memory import MemoryBreakdown, MemoryProfile, measure_memory, memory_profile

F32 = 4

# (model, batch, image side): the whole acceptance grid, original and converted each.
GRID = [(name, batch, side) for name in ("resnet18", "resnet50") for batch in (2, 4) for side in (64, 128)]
_cache: dict = {}


def _case(name: str, batch: int, side: int):
    """(model, converted model, profile), built once per grid point."""
    key = (name, batch, side)
    if key not in _cache:
        model = tv_model(name)
        profile = memory_profile(model, (3, side, side), batch)
        converted = revconvert.convert(model, (1, 3, side, side))
        _cache[key] = (model, converted, profile)
    return _cache[key]


def _param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("variant", ["original", "converted"])
@pytest.mark.parametrize("name,batch,side", GRID)
def test_estimate_matches_measurement(name, batch, side, variant):
    model, converted, profile = _case(name, batch, side)
    estimate: MemoryBreakdown = getattr(profile, variant)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, side, side)
    measured = measure_memory(model if variant == "original" else converted, x)
    assert measured.source == "measurement" and estimate.source == "estimate"
    assert estimate.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.01)
    assert estimate.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10)
    assert estimate.param_bytes == measured.param_bytes
    for est_seg, meas_seg in zip(estimate.segments, measured.segments, strict=True):
        assert est_seg.name == meas_seg.name
        assert est_seg.activation_bytes == pytest.approx(meas_seg.activation_bytes, rel=0.01)


def test_measurement_of_a_tiny_model_is_exact():
    # conv(3->4, 3x3) -> relu -> flatten -> linear(256->10), batch 2 of 3x8x8, no biases.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10, bias=False))
    x = torch.randn(2, 3, 8, 8)
    m = measure_memory(model, x)
    conv_in, relu_out = 2 * 3 * 8 * 8 * F32, 2 * 4 * 8 * 8 * F32
    # Saved: the conv's input and the relu's output (flatten is a view of it; weights excluded).
    assert m.activation_bytes == conv_in + relu_out
    params = (4 * 3 * 3 * 3 + 10 * 256) * F32
    assert m.param_bytes == m.grad_bytes == params
    # Peak: in the relu's backward, alive are the relu output (saved), the linear weight's grad,
    # the gradient reaching the relu and the relu's input gradient, plus loss and its 0-d grad.
    step_peak = relu_out + 10 * 256 * F32 + relu_out + relu_out + F32 + F32
    assert m.peak_bytes == params + conv_in + step_peak
    estimate = memory_profile(model, (3, 8, 8), 2, converted=False).original
    assert (estimate.activation_bytes, estimate.peak_bytes) == (m.activation_bytes, m.peak_bytes)


def test_segment_rows_align_by_name():
    _, _, profile = _case("resnet18", 2, 64)
    assert [s.name for s in profile.original.segments] == [s.name for s in profile.converted.segments]
    assert all(o is not None and c is not None for _, o, c in profile.rows())


def test_reversible_segments_shrink_and_need_a_transient():
    _, _, profile = _case("resnet18", 2, 64)
    orig, conv = profile.original, profile.converted
    assert all(s.kind == "stored" and s.transient_bytes == 0 for s in orig.segments)
    reversible = [s for s in conv.segments if s.kind == "reversible"]
    assert len(reversible) == 4, "resnet18 has one reversible run per stage"
    for seg in reversible:
        before = orig.segment(seg.name)   # the plan of the original uses the converted names
        assert seg.activation_bytes < 0.6 * before.activation_bytes
        assert seg.transient_bytes > 0
    for seg in conv.segments:
        if seg.kind == "stored":
            assert seg.transient_bytes == 0
    assert conv.segment("stem").activation_bytes == orig.segment("stem").activation_bytes
    assert conv.activation_bytes < orig.activation_bytes
    assert profile.ratios["activation_bytes"] == conv.activation_bytes / orig.activation_bytes


@pytest.mark.parametrize("optimizer,copies", [(None, 0), ("sgd", 0), ("sgd-momentum", 1), ("adam", 2),
                                              ("adamw", 2)])
def test_gradients_and_optimizer_state_count_trainable_params(optimizer, copies):
    model = tv_model("resnet18")
    model.fc.weight.requires_grad_(False)
    b = memory_profile(model, (3, 32, 32), 2, optimizer=optimizer, converted=False).original
    trainable = _param_bytes(model, trainable_only=True)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert b.param_bytes == _param_bytes(model)
    assert b.grad_bytes == trainable
    step_counters = n_trainable * F32 if optimizer in ("adam", "adamw") else 0
    assert b.optimizer_bytes == copies * trainable + step_counters
    assert b.peak_bytes >= b.param_bytes + b.grad_bytes + b.optimizer_bytes
    assert sum(b.peak_composition.values()) == b.peak_bytes


def test_measured_optimizer_step_matches_estimate():
    model = tv_model("resnet18")
    estimate = memory_profile(model, (3, 32, 32), 2, optimizer="adam", converted=False).original
    measured = measure_memory(model, torch.randn(2, 3, 32, 32), optimizer="adam")
    assert measured.optimizer_bytes == estimate.optimizer_bytes
    assert estimate.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10)


def test_profile_and_measure_leave_the_model_alone():
    model = tv_model("resnet18")
    model.layer2.eval()  # a mixed train/eval state must survive
    model.layer1[0].register_forward_hook(lambda *a: None)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = snapshot(model)
    memory_profile(model, (3, 32, 32), 4, optimizer="adam")
    measure_memory(model, torch.randn(2, 3, 32, 32), optimizer="sgd-momentum")
    assert_unchanged(model, before)
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")


def test_large_batch_costs_no_activation_memory():
    # 1024 x 3 x 224 x 224 would need tens of GiB of activations for real.
    b = memory_profile(tv_model("resnet18"), batch_size=1024, converted=False).original
    assert b.activation_bytes > 20 * 2**30


def test_bfloat16_halves_activations():
    model = tv_model("resnet18")
    f32 = memory_profile(model, (3, 32, 32), 2, converted=False).original
    bf16 = memory_profile(model, (3, 32, 32), 2, dtype="bfloat16", converted=False).original
    assert bf16.param_bytes * 2 == f32.param_bytes
    assert 0.45 < bf16.activation_bytes / f32.activation_bytes < 0.6


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
    ({"batch_size": -3}, r"got -3"),
    ({"input_size": (224, 224)}, r"\(C, H, W\).*\(224, 224\)"),
    ({"optimizer": "rmsprop"}, r"'rmsprop'.*adam.*sgd-momentum"),
    ({"dtype": "int8"}, r"'int8'.*bfloat16.*float32"),
    ({"leaf_module": ["fc"]}, r"'leaf_module'.*leaf_modules"),
])
def test_bad_arguments_name_the_value_and_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory_profile(tv_model("resnet18"), **kwargs)


def test_a_cuda_estimate_without_a_cuda_device_says_so():
    # the cuda:N beyond the device count when one is there; plain "cuda" where none is
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"device '{device}': this machine has .*device='cpu'"):
        memory_profile(tv_model("resnet18"), (3, 32, 32), 2, device=device)
    with pytest.raises(ValueError, match=r"this machine has .*device='cpu'"):
        revconvert.plan_memory(tv_model("resnet18"), "1GiB", input_size=32, batch_size=2, device=device)


def test_report_renders_and_serialises():
    _, _, profile = _case("resnet18", 2, 64)
    text = str(profile)
    for seg in profile.original.segments:
        assert seg.name in text
    for word in ("activations", "parameters", "gradients", "optimizer state", "peak"):
        assert word in text
    data = json.loads(json.dumps(profile.to_dict()))
    for key in ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "peak_bytes"):
        assert data["original"][key] == getattr(profile.original, key)
    assert data["converted"]["segments"][0].keys() >= {"name", "kind", "activation_bytes",
                                                         "transient_bytes"}
    assert data["ratios"]["peak_bytes"] == pytest.approx(profile.ratios["peak_bytes"])
    assert isinstance(profile, MemoryProfile)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _, _, profile = _case("resnet18", 2, 64)
    path = tmp_path / "memory.png"
    profile.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    _, _, profile = _case("resnet18", 2, 64)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install 'revconvert\[plot\]'"):
        profile.plot(str(tmp_path / "memory.png"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.max_memory_allocated)")
def test_estimate_matches_cuda_allocator():
    # Large enough that cuDNN/cuBLAS workspaces (invisible to the tracker, a roughly constant few
    # tens of MiB) stay well under the 10% tolerance.
    model = tv_model("resnet50")
    estimate = memory_profile(model, (3, 224, 224), 32, device="cuda", converted=False).original
    measured = measure_memory(model.cuda(), torch.randn(32, 3, 224, 224, device="cuda"))
    assert measured.cuda_peak_bytes is not None
    assert estimate.peak_bytes == pytest.approx(measured.cuda_peak_bytes, rel=0.10), \
        (estimate.peak_bytes, measured.cuda_peak_bytes, measured.peak_bytes)


def test_batchnorm_single_value_gets_a_hint():
    import torchvision

    with pytest.raises(ValueError, match=r"batch_size=1 .*BatchNorm.*batch_size >= 2"):
        memory_profile(torchvision.models.resnet18(), (3, 32, 32), 1)


def test_estimates_one_after_another_share_no_fake_tensor():
    # The scratch batch counter that a library norm gets during the backward's recomputation was
    # cached process-wide; made under the first estimate's FakeTensorMode, it broke the second
    # ("Mixing fake modes"), e.g. timm's mobilenetv2_100 after resnetv2_50 in one process.
    torch.manual_seed(0)
    model = LibraryNormNet()
    first = memory_profile(model, (3, 8, 8), 2)
    second = memory_profile(model, (3, 8, 8), 2)
    assert second.converted.activation_bytes == first.converted.activation_bytes
    assert first.converted.activation_bytes < first.original.activation_bytes  # it did convert


def test_timm_estimates_one_after_another():
    timm = pytest.importorskip("timm")
    for name in ("resnetv2_50", "mobilenetv2_100"):  # the sequence that failed (BatchNormAct2d)
        torch.manual_seed(0)
        profile = memory_profile(timm.create_model(name), (3, 32, 32), 2)
        assert profile.converted.activation_bytes < profile.original.activation_bytes
