"""The residual CNNs people use beyond ResNet (issue 13): torchvision and timm families whose blocks
have squeeze-excitation gates, stochastic depth, channels-last MLPs, layer scale and timm's
norm-activation layers. Each converts all of its identity residual blocks, starts as the identity,
keeps its parameter count, and its memory-saving backward gives ordinary autograd's float64 gradients.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import revconvert
from revconvert.runtime import ReversibleCoupling

# (library, name, identity residual blocks at 64x64)
FAMILIES = [
    ("torchvision", "mobilenet_v3_small", 6),   # squeeze-excitation with Hardsigmoid, Hardswish
    ("torchvision", "efficientnet_b0", 9),      # squeeze-excitation, SiLU, stochastic depth
    ("torchvision", "regnet_y_400mf", 12),      # squeeze-excitation in a bottleneck
    ("torchvision", "convnext_tiny", 18),       # permute, LayerNorm/Linear channels-last, layer scale
    ("timm", "resnetv2_50", 12),                # pre-activation, BatchNormAct2d
    ("timm", "seresnet50", 12),                 # squeeze-excitation via .mean((2, 3))
    ("timm", "mobilenetv2_100", 10),            # BatchNormAct2d with ReLU6 and Identity activations
    ("timm", "efficientnet_b0", 9),             # BatchNormAct2d with SiLU, SE, DropPath
    ("timm", "convnext_atto", 12),              # nn.Identity shortcut, gamma.reshape(1, -1, 1, 1)
    ("timm", "convnextv2_atto", 12),            # GRN: .norm over space, a mean over the channels, addcmul
    ("timm", "res2net50_14w_8s", 12),           # split into 8 pieces, each added to the last conv's output, cat
    ("timm", "fasternet_t0", 13),               # partial conv: split of the block input, cat
    ("timm", "inception_next_atto", 12),        # split, depthwise convs per piece, cat
    ("timm", "ghostnet_100", 11),               # Ghost modules: cat of two halves, then out[:, :out_chs]
    ("timm", "mambaout_femto", 18),             # channels last (N, H, W, C): couplings split dimension 3
]


def build(lib: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if lib == "timm":
        timm = pytest.importorskip("timm")
        try:
            return timm.create_model(name, drop_path_rate=0.2)  # exercise DropPath's random masks
        except TypeError:  # a model without stochastic depth (GhostNet)
            return timm.create_model(name)
    return torchvision.models.get_model(name, weights=None)


def _gradients_match(converted: nn.Module, x: torch.Tensor) -> float:
    """Largest relative difference between the memory-saving backward's gradients and ordinary
    autograd's, with the same random draws (dropout, stochastic depth). Each tensor's difference is
    relative to its largest gradient, floored at 1e-6 of the model's largest: a gradient that is
    zero in exact arithmetic (a norm's bias feeding another norm) is rounding noise in both."""
    reference = copy.deepcopy(converted)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    converted(x1).square().sum().backward()
    torch.manual_seed(5)
    with revconvert.ordinary_autograd():
        reference(x2).square().sum().backward()
    pairs = [(x1.grad, x2.grad)] + [(p.grad, q.grad) for p, q in zip(converted.parameters(), reference.parameters())]
    assert all(got is not None for got, _ in pairs)
    scale = max(want.abs().max().item() for _, want in pairs)
    worst = max(((got - want).abs().max() / want.abs().max().clamp_min(1e-6 * scale)).item() for got, want in pairs)
    for a, b in zip(converted.buffers(), reference.buffers()):  # norm statistics updated once, alike
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return worst


def _leave_identity(converted: nn.Module) -> None:
    """Move the couplings off zero-init's identity start (their zeroed last layers), so that F and G
    take part in the gradients."""
    with torch.no_grad():
        for p in converted.parameters():
            if p.dim() and not p.any():
                nn.init.uniform_(p, 0.5, 1.0)


@pytest.mark.parametrize("lib,name,identity_blocks", FAMILIES, ids=[f"{lib}-{n}" for lib, n, _ in FAMILIES])
def test_family_converts_every_identity_block_exactly(lib, name, identity_blocks):
    model = build(lib, name).double()
    converted = revconvert.convert(model, (2, 3, 64, 64))
    summary = converted.revconvert_summary
    identity = summary.converted_blocks
    assert len(identity) == identity_blocks  # every identity block; the rest are projections
    assert all(why.startswith("projection-shortcut") for why in summary.stored_reasons.values())
    assert 0.95 <= summary.param_ratio <= 1.05 and not summary.param_mismatch
    # every stored key of the original is there, num_batches_tracked included
    stored = {k for k in model.state_dict() if not any(k.startswith(b + ".") for b in identity)}
    assert stored <= set(converted.state_dict())

    # identity start: every F and G returns zeros
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, a, out: outputs.append(out.abs().max().item()))
             for c in converted.modules() if isinstance(c, ReversibleCoupling) for m in (c.F, c.G)]
    converted.eval()
    with torch.no_grad():
        converted(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert len(outputs) == 2 * identity_blocks and max(outputs) == 0.0

    converted.train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # leave the identity start so F and G take part in the gradients
        for p in converted.parameters():
            if p.dim() and not p.any():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 0.5)
    assert _gradients_match(converted, torch.randn(2, 3, 64, 64, dtype=torch.float64)) <= 1e-8


