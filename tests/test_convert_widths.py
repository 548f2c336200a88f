"""Hardware-friendly inner widths: F and G's inner channel counts are multiples of 32 by default, of
16 or 8 where 32 would move a block (or the whole model) too far from its parameters."""

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
def test_inner_widths_are_aligned_by_default(name):
    model = tv_model(name)
    converted = revconvert.convert(model, (1, 3, 32, 32))
    widths = _inner_widths(converted)
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert all(w % 32 == 0 for w in widths if w >= 64), widths  # wide enough for the coarse multiple
    assert abs(converted.revconvert_summary.param_ratio - 1) <= 0.05
    assert not converted.revconvert_summary.param_mismatch  # every coupling within 10% of its block
    unrounded = _inner_widths(revconvert.convert(model, (1, 3, 32, 32), config=ConvertConfig(width_multiple=1)))
    assert any(w % 8 for w in unrounded), unrounded  # the rounding is the option's doing
    sixteen = _inner_widths(revconvert.convert(model, (1, 3, 32, 32), config=ConvertConfig(width_multiple=16)))
    assert all(w % 16 == 0 for w in sixteen), sixteen


def test_resnet50_widths_halve_the_multiple_where_32_misses_the_block():
    # resnet50's matched inner widths are 49.6, 99, 198 and 397 (layer1..layer4). Rounded to 32, the
    # first would be 32 or 64 (half or 1.5x the block's parameters), so it is rounded to 16 instead.
    widths = _inner_widths(revconvert.convert(tv_model("resnet50"), (1, 3, 32, 32)))
    assert {48, 96, 192, 384} <= widths, widths


def test_the_whole_model_stays_within_five_percent():
    # Blocks like resnet50's layer3 (1024 channels, inner width 256) are matched at inner width 198:
    # 192 (a multiple of 32, and of 16) is 5.1% below the block's parameters. Where such blocks are
    # nearly the whole model, the conversion rounds to 8 instead (200: 1.4% above).
    class Net(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 1024, 1, bias=False)
            self.head = nn.Linear(1024, classes)  # parameters the conversion leaves as they are
            self.blocks = nn.ModuleList(nn.Sequential(
                nn.Conv2d(1024, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                nn.Conv2d(256, 1024, 1, bias=False), nn.BatchNorm2d(1024)) for _ in range(2))

        def forward(self, x):
            x = self.stem(x)
            for branch in self.blocks:
                x = torch.relu(x + branch(x))
            return self.head(x.mean((2, 3)))

    model = Net(classes=1)
    converted = revconvert.convert(model, (1, 3, 4, 4))
    assert _inner_widths(converted) == {200}
    assert abs(converted.revconvert_summary.param_ratio - 1) <= 0.05
    # the same blocks inside a model with many more parameters elsewhere keep the coarser 192
    model = Net(classes=2000)
    converted = revconvert.convert(model, (1, 3, 4, 4))
    assert _inner_widths(converted) == {192}
    assert abs(converted.revconvert_summary.param_ratio - 1) <= 0.05


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
