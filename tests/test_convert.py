from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from revconvert import ConvertConfig, ConversionError, ReversibleSegment
from conftest import RESNET_FAMILY, assert_unchanged, grads_against_ordinary, saved_bytes, snapshot, tv_model
from toy_models import CifarResNet, DropoutBlockNet, FunctionalResNet, PreActResNet, TreeNet, UntraceableNet


def _segments(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ReversibleSegment)}


def _nparams(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(RESNET_FAMILY))
def test_family_converts_trains_and_keeps_stored_weights(name):
    gc.collect()  # fx graphs are cyclic: free the previous model (up to 1.5 GB with its copy and grads)
    model = tv_model(name)
    converted = revconvert.convert(model, (1, 3, 64, 64))
    blocks, eligible = RESNET_FAMILY[name]
    summary = converted.revconvert_summary
    assert len(summary.converted_blocks) == eligible
    # parameters: whole model within 5%, every coupling within 10% of the block it replaces
    assert abs(_nparams(converted) / _nparams(model) - 1) <= 0.05
    for seg_name, seg in _segments(converted).items():
        for coupling, block_name in zip(seg.couplings, seg.source_blocks):
            ratio = _nparams(coupling) / _nparams(model.get_submodule(block_name))
            assert abs(ratio - 1) <= 0.10, (block_name, ratio)
    # stored parts: same names, identical tensors
    original = model.state_dict()
    for key, value in converted.state_dict().items():
        if ".rev_" not in key:
            assert torch.equal(value, original[key]), key
    # forward and backward; every parameter gets a gradient (the original is not needed any more:
    # freeing it keeps the peak at two copies of the weights, not three)
    del model, original
    gc.collect()
    converted(torch.randn(1, 3, 64, 64)).square().mean().backward()
    missing = [n for n, p in converted.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_float64_gradients_equal_ordinary_autograd(name):
    converted = revconvert.convert(tv_model(name).double(), (1, 3, 64, 64))
    for m in converted.modules():  # leave the zero-initialised identity start: exercise F and G
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    pairs, reference = grads_against_ordinary(converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    for got, want in pairs:
        assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item() <= 1e-10
    for a, b in zip(converted.buffers(), reference.buffers()):  # BN statistics updated once, alike
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _task(kind, gen, batches, size=16):
    """Four classes, balanced per batch, signal well under the noise. ``quadrant``: a faint square
    in one quadrant (a position; resnet18 reduces 32x32 to 1x1 and sees it). ``stripes``: faint
    stripes at a random phase in one of four orientations (a texture, for a fully convolutional
    net with global pooling, which cannot locate a quadrant well)."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    data = []
    for _ in range(batches):
        y = (torch.arange(size) % 4)[torch.randperm(size, generator=gen)]
        x = torch.randn(size, 3, 32, 32, generator=gen)
        if kind == "quadrant":
            for i, c in enumerate(y.tolist()):
                r, q = divmod(c, 2)
                x[i, :, r * 16:(r + 1) * 16, q * 16:(q + 1) * 16] += 0.5
        else:
            phase = torch.rand(size, 1, 1, generator=gen) * 2 * torch.pi
            coord = torch.stack([yy, xx, yy + xx, yy - xx])[y]
            x += 0.5 * torch.sin(coord * (2 * torch.pi / 6) + phase)[:, None]
        data.append((x, y))
    return data


def _held_out(model, data):
    """Mean loss and accuracy on batches never trained on (train-mode norms: batch statistics,
    as after a dozen steps the running statistics are not yet meaningful)."""
    with torch.no_grad():
        outs = [(model(x), y) for x, y in data]
    loss = sum(nn.functional.cross_entropy(o, y).item() for o, y in outs) / len(outs)
    acc = sum((o.argmax(1) == y).float().mean().item() for o, y in outs) / len(outs)
    return loss, acc


def _train(model, kind, lr, steps=12, seed=0):
    """Adam on 4 fixed batches of 16, judged on 2 held-out batches: (loss before, loss after, acc after)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = _task(kind, gen, 4), _task(kind, gen, 2)
    torch.manual_seed(seed)
    model.train()
    before, _ = _held_out(model, test)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = train[step % len(train)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (before, *_held_out(model, test))


def _resnet18_4():
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


LEARNING_CASES = {"resnet18": (_resnet18_4, "quadrant", 1e-3),
                  "cifar-resnet14": (lambda: CifarResNet(n=2, num_classes=4), "stripes", 5e-3)}


def check_learns_like_the_original(case, seed):
    factory, kind, lr = LEARNING_CASES[case]
    torch.manual_seed(seed)
    original = factory()
    converted = revconvert.convert(original, (2, 3, 32, 32))
    before_o, after_o, acc_o = _train(original, kind, lr, seed=seed)
    before_c, after_c, acc_c = _train(converted, kind, lr, seed=seed)
    report = f"original {before_o:.3f} -> {after_o:.3f} ({acc_o:.0%}), converted {before_c:.3f} -> {after_c:.3f} ({acc_c:.0%})"
    # The task is learnable and generalises (held-out loss from ~1.5 to below 0.5, at least 3/4 right) ...
    assert after_o < 0.35 * before_o and acc_o >= 0.75, report
    # ... the converted network learns it too ...
    assert after_c < 0.35 * before_c and acc_c >= 0.75, report
    # ... at least about as well.
    assert after_c <= max(2 * after_o, after_o + 0.2) and acc_c >= acc_o - 0.15, report


@pytest.mark.parametrize("case", sorted(LEARNING_CASES))
def test_converted_model_learns_like_the_original(case):
    # Seeds 0-11 pass for both cases (checked when the test was written, torch 2.14 CPU); the
    # criterion is held-out loss and accuracy after the run, not an average of noisy step losses.
    check_learns_like_the_original(case, seed=0)


def _meta_model(name):
    with torch.device("meta"):
        return tv_model(name)


def test_saved_bytes_on_meta_equal_real():
    model = tv_model("resnet18")
    converted = revconvert.convert(model, (2, 3, 64, 64))
    real = (saved_bytes(model, torch.randn(2, 3, 64, 64)), saved_bytes(converted, torch.randn(2, 3, 64, 64)))
    meta_model = _meta_model("resnet18")
    meta_conv = revconvert.convert(meta_model, (2, 3, 64, 64))
    x = torch.empty(2, 3, 64, 64, device="meta")
    assert (saved_bytes(meta_model, x), saved_bytes(meta_conv, x)) == real
    assert real[1] < 0.8 * real[0]


@pytest.mark.parametrize("name,limit", [("resnet50", 0.60), ("resnet152", 0.30)])
def test_saved_activation_ratio(name, limit):
    # Counted on meta tensors: same shapes and storages as real ones (test above), no compute.
    model = _meta_model(name)
    converted = revconvert.convert(model, (2, 3, 224, 224))
    x = torch.empty(2, 3, 224, 224, device="meta")
    ratio = saved_bytes(converted, x) / saved_bytes(model, x)
    assert ratio <= limit


@pytest.mark.parametrize("name,limit", [("resnet50", 1.22), ("resnet152", 1.30)])
def test_training_step_flops(name, limit):
    model = _meta_model(name)
    converted = revconvert.convert(model, (2, 3, 224, 224))
    x = torch.empty(2, 3, 224, 224, device="meta")
    counts = []
    for m in (model, converted):
        with FlopCounterMode(display=False) as fc:
            m(x).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[1] / counts[0] <= limit
    assert counts[1] > counts[0]  # the recomputation is really there


def test_caller_model_is_never_modified():
    model = tv_model("resnet18")
    model.layer3[0].conv1.register_forward_hook(lambda *a: None)  # a stored leaf: carried
    model.layer1.eval()
    before = snapshot(model)
    revconvert.convert(model, (2, 3, 64, 64))
    assert_unchanged(model, before)
    model.layer3.register_forward_hook(lambda *a: None)  # traced through: refused
    before = snapshot(model)
    with pytest.raises(ConversionError, match="layer3"):
        revconvert.convert(model, (2, 3, 64, 64))
    assert_unchanged(model, before)
    assert not _segments(model)


def test_state_dict_of_original_loads_into_stored_parts():
    model = tv_model("resnet18")
    converted = revconvert.convert(model, (1, 3, 64, 64))
    fresh = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64))
    torch.manual_seed(3)
    other = tv_model("resnet18")
    result = fresh.load_state_dict(other.state_dict(), strict=False)
    replaced = set(converted.revconvert_summary.converted_blocks)
    assert result.unexpected_keys and all(k.rsplit(".", 2)[0] in replaced or
                                          any(k.startswith(b + ".") for b in replaced)
                                          for k in result.unexpected_keys)
    assert result.missing_keys and all(".rev_" in k for k in result.missing_keys)
    torch.testing.assert_close(fresh.conv1.weight, other.conv1.weight)
    torch.testing.assert_close(fresh.get_submodule("layer2.0.downsample.0").weight,
                               other.layer2[0].downsample[0].weight)


def test_behaves_like_a_model(tmp_path):
    converted = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    converted.eval()
    assert all(not m.training for m in converted.modules())
    y = converted(x)
    # whole-model save/load and state_dict round trip: bit-identical outputs
    torch.save(converted, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x), y)
    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    twin = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64)).eval()
    twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(twin(x), y)
    twin_copy = copy.deepcopy(converted)
    assert torch.equal(twin_copy(x), y)
    assert twin_copy.revconvert_summary.converted_blocks == converted.revconvert_summary.converted_blocks
    assert loaded.revconvert_summary.segments == converted.revconvert_summary.segments
    doubled = copy.deepcopy(converted).to(torch.float64)
    torch.testing.assert_close(doubled(x.double()).float(), y, rtol=1e-4, atol=1e-4)
    text = str(converted)
    assert "ReversibleSegment" in text and "ReversibleCoupling" in text
    # the converted model's audit reports its reversible segments
    report = revconvert.audit(converted, (1, 3, 64, 64))
    assert [s.name for s in report.converted_segments] == list(converted.revconvert_summary.segments)
    assert report.converted_segments[0].blocks == ("layer1.0", "layer1.1")