@pytest.mark.parametrize("lib,name,identity_blocks", FAMILIES, ids=[f"{lib}-{n}" for lib, n, _ in FAMILIES])
def test_family_converts_paired_exactly(lib, name, identity_blocks):
    # ConvertConfig(pair_blocks=True): F and G of a coupling come from two blocks (of one run)
    model = build(lib, name).double()
    converted = revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(pair_blocks=True))
    summary = converted.revconvert_summary
    assert len(summary.converted_blocks) == identity_blocks
    couplings = sum(isinstance(m, ReversibleCoupling) for m in converted.modules())
    assert couplings == sum((len(blocks) + 1) // 2 for blocks in summary.segments.values()) < identity_blocks
    assert 0.95 <= summary.param_ratio <= 1.05 and not summary.param_mismatch
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # leave the identity start so F and G take part in the gradients
        for p in converted.parameters():
            if p.dim() and not p.any():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 0.5)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 64, 64, dtype=torch.float64)) <= 1e-8


# -- the building blocks, on tiny hand-written models with exact answers -----------------------------

class _IdentityShortcut(nn.Module):
    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.shortcut = shortcut

    def forward(self, x):
        h = self.stem(x)
        return self.body(h) + self.shortcut(h)


@pytest.mark.parametrize("shortcut", [nn.Identity(), nn.Sequential(nn.Identity()), nn.Sequential()],
                         ids=["Identity", "Sequential(Identity)", "empty-Sequential"])
def test_identity_like_shortcut_is_the_identity(shortcut):
    model = _IdentityShortcut(shortcut)
    (block,) = revconvert.audit(model, (1, 3, 8, 8)).blocks
    assert block.shortcut == "identity" and block.reversible, block.message
    converted = revconvert.convert(model, (1, 3, 8, 8))
    assert converted.revconvert_summary.converted_blocks == [block.name]


