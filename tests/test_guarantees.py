"""Behaviour guarantees: a conversion behaves like the original or refuses clearly (issue 12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revconvert
from revconvert import ConversionError
from conftest import assert_unchanged, snapshot, tv_model


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- frozen parameters and frozen norms (item 3) --------------------------------------------------

def test_frozen_model_stays_frozen_except_what_was_trainable():
    model = tv_model("resnet18")
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    before = snapshot(model)
    converted = revconvert.convert(model, (1, 3, 32, 32))
    assert _trainable(converted) == _trainable(model) == 513_000
    assert [n for n, p in converted.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert_unchanged(model, before)
    converted(torch.randn(2, 3, 32, 32)).sum().backward()  # frozen couplings, trainable head
    assert converted.fc.weight.grad is not None
    assert all(p.grad is None for n, p in converted.named_parameters() if not n.startswith("fc."))


def test_partly_frozen_block_maps_layer_by_layer():
    model = tv_model("resnet18").train()
    block = model.layer1[1]
    block.bn1.requires_grad_(False)       # frozen affine norm, trainable convs
    block.conv2.requires_grad_(False)
    block.bn2.eval()                      # frozen statistics
    converted = revconvert.convert(model, (1, 3, 32, 32))
    (seg_name, seg), = [(n, m) for n, m in converted.named_modules()
                        if isinstance(m, revconvert.ReversibleSegment) and "layer1.1" in m.source_blocks]
    coupling = seg.couplings[list(seg.source_blocks).index("layer1.1")]
    for fn in (coupling.F, coupling.G):
        pre, conv1, bn1, relu, conv2, bn2 = fn  # ReLU moved to the front, then the branch layer by layer
        assert conv1.weight.requires_grad
        assert not bn1.weight.requires_grad and not bn1.bias.requires_grad
        assert not conv2.weight.requires_grad
        assert bn2.weight.requires_grad
        assert bn2.training is False and bn1.training is True
    assert model.layer1[1].bn2.training is False and model.layer1[1].bn1.training  # caller's untouched
    # the other coupling of the segment is fully trainable, like its block
    other = seg.couplings[list(seg.source_blocks).index("layer1.0")] if "layer1.0" in seg.source_blocks \
        else None
    if other is not None:
        assert all(p.requires_grad for p in other.parameters())
    x = torch.randn(2, 3, 32, 32)
    converted(x).sum().backward()
    assert coupling.F[2].weight.grad is None and coupling.F[1].weight.grad is not None


def test_partly_frozen_layer_without_a_counterpart_refuses():
    from revconvert.passes.frozen import carry_frozen_flags

    original = nn.Linear(2, 2)
    original.weight.requires_grad_(False)
    rebuilt = nn.Sequential(nn.BatchNorm1d(2))  # parameters 'weight' and 'bias' map by name ...
    carry_frozen_flags(rebuilt, [original], block="layer1.1")
    assert not rebuilt[0].weight.requires_grad and rebuilt[0].bias.requires_grad
    other = nn.Module()
    other.scale = nn.Parameter(torch.ones(2))  # ... 'scale' has no counterpart: no faithful rule
    with pytest.raises(ConversionError, match=r"block 'layer1.1'.*weight.*Hint"):
        carry_frozen_flags(nn.Sequential(other), [original], block="layer1.1")
