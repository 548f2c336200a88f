from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revconvert
from revconvert.analysis.tracing import trace
from conftest import RESNET_FAMILY, assert_unchanged, snapshot, tv_model
from toy_models import (CifarResNet, EscapingBranchNet, FunctionalResNet, OddChannelNet, PreActResNet,
                        UntraceableNet)


@pytest.mark.parametrize("name", sorted(RESNET_FAMILY))
def test_torchvision_family_counts_and_reasons(name):
    blocks, eligible = RESNET_FAMILY[name]
    with torch.device("meta"):  # the audit reads shapes only: no weights to allocate (up to 0.5 GB)
        model = tv_model(name)
    report = revconvert.audit(model, (1, 3, 64, 64))
    assert len(report.blocks) == blocks
    assert len(report.reversible_blocks) == eligible
    stored = [b for b in report.blocks if not b.reversible]
    assert all(b.reason == "projection-shortcut" for b in stored)
    assert all(b.name.endswith(".0") and b.shortcut == "projection" for b in stored)
    # resnet18/34's layer1.0 keeps 64 channels without a projection; bottlenecks project in layer1.0.
    assert {b.name for b in stored} >= {"layer2.0", "layer3.0", "layer4.0"}


def test_block_record_resnet50():
    report = revconvert.audit(tv_model("resnet50"), (2, 3, 64, 64))
    b = {x.name: x for x in report.blocks}["layer3.2"]
    assert b.reversible and b.reason is None
    assert b.input_shape == b.output_shape == (2, 1024, 4, 4)
    assert b.post_op == "ReLU" and b.shortcut == "identity"
    block = tv_model("resnet50").get_submodule("layer3.2")
    assert b.params == sum(p.numel() for p in block.parameters())
    seg = {s.name: s for s in report.segments}
    assert [s.name for s in report.segments] == [
        "stem", "layer1.0", "layer1.rev_1_2", "layer2.0", "layer2.rev_1_3", "layer3.0", "layer3.rev_1_5",
        "layer4.0", "layer4.rev_1_2", "head"]
    assert seg["layer3.rev_1_5"].kind == "reversible"
    assert seg["layer3.rev_1_5"].blocks == tuple(f"layer3.{i}" for i in range(1, 6))
    assert seg["layer3.0"].kind == "stored"


def test_functional_style():
    report = revconvert.audit(FunctionalResNet(n=3), (2, 3, 16, 16))
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b.reversible for b in report.blocks)
    assert [s.kind for s in report.segments] == ["stored", "reversible", "stored"]


def test_empty_sequential_shortcut_with_iadd():
    report = revconvert.audit(CifarResNet(n=3), (2, 3, 32, 32))
    assert len(report.blocks) == 9
    verdicts = {b.name: b.reason for b in report.blocks}
    assert verdicts["layer2.0"] == verdicts["layer3.0"] == "projection-shortcut"
    assert sum(b.reversible for b in report.blocks) == 7


def test_preactivation_style():
    report = revconvert.audit(PreActResNet(n=2, widths=(16, 32)), (2, 3, 16, 16))
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [b.reversible for b in report.blocks] == [True, True, False, True]
    assert report.blocks[2].reason == "projection-shortcut"
    assert all(b.post_op is None for b in report.blocks)


def test_no_residual_blocks_vgg():
    import torchvision

    with torch.device("meta"):  # shapes only; vgg11's real weights are 0.5 GB
        model = torchvision.models.vgg11()
    report = revconvert.audit(model, (1, 3, 32, 32))
    assert report.blocks == []
    assert "no residual blocks" in str(report)


def test_odd_channels():
    report = revconvert.audit(OddChannelNet(), (1, 3, 8, 8))
    assert report.blocks[0].reason == "odd-channels"
    assert "15 channels" in report.blocks[0].message


def test_branch_intermediate_returned():
    report = revconvert.audit(EscapingBranchNet(), (1, 3, 8, 8))
    assert len(report.blocks) == 1 and report.blocks[0].reason == "branch-escapes"


class _ExtraInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, bias):
        h = self.stem(x)
        return h + self.conv(h) * bias


class _Inplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        return h + self.conv(F.relu_(h))