class _DropPathNet(nn.Module):
    """Two residual blocks ending in timm's DropPath: per-sample random masks from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.stem = nn.Conv2d(3, 8, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, padding=1), DropPath(0.5)) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return h


def test_drop_path_masks_are_replayed_in_the_recomputation():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    converted = revconvert.convert(_DropPathNet().double(), (8, 3, 8, 8))
    assert len(converted.revconvert_summary.converted_blocks) == 2
    for p in converted.parameters():  # leave the identity start
        if not p.any():
            nn.init.uniform_(p, 0.5, 1.5)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # the masks are random per sample and per call: replay is needed
        torch.manual_seed(1)
        a = converted(x)
        torch.manual_seed(2)
        b = converted(x)
    assert not torch.equal(a, b)
    assert _gradients_match(converted, x) <= 1e-8
    converted.eval()  # a leaf module follows eval mode: no paths dropped
    with torch.no_grad():
        torch.testing.assert_close(converted(x), converted(x), rtol=0, atol=0)


def test_audit_leaves_a_timm_model_untouched_and_stored_buffers_kept():
    """Issue 12 item 5: tracing through timm's BatchNormAct2d ran ``num_batches_tracked.add_(1)`` on
    the caller's model, and its conversion lost every ``num_batches_tracked`` of the stored parts."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv2_100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    revconvert.audit(model, (1, 3, 64, 64))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    converted = revconvert.convert(model, (1, 3, 64, 64))
    done = converted.revconvert_summary.converted_blocks
    stored = {k: v for k, v in before.items() if not any(k.startswith(b + ".") for b in done)}
    assert any(k.endswith("num_batches_tracked") for k in stored)
    converted.load_state_dict({**converted.state_dict(), **stored}, strict=True)


def test_norm_act_layers_keep_their_settings():
    """Issue 12 item 10: a rebuilt BatchNormAct2d keeps its activation (ReLU6, or Identity in a linear
    bottleneck), eps and momentum; also when named in leaf_modules."""
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = timm.create_model("mobilenetv2_100")
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            m.eps, m.momentum = 1e-3, 0.01
    for options in ({}, {"leaf_modules": (BatchNormAct2d,)}):
        converted = revconvert.convert(model, (1, 3, 64, 64), config=revconvert.ConvertConfig(**options))
        coupling = next(m for m in converted.modules() if isinstance(m, ReversibleCoupling))
        norms = [m for m in coupling.F.modules() if isinstance(m, BatchNormAct2d)]
        assert [type(n.act) for n in norms] == [nn.ReLU6, nn.ReLU6, nn.Identity]
        assert all(n.eps == 1e-3 and n.momentum == 0.01 for n in norms)
        assert [n.num_features for n in norms] == [n.weight.numel() for n in norms]


class _ChannelScale(nn.Module):
    """A user layer: per-channel scale and shift, kept opaque through leaf_modules."""

    def __init__(self, channels: int, *, table: int = 0) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.full((channels,), 2.0))
        self.shift = nn.Parameter(torch.zeros(channels, 1, 1))
        if table:
            self.table = nn.Parameter(torch.zeros(channels, table))

    def forward(self, x):
        return x * self.scale[:, None, None] + self.shift


class _UserLayerNet(_IdentityShortcut):
    def __init__(self, table: int = 0) -> None:
        super().__init__(nn.Identity())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _ChannelScale(8, table=table), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))


def test_a_leaf_layer_is_resized_or_refused_by_name():
    converted = revconvert.convert(_UserLayerNet(), (1, 3, 8, 8), config=revconvert.ConvertConfig(
        leaf_modules=(_ChannelScale,)))
    coupling = next(m for m in converted.modules() if isinstance(m, ReversibleCoupling))
    layer = coupling.F[1]
    inner = coupling.F[0].out_channels  # the layer sits at the inner (parameter-matched) width
    assert isinstance(layer, _ChannelScale) and layer.channels == inner
    assert layer.scale.shape == (inner,) and layer.shift.shape == (inner, 1, 1)
    assert torch.equal(layer.scale, torch.full((inner,), 2.0))  # a constant stays that constant
    report = revconvert.audit(_UserLayerNet(table=3), (1, 3, 8, 8), leaf_modules=(_ChannelScale,))
    (block,) = report.blocks
    assert block.reason == "unsupported-layer" and "_ChannelScale" in block.message and "table" in block.message


class _OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.blocks = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        for conv in self.blocks:
            h = torch.relu(h + conv(h))
        return h


