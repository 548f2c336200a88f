"""Hardware-friendly inner widths: F and G's inner channel counts are multiples of 8 by default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revconvert
from revconvert import ConvertConfig
from conftest import tv_model


def _inner_widths(converted: nn.Module) -> set[int]:
    """Output channels of the couplings' convolutions that are not the half-width outer ones."""
    widths = set()
    for name, seg in converted.named_modules():
        if isinstance(seg, revconvert.ReversibleSegment):
            x = next(m for m in seg.modules() if isinstance(m, nn.Conv2d))
            half = x.in_channels
            widths |= {m.out_channels for m in seg.modules() if isinstance(m, nn.Conv2d)} - {half}
    return widths


@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2"])
def test_inner_widths_are_multiples_of_eight_by_default(name):
    model = tv_model(name)
    widths = _inner_widths(revconvert.convert(model, (1, 3, 32, 32)))
    assert widths and all(w % 8 == 0 for w in widths), widths
    unrounded = _inner_widths(revconvert.convert(model, (1, 3, 32, 32), config=ConvertConfig(width_multiple=1)))
    assert any(w % 8 for w in unrounded), unrounded  # the rounding is the option's doing
    sixteen = _inner_widths(revconvert.convert(model, (1, 3, 32, 32), config=ConvertConfig(width_multiple=16)))
    assert all(w % 16 == 0 for w in sixteen), sixteen


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, 1000])
def test_width_multiple_is_validated(bad):
    with pytest.raises(ValueError, match="width_multiple"):
        ConvertConfig(width_multiple=bad)


def test_a_block_too_small_to_round_keeps_its_matched_widths():
    # A bottleneck with inner width 4 and 8 outer channels: rounding its halves' inner width to 8
    # would double the coupling's parameters, so it stays unrounded and within 10%.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            x = self.stem(x)
            return torch.relu(x + self.branch(x))

    model = Net()
    converted = revconvert.convert(model, (1, 3, 8, 8))
    seg = next(m for m in converted.modules() if isinstance(m, revconvert.ReversibleSegment))
    ratio = sum(p.numel() for p in seg.parameters()) / sum(p.numel() for p in model.branch.parameters())
    assert abs(ratio - 1) <= 0.10, ratio