def test_couplings_start_as_identity():
    model = tv_model("resnet50").eval()
    converted = revconvert.convert(model, (1, 3, 64, 64)).eval()
    seg = converted.get_submodule("layer3.rev_1_5")
    x = torch.relu(torch.randn(1, 1024, 4, 4))
    torch.testing.assert_close(seg(x), x)  # zero-initialised last norms; exit ReLU of a ReLU output
    off = revconvert.convert(model, (1, 3, 64, 64), config=ConvertConfig(zero_init=False)).eval()
    assert not torch.allclose(off.get_submodule("layer3.rev_1_5")(x), x)


class _TwoPathBlock(nn.Module):
    """A RepVGG-style branch: two conv-norm paths added up (timm's RepViT, RepGhost), plus a layer
    scale path through a multiplication."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.conv(x) + self.gamma * self.conv1(torch.relu(x)))


def test_couplings_start_as_identity_when_the_branch_adds_up_paths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _TwoPathBlock(8), _TwoPathBlock(8)).eval()
    converted = revconvert.convert(model, (1, 3, 16, 16)).eval()
    (seg,) = _segments(converted).values()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(seg(x), x)  # every path of each sum starts at zero, not only the widest


class _RootLayerScale(nn.Module):
    """Layer scales owned by the model, not the blocks: ``h + self.gammas[i] * self.bodies[i](h)``.
    The last one is also read by the head, outside every block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.bodies = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, padding=1)) for _ in range(2))
        self.gamma0 = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.gamma1 = nn.Parameter(torch.full((8, 1, 1), 0.25))
        self.register_buffer("bias0", torch.zeros(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + (self.gamma0 * self.bodies[0](h) + self.bias0)
        h = h + self.gamma1 * self.bodies[1](h)
        return (h * self.gamma1).mean((2, 3))


def test_tensors_only_the_replaced_blocks_read_do_not_stay_behind():
    # gamma0 and bias0 went into the couplings as resized copies; left at the root they would be
    # parameters without a gradient (DDP refuses those); gamma1 is still read by the head
    model = _RootLayerScale()
    converted = revconvert.convert(model, (1, 3, 8, 8))
    assert len(converted.revconvert_summary.converted_blocks) == 2
    names = {n for n, _ in converted.named_parameters()}
    assert "gamma1" in names and "gamma0" not in names and "bias0" not in dict(converted.named_buffers())
    assert hasattr(model, "gamma0") and hasattr(model, "bias0")  # the caller's model keeps its own
    with torch.no_grad():
        for p in converted.parameters():
            if not p.any():
                p.fill_(0.1)
    converted(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in converted.parameters())


def test_activation_moves_to_front_and_exit():
    converted = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64))
    seg = converted.get_submodule("layer1.rev_0_1")
    assert isinstance(seg.couplings[0].F[0], nn.ReLU) and not seg.couplings[0].F[0].inplace
    assert isinstance(seg.exit_activation, nn.ReLU)
    dropped = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64),
                                 config=ConvertConfig(post_activation="drop"))
    seg = dropped.get_submodule("layer1.rev_0_1")
    assert seg.exit_activation is None and isinstance(seg.couplings[0].F[0], nn.Conv2d)