def test_single_conv_branch_reports_its_parameter_shortfall():
    """Issue 12 item 9: one C->C convolution becomes two C/2->C/2 ones, half the parameters, with no
    inner width to widen. The conversion keeps the layer sequence and says so (warning + summary)."""
    with pytest.warns(UserWarning, match=r"more than 10% off the parameters"):
        converted = revconvert.convert(_OneConv(), (1, 3, 8, 8))
    mismatch = converted.revconvert_summary.param_mismatch
    assert len(mismatch) == 2
    assert all(r == pytest.approx((2 * (8 * 8 * 9 + 8)) / (16 * 16 * 9 + 16)) for r in mismatch.values())
    assert "more than 10% off" in str(converted.revconvert_summary)
    # paired, each block is one C/2 -> C/2 convolution: a quarter of its parameters, said as such
    with pytest.warns(UserWarning, match=r"residual function\(s\) rebuilt from 2 block\(s\)"):
        paired = revconvert.convert(_OneConv(), (1, 3, 8, 8), config=revconvert.ConvertConfig(pair_blocks=True))
    assert all(r == pytest.approx((8 * 8 * 9 + 8) / (16 * 16 * 9 + 16))
               for r in paired.revconvert_summary.param_mismatch.values())
    with warnings.catch_warnings():  # a block with an inner width is matched: no warning
        warnings.simplefilter("error")
        revconvert.convert(_IdentityShortcut(nn.Identity()), (1, 3, 8, 8))


def _tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


def test_transformer_mlp_blocks_convert_on_their_token_channels():
    """A ViT's token count (dimension 1, 17) is not its channel count (the last dimension, 32): the
    attention blocks stay stored, naming MultiheadAttention, and each MLP block becomes a coupling
    that splits the last dimension."""
    report = revconvert.audit(_tiny_vit(), (1, 3, 32, 32))
    assert [b.reason for b in report.blocks] == ["unsupported-layer", None] * 2
    assert "MultiheadAttention" in report.blocks[0].message
    assert "odd-channels" not in str(report) and "17 channels" not in str(report)
    for pair in (False, True):
        converted = revconvert.convert(_tiny_vit().double(), (2, 3, 32, 32),
                                       config=revconvert.ConvertConfig(pair_blocks=pair))
        segments = [m for m in converted.modules() if isinstance(m, revconvert.ReversibleSegment)]
        assert len(segments) == 2 and all(s.dim == 2 for s in segments)
        assert 0.95 <= converted.revconvert_summary.param_ratio <= 1.05
        _leave_identity(converted)
        assert _gradients_match(converted.train(), torch.randn(2, 3, 32, 32, dtype=torch.float64)) <= 1e-8
    profile = revconvert.memory_profile(_tiny_vit(), (3, 32, 32), 4)
    measured = revconvert.measure_memory(revconvert.convert(_tiny_vit(), (1, 3, 32, 32)), torch.randn(4, 3, 32, 32))
    assert profile.converted.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.01)
    assert profile.converted.activation_bytes < 0.9 * profile.original.activation_bytes


@pytest.mark.parametrize("config", [dict(checkpoint_stored=True), dict(keep="spatial-convs"),
                                    dict(recompute_budget=0.2, checkpoint_stored=True)],
                         ids=["checkpoint_stored", "keep", "recompute_budget"])
def test_conversion_options_hold_on_channels_last_segments(config):
    # segments that split the last dimension: a ViT's tokens (N, T, C), MambaOut's (N, H, W, C)
    for model, shape in ((_tiny_vit(), (2, 3, 32, 32)), (build("timm", "mambaout_femto"), (2, 3, 64, 64))):
        converted = revconvert.convert(model.double(), shape, config=revconvert.ConvertConfig(**config))
        assert converted.revconvert_summary.converted_blocks
        _leave_identity(converted)
        assert _gradients_match(converted, torch.randn(*shape, dtype=torch.float64)) <= 1e-8


class _ReduceFirst(_IdentityShortcut):
    """NCHW with an odd width: a channel mean before the first conv must not make W the channels."""

    def forward(self, x):
        h = self.stem(x)
        return h + self.body(h - h.mean(1, keepdim=True))