class _Unsupported(nn.Module):
    """A running sum across the channels: no width of it follows from the graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        return h + self.conv(torch.cumsum(h, 1))


class _Groups(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.conv = nn.Conv2d(12, 12, 3, padding=1, groups=4)  # 4 groups do not divide 6 channels

    def forward(self, x):
        h = self.stem(x)
        return h + self.conv(h)


class _Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = self.stem(x)
        return h + self.up(self.down(h))


@pytest.mark.parametrize("model,args,code", [
    (_ExtraInput(), (torch.randn(1, 3, 8, 8), torch.randn(1, 8, 1, 1)), "extra-input"),
    (_Inplace(), (1, 3, 8, 8), "inplace-fork"),
    (_Unsupported(), (1, 3, 8, 8), "unsupported-layer"),
    (_Groups(), (1, 3, 8, 8), "groups"),
    (_Strided(), (1, 3, 8, 8), "stride"),
])
def test_rules(model, args, code):
    report = revconvert.audit(model, args)
    assert len(report.blocks) == 1
    assert report.blocks[0].reason == code, report.blocks[0].message
    assert not report.blocks[0].reversible


def test_unsupported_layer_names_the_type():
    report = revconvert.audit(_Unsupported(), (1, 3, 8, 8))
    assert "cumsum" in report.blocks[0].message


def test_untraceable_model_names_module_and_remedy():
    with pytest.raises(revconvert.TraceError, match=r"(?s)module 'body'.*leaf_modules"):
        revconvert.audit(UntraceableNet(), (1, 3, 8, 8))
    report = revconvert.audit(UntraceableNet(), (1, 3, 8, 8), leaf_modules=["body"])
    assert report.blocks == []


def test_wrong_input_rank_is_a_trace_error():
    with pytest.raises(revconvert.TraceError, match="conv1"):
        revconvert.audit(tv_model("resnet18"), (3, 64))


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match="leaf_modules"):
        revconvert.audit(tv_model("resnet18"), leaf_module=[nn.Conv2d])


def test_audit_does_not_modify_model():
    model = tv_model("resnet18").train()
    model.layer1[0].bn1.eval()  # mixed modes must survive too
    model.layer2.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    revconvert.audit(model, (4, 3, 64, 64))
    assert_unchanged(model, before)


def test_shapes_are_meta_so_big_batches_cost_nothing():
    gm = trace(tv_model("resnet50"), (1024, 3, 224, 224))
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(v.device.type == "meta" for v in vals)
    report = revconvert.audit(tv_model("resnet50"), (1024, 3, 224, 224))
    assert report.blocks[1].input_shape == (1024, 256, 56, 56)


def test_report_renders_and_serialises():
    report = revconvert.audit(tv_model("resnet18"), (1, 3, 64, 64))
    text = str(report)
    assert "layer2.0" in text and "projection-shortcut" in text and "reversible" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["num_blocks"] == 8 and data["num_reversible"] == 5
    assert data["reasons"] == {"projection-shortcut": 3}


class _CachingNet(torch.nn.Module):
    """Caches a parameter expression in eval mode, as timm's EfficientFormer caches attention biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bias = torch.nn.Parameter(torch.ones(1, 4, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        bias = self.cache["bias"] if not self.training else self.bias * 2
        return x + self.conv(x) + bias


def test_a_trace_of_the_model_itself_leaves_no_proxy_in_its_modules():
    # convert traces its own copy with shared modules; a module cache must not keep an fx proxy, which
    # a later trace or an eval forward of the same object would trip on
    from revconvert.analysis.audit import analyze

    model = _CachingNet().eval()
    analyze(model, (1, 4, 8, 8), share_modules=True)
    assert model.cache == {}
    revconvert.audit(model, (1, 4, 8, 8))  # traces again
    assert model(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)


class _ScaledShortcut(nn.Module):
    """MetaFormer's later stages: ``res_scale * x + f(x)``, with a parameter read in the branch too
    (StarReLU's ``scale * relu(x) ** 2 + bias``). Parameter reads are constants of the dataflow:
    counted as entries of the graph, they left the join without a fork, and the block unreported."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.res_scale = nn.Parameter(torch.ones(c))
        self.act_scale = nn.Parameter(torch.ones(1))
        self.act_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = self.stem(x)
        branch = self.conv(self.act_scale * torch.relu(h) ** 2 + self.act_bias)
        return h * self.res_scale.view(1, -1, 1, 1) + branch


def test_a_scaled_shortcut_beside_a_parameter_read_is_reported():
    report = revconvert.audit(_ScaledShortcut(), (1, 3, 8, 8))
    (block,) = report.blocks  # and the StarReLU's "+ bias" is no residual connection
    assert block.reason == "projection-shortcut" and "mul" in block.message