def test_only_and_width_options():
    model = tv_model("resnet50")
    only3 = revconvert.convert(model, (1, 3, 64, 64), config=ConvertConfig(only=("layer3",)))
    assert list(_segments(only3)) == ["layer3.rev_1_5"]
    assert only3.revconvert_summary.converted_blocks == [f"layer3.{i}" for i in range(1, 6)]
    assert "layer2.1" in only3.revconvert_summary.not_selected
    assert "not selected" in str(only3.revconvert_summary)
    keep = revconvert.convert(model, (1, 3, 64, 64), config=ConvertConfig(only=("layer1",), width="keep"))
    F = keep.get_submodule("layer1.rev_1_2").couplings[0].F
    assert F[1].in_channels == 128 and F[1].out_channels == 64  # original inner width 64 kept
    picked = revconvert.convert(model, (1, 3, 64, 64),
                                config=ConvertConfig(select=lambda n: n in {"layer2.2", "layer2.3"}))
    assert picked.revconvert_summary.converted_blocks == ["layer2.2", "layer2.3"]


@pytest.mark.parametrize("factory,shape", [(lambda: FunctionalResNet(n=3), (2, 3, 16, 16)),
                                           (lambda: PreActResNet(n=2), (2, 3, 16, 16)),
                                           (lambda: CifarResNet(n=2), (2, 3, 32, 32))],
                         ids=["functional", "preact", "cifar"])