def test_channel_axis_comes_from_the_first_layer_that_has_one():
    report = revconvert.audit(_ReduceFirst(nn.Identity()), (1, 3, 8, 7))
    (block,) = report.blocks  # W = 7 is odd; the channels (8, by the convolutions) are not
    assert block.reversible, block.message
    converted = revconvert.convert(_ReduceFirst(nn.Identity()), (1, 3, 8, 7))
    (coupling,) = [m for m in converted.modules() if isinstance(m, ReversibleCoupling)]
    assert getattr(coupling.F, "0").in_channels == 4  # the 8 channels split in two


class _ChannelStats(_IdentityShortcut):
    """Statistics over the channels inside the branch, as ConvNeXt-V2's global response norm takes
    them (here channels first): a channel mean kept as one broadcast channel is fine at any width."""

    def __init__(self, keepdim: bool = True) -> None:
        super().__init__(nn.Identity())
        self.keepdim = keepdim
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, 8))

    def forward(self, x):
        h = self.stem(x)
        b = self.body[2](self.body[1](self.body[0](h)))
        g = b.norm(p=2, dim=(2, 3), keepdim=True)
        mean = g.mean(dim=1, keepdim=self.keepdim)
        n = g / (mean if self.keepdim else mean[:, None]) + 1e-6
        b = b + torch.addcmul(self.shift.view(1, -1, 1, 1), self.gain.view(1, -1, 1, 1), b * n)
        return h + self.body[4](self.body[3](b))


def test_a_mean_over_the_channels_kept_as_one_channel_converts_exactly():
    converted = revconvert.convert(_ChannelStats().double(), (2, 3, 8, 8))
    assert converted.revconvert_summary.converted_blocks == ["body"]
    (coupling,) = [m for m in converted.modules() if isinstance(m, ReversibleCoupling)]
    inner = getattr(coupling.F, "0").out_channels
    assert coupling.F.gain.shape == coupling.F.shift.shape == (inner,)  # resized with their width
    _leave_identity(converted)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 8, 8, dtype=torch.float64)) <= 1e-8


@pytest.mark.parametrize("pair", [False, True], ids=["default", "paired"])
def test_poolformer_converts_every_block_exactly(pair):
    # timm's MetaFormer: GroupNorm(1, C), pooling - x, and Scale's scale.view(C, 1, 1). Paired, a
    # coupling's F is a pooling block, whose only parameters are per channel (no inner width):
    # reported as a mismatch, while the model keeps its parameter count
    model = build("timm", "poolformer_s12").double()
    converted = revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(pair_blocks=pair))
    summary = converted.revconvert_summary
    assert len(summary.converted_blocks) == 24 and 0.99 <= summary.param_ratio <= 1.01
    assert set(summary.param_mismatch) == (set(summary.converted_blocks[::2]) if pair else set())
    _leave_identity(converted)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 64, 64, dtype=torch.float64)) <= 1e-8


class _SplitNet(nn.Module):
    """Channel splits and concatenations inside residual branches: ``kind="res2net"`` splits an inner
    width into pieces added to the previous piece's conv output (Res2Net), ``"partial"`` convolves a
    quarter of the block input and concatenates the rest back (FasterNet), ``"mixed"`` gives each piece
    its own 1x1 conv and concatenates them into the block's width (MixNet), ``"height"`` splits the
    height, not the channels."""

    def __init__(self, kind: str, width: int = 16) -> None:
        super().__init__()
        self.kind, c = kind, width
        self.stem = nn.Conv2d(3, c, 1)
        self.conv1 = nn.Sequential(nn.Conv2d(c, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.pieces = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                    for _ in range(3))
        self.partial = nn.Conv2d(c // 4, c // 4, 3, padding=1)
        self.mixed = nn.ModuleList([nn.Conv2d(16, c // 2, 1), nn.Conv2d(16, c // 2, 1)])
        self.conv3 = nn.Sequential(nn.Conv2d(32, c, 1), nn.BatchNorm2d(c))

    def branch(self, h):
        if self.kind == "partial":
            a, b = torch.split(h, [h.shape[1] // 4, h.shape[1] - h.shape[1] // 4], dim=1)
            return self.conv3(self.conv1(torch.cat((self.partial(a), b), 1)))
        t = self.conv1(h)
        if self.kind == "mixed":
            a, b = t.chunk(2, dim=1)
            return torch.cat([self.mixed[0](a), self.mixed[1](b)], 1)
        if self.kind == "height":
            top, bottom = t.split(t.shape[2] // 2, dim=2)
            return self.conv3(torch.cat([bottom, top], 2))
        pieces = torch.split(t, 8, 1)
        out, sp = [], None
        for i, conv in enumerate(self.pieces):
            sp = conv(pieces[i] if sp is None else sp + pieces[i])
            out.append(sp)
        return self.conv3(torch.cat([*out, pieces[-1]], 1))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.branch(h))
        return torch.relu(h + self.branch(h))


@pytest.mark.parametrize("kind", ["res2net", "partial", "mixed", "height"])
def test_channel_splits_and_concatenations_convert_exactly(kind):
    model = _SplitNet(kind).double()
    converted = revconvert.convert(model, (2, 3, 8, 8), config=revconvert.ConvertConfig(width_multiple=1))
    summary = converted.revconvert_summary
    assert len(summary.converted_blocks) == 2, summary
    coupling = next(m for m in converted.modules() if isinstance(m, ReversibleCoupling))
    if kind == "res2net":  # the pieces follow the inner width: four of a quarter each
        inner = coupling.F.get_submodule("conv1.0").out_channels
        assert inner % 4 == 0 and inner != 32  # rebuilt at another width than the original 32
        assert f"[{', '.join([str(inner // 4)] * 4)}]" in coupling.F.code
        assert coupling.F.get_submodule("pieces.0.0").in_channels == inner // 4
    if kind == "partial":  # a quarter of the coupling's half (8 channels): 2 and 6
        assert "[2, 6]" in coupling.F.code and coupling.F.partial.in_channels == 2
    _leave_identity(converted)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 8, 8, dtype=torch.float64)) <= 1e-8


class _GhostNet(nn.Module):
    """A Ghost module's residual branch: a conv makes ``init`` channels, a depthwise conv as many
    again, and ``cat(...)[:, :out]`` keeps ``out`` of them (all of them when ``2 * init == out``)."""

    def __init__(self, init: int = 8, out: int = 16) -> None:
        super().__init__()
        self.out = out
        self.stem = nn.Conv2d(3, out, 1)
        self.primary = nn.Sequential(nn.Conv2d(out, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.BatchNorm2d(init))

    def forward(self, x):
        h = self.stem(x)
        a = self.primary(h)
        return h + torch.cat([a, self.cheap(a)], dim=1)[:, :self.out]


def test_a_slice_that_keeps_every_channel_follows_the_new_width():
    config = revconvert.ConvertConfig(width_multiple=1)
    converted = revconvert.convert(_GhostNet().double(), (2, 3, 8, 8), config=config)
    assert len(converted.revconvert_summary.converted_blocks) == 1
    coupling = next(m for m in converted.modules() if isinstance(m, ReversibleCoupling))
    assert ", :16" not in coupling.F.code and "slice(None, 16" not in coupling.F.code  # 16 is not the half
    _leave_identity(converted)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 8, 8, dtype=torch.float64)) <= 1e-8
    # keeping part of the channels (9 + 9 concatenated, 16 kept) is a count that would not follow
    (block,) = revconvert.audit(_GhostNet(init=9), (1, 3, 8, 8)).blocks
    assert block.reason == "unsupported-layer" and "takes part of the channels (None:16 of 18)" in block.message


def test_a_split_whose_pieces_cannot_follow_the_half_width_stays_stored():
    # a quarter of 12 channels is 3; of the coupling's 6, 1.5: no whole number of channels
    (block, _) = revconvert.audit(_SplitNet("partial", width=12), (1, 3, 8, 8)).blocks
    assert block.reason == "groups" and "channel split" in block.message and "6 channels" in block.message


class _WrittenWidth(_IdentityShortcut):
    """A layer scale reshaped with its channel count written out (timm's metaformer ``Scale``:
    ``scale.view(dim, 1, 1)``) and a squared ReLU (``relu(x) ** 2``, StarReLU's)."""

    def __init__(self, shape: tuple[int, ...] = (8, 1, 1)) -> None:
        super().__init__(nn.Identity())
        self.shape = shape
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = self.stem(x)
        b = self.body[1](self.body[0](h)) ** 2
        return h + self.scale.view(self.shape) * self.body[4](self.body[3](b))


def test_a_written_out_channel_count_of_a_parameter_follows_the_new_width():
    converted = revconvert.convert(_WrittenWidth().double(), (2, 3, 8, 8))
    assert converted.revconvert_summary.converted_blocks == ["body"]
    (coupling,) = [m for m in converted.modules() if isinstance(m, ReversibleCoupling)]
    assert coupling.F.scale.shape == (4,)  # the outer width, halved
    assert "view((-1, 1, 1))" in coupling.F.code
    _leave_identity(converted)
    assert _gradients_match(converted.train(), torch.randn(2, 3, 8, 8, dtype=torch.float64)) <= 1e-8
    # beside a -1 it could not become one: the block stays stored, saying why
    (block,) = revconvert.audit(_WrittenWidth(shape=(8, -1, 1)), (1, 3, 8, 8)).blocks
    assert block.reason == "unsupported-layer" and "channel count 8 written" in block.message


def test_a_reduction_over_the_channels_without_keepdim_stays_stored():
    (block,) = revconvert.audit(_ChannelStats(keepdim=False), (1, 3, 8, 8)).blocks
    assert block.reason == "unsupported-layer" and "reduces over the channels" in block.message


class _ConvOnChannelMean(_IdentityShortcut):
    """A spatial gate from a one-channel map (CBAM's kind): that layer has no width to follow."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.gate = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        b = self.body(h)
        return h + b * torch.sigmoid(self.gate(b.mean(1, keepdim=True)))


def test_a_layer_on_a_channel_mean_stays_stored_with_its_reason():
    (block,) = revconvert.audit(_ConvOnChannelMean(), (1, 3, 8, 8)).blocks
    assert block.reason == "unsupported-layer" and "reduced over the channels" in block.message


@pytest.mark.parametrize("config", [dict(checkpoint_stored=True), dict(keep="spatial-convs"),
                                    dict(recompute_budget=0.2, checkpoint_stored=True)],
                         ids=["checkpoint_stored", "keep", "recompute_budget"])
def test_conversion_options_hold_on_se_and_channels_last_blocks(config):
    for lib, name in (("torchvision", "mobilenet_v3_small"), ("timm", "convnext_atto")):
        model = build(lib, name).double()
        converted = revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(**config))
        assert len(converted.revconvert_summary.converted_blocks) == {"mobilenet_v3_small": 6}.get(name, 12)
        _leave_identity(converted)
        assert _gradients_match(converted, torch.randn(2, 3, 64, 64, dtype=torch.float64)) <= 1e-8


@pytest.mark.parametrize("lib,name", [("torchvision", "mobilenet_v3_small"), ("timm", "convnext_atto"),
                                      ("timm", "mambaout_femto")])
def test_memory_estimate_matches_measurement_on_new_families(lib, name):
    model = build(lib, name)
    converted = revconvert.convert(model, (1, 3, 64, 64))
    profile = revconvert.memory_profile(model, (3, 64, 64), 2)
    measured = revconvert.measure_memory(converted, torch.randn(2, 3, 64, 64))
    assert profile.converted.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.01)
    assert profile.converted.activation_bytes < 0.8 * profile.original.activation_bytes


class _ReadsABuffer(_IdentityShortcut):
    """Python code that reads a buffer's value while traced cannot run on a meta copy."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = self.stem(x) * float(self.scale.item())
        return h + self.body(h)


def test_audit_traces_a_copy_even_when_code_reads_buffer_values():
    model = _ReadsABuffer()
    (block,) = revconvert.audit(model, (1, 3, 8, 8)).blocks
    assert block.reversible
    assert not model.scale.is_meta


def _zero_branches(model: nn.Module, example: tuple[int, ...], blocks: list[str]) -> None:
    """Zero, in ``model`` itself, the scale that zero-init zeros in F and G (the surgery's own walk
    back from each block's branch output), so that each block named in ``blocks`` adds nothing."""
    from revconvert.analysis.audit import analyze
    from revconvert.passes.surgery import _zero_last

    analysis = analyze(model, example, share_modules=True)
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    for name in blocks:
        _zero_last(analysis.graph_module, nodes[analysis.blocks[name].branch_output])


@pytest.mark.parametrize("pair", [False, True], ids=["default", "paired"])
@pytest.mark.parametrize("lib,name", [("torchvision", "resnet18"), *((lib, n) for lib, n, _ in FAMILIES)],
                         ids=["torchvision-resnet18", *(f"{lib}-{n}" for lib, n, _ in FAMILIES)])
def test_a_fresh_conversion_computes_the_original_with_its_converted_branches_zeroed(lib, name, pair):
    # The rewrite's wiring, whatever the branch holds: a fresh conversion's couplings are the
    # identity (the activation after each add moved to the segment's exit), so in eval mode the
    # converted model is the original whose converted blocks add zero, to the last bit. A segment
    # fed from a tensor of another value (a segment fed the value before its block's input fails
    # 12 of these 20 cases), a stored part lost or changed, or a segment's output not reaching its
    # readers shows. An exit activation lost does not (the input is post-ReLU already at the
    # identity start): test_convert.test_activation_moves_to_front_and_exit covers that.
    model = build(lib, name).double().eval()
    converted = revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(pair_blocks=pair)).eval()
    zeroed = copy.deepcopy(model)
    _zero_branches(zeroed, (2, 3, 64, 64), converted.revconvert_summary.converted_blocks)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # (timm starts its last norms at zero already: zeroing changes nothing there)
        torch.testing.assert_close(converted(x), zeroed(x), rtol=0, atol=0)


class _ClassTokenMlp(nn.Module):
    """XCiT's class-attention block: the MLP runs on the class token only, and the other tokens pass
    through the branch unchanged (``x + cat([mlp(x[:, :1]), x[:, 1:]], 1)``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        h = self.embed(x.flatten(2).transpose(1, 2))
        return h + torch.cat([self.fc(self.norm(h[:, :1])), h[:, 1:]], dim=1)


def test_a_branch_that_passes_part_of_its_input_through_stays_stored():
    (block,) = revconvert.audit(_ClassTokenMlp(), (1, 3, 4, 4)).blocks
    assert block.reason == "identity-path" and "keeps a part of the block input" in block.message


def test_a_segment_passes_its_input_layout_on():
    """A ViT's tokens reach its first MLP block as a transposed view of the patch embedding; the
    segment's output has the same strides, as the original's addition had, so the kernels after it
    sum in the same order and the conversion of zeroed blocks is the original to the last bit."""
    vit = _tiny_vit().double()
    converted = revconvert.convert(vit, (2, 3, 32, 32))
    segment = next(m for m in converted.modules() if isinstance(m, revconvert.ReversibleSegment))
    x = torch.randn(2, 32, 17, dtype=torch.float64).transpose(1, 2)  # (2, 17, 32), not contiguous
    for train, grad in ((True, True), (False, False)):  # the memory-saving path, and the plain one
        segment.train(train)
        with torch.set_grad_enabled(grad):
            y = segment(x.requires_grad_(grad))
        assert y.shape == x.shape and y.stride() == x.stride()
        if grad:
            y.square().sum().backward()
            assert x.grad is not None