def test_handwritten_styles_convert(factory, shape):
    model = factory()
    converted = revconvert.convert(model, shape)
    assert _segments(converted)
    x = torch.randn(*shape, dtype=torch.float64)
    converted = converted.double()
    ref = copy.deepcopy(converted)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    converted(x1).sum().backward()
    with revconvert.ordinary_autograd():
        ref(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pair", [False, True], ids=["default", "paired"])
def test_a_segment_may_start_where_another_ends(pair):
    # DLA's trees (timm's dla34 crashed with KeyError: 'reversible_2'): tree1's output feeds tree2 and
    # the root, so each is a segment of its own and tree2's input is tree1's segment output
    torch.manual_seed(0)
    model = TreeNet().double().eval()
    converted = revconvert.convert(model, (2, 3, 16, 16), config=revconvert.ConvertConfig(pair_blocks=pair))
    assert list(converted.revconvert_summary.segments.values()) == [["tree1"], ["tree2"]]
    # wiring: with their last norm zeroed, the original blocks are the identity on their (post-ReLU)
    # input, as the freshly converted couplings are, so both models compute the same function
    reference = copy.deepcopy(model)
    for block in (reference.tree1, reference.tree2):
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), reference(x), rtol=0, atol=0)
    # and the reversible backward of the chained segments is exact
    with torch.no_grad():
        for p in converted.parameters():
            if p.dim() and not p.any():
                p.uniform_(0.5, 1.5)
    pairs, _ = grads_against_ordinary(converted.train(), x)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dropout_blocks_recompute_the_same_masks():
    model = DropoutBlockNet(c=8, n=2, p=0.3).double()
    converted = revconvert.convert(model, (2, 3, 8, 8))
    assert _segments(converted)
    ref = copy.deepcopy(converted)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    converted(x).sum().backward()
    torch.manual_seed(5)
    with revconvert.ordinary_autograd():
        ref(x).sum().backward()
    for p, q in zip(converted.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_no_eligible_block_warns_and_stays_equivalent():
    import torchvision

    with torch.device("meta"):  # vgg11's real weights are 0.5 GB (twice, with convert's copy)
        vgg = torchvision.models.vgg11()
    with pytest.warns(UserWarning, match="no block of VGG can become reversible"):
        revconvert.convert(vgg, (1, 3, 32, 32))
    # equivalence, on a small model without residual blocks
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    with pytest.warns(UserWarning, match="no residual blocks"):
        converted = revconvert.convert(model, (1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(converted.eval()(x), model(x))


def test_errors_name_the_problem_and_leave_model_unchanged():
    model = tv_model("resnet18")
    before = snapshot(model)
    with pytest.raises(revconvert.TraceError, match="body"):
        revconvert.convert(UntraceableNet(), (1, 3, 8, 8))
    with pytest.raises(ConversionError, match=r"example_input has shape \(64,\)"):
        revconvert.convert(model, torch.randn(64))
    with pytest.raises(revconvert.TraceError, match="conv1"):
        revconvert.convert(model, (3, 64))
    with pytest.raises(ConversionError, match="'layer9'.*did you mean"):
        revconvert.convert(model, (1, 3, 64, 64), config=ConvertConfig(only=("layer9",)))
    with pytest.raises(ConversionError, match="'layer2.0' cannot become reversible.*projection-shortcut"):
        revconvert.convert(model, (1, 3, 64, 64), config=ConvertConfig(only=("layer2.0",)))
    with pytest.raises(ValueError, match="width"):
        ConvertConfig(width="huge")
    assert_unchanged(model, before)


def test_memory_saving_switch_in_config():
    converted = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64), config=ConvertConfig(memory_saving=False))
    assert all(not s.use_reversible_backward for s in _segments(converted).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted(torch.randn(1, 3, 64, 64)).sum().backward()


@pytest.mark.parametrize("name,blocks,eligible", [("mobilenet_v2", 10, 10), ("regnet_x_400mf", 22, 18)])
def test_beyond_resnets_inverted_and_grouped_blocks(name, blocks, eligible):
    # MobileNetV2's inverted residuals (expand 1x1 -> depthwise 3x3 -> project 1x1, no activation
    # after the add) and RegNetX's grouped bottlenecks convert too.
    model = tv_model(name).double()
    report = revconvert.audit(model, (2, 3, 64, 64))
    assert (len(report.blocks), len(report.reversible_blocks)) == (blocks, eligible)
    converted = revconvert.convert(model, (2, 3, 64, 64))
    assert abs(_nparams(converted) / _nparams(model) - 1) <= 0.05
    for m in converted.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    reference = copy.deepcopy(converted)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)  # the classifier's dropout draws the same mask in both runs
    converted(x).square().sum().backward()
    torch.manual_seed(1)
    with revconvert.ordinary_autograd():
        reference(x).square().sum().backward()
    # 1e-9, not 1e-10: with many ReLUs a float64 reconstruction can, rarely, move an input across
    # a ReLU's kink (README, "Numerical drift"); typical differences here are 1e-13. Biases in
    # front of a train-mode BatchNorm have gradients that are zero up to rounding: no tensor is
    # measured on a finer scale than 1e-4 of the largest gradient.
    floor = 1e-4 * max(q.grad.abs().max().item() for q in reference.parameters())
    for p, q in zip(converted.parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-9 * max(q.grad.abs().max().item(), floor)


def test_converting_a_converted_model_says_so():
    converted = revconvert.convert(tv_model("resnet18"), (1, 3, 64, 64))
    with pytest.warns(UserWarning, match="ResNet is already converted"):
        again = revconvert.convert(converted, (1, 3, 64, 64))
    assert len(_segments(again)) == len(_segments(converted))
    profile = revconvert.memory_profile(converted, (3, 64, 64), 2)
    assert profile.converted is None  # nothing to compare an already converted model with
    assert profile.model_name == "ResNet"
    assert {s.kind for s in profile.original.segments} == {"stored", "reversible"}


def test_an_inplace_statement_outside_the_blocks_survives_conversion():
    """``h.mul_(2)`` whose result is unused is a side effect, not dead code."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b1, self.b2, self.head = nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.stem(x)
            h.mul_(2)
            return self.head(self.b2(self.b1(h)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    for block in (model.b1, model.b2):
        nn.init.zeros_(block.bn2.weight)  # each block is relu(x): the same function as a zero-init coupling
    converted = revconvert.convert(model, (1, 3, 8, 8)).eval()
    assert converted.revconvert_summary.converted_blocks == ["b1", "b2"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))
