"""Property test: randomly composed residual networks are found, converted, and differentiate exactly."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import revconvert
from conftest import grads_against_ordinary


class Block(nn.Module):
    def __init__(self, branch: nn.Module, post: bool) -> None:
        super().__init__()
        self.branch = branch
        self.post = nn.ReLU() if post else None

    def forward(self, x):
        out = x + self.branch(x)
        return self.post(out) if self.post is not None else out


class Net(nn.Module):
    def __init__(self, c: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SplitBranch(nn.Module):
    """Branches that split their channels and concatenate them: ``res2net`` (pieces of an inner width,
    each added to the previous piece's conv output), ``mixed`` (two halves through their own 1x1
    convs into the block's width, MixNet's), ``partial`` (a conv on a quarter of the block input,
    FasterNet's)."""

    def __init__(self, kind: str, c: int, w: int, pieces: int) -> None:
        super().__init__()
        self.kind, self.pieces = kind, pieces
        self.conv1 = nn.Sequential(nn.Conv2d(c, w, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.inner = nn.ModuleList(nn.Sequential(nn.Conv2d(w // pieces, w // pieces, 3, padding=1),
                                                 nn.BatchNorm2d(w // pieces)) for _ in range(pieces - 1))
        self.mixed = nn.ModuleList(nn.Conv2d(w // 2, c // 2, 1) for _ in range(2))
        self.partial = nn.Conv2d(c // 4, c // 4, 3, padding=1)
        self.conv3 = nn.Sequential(nn.Conv2d(w, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        if self.kind == "partial":
            a, b = torch.split(x, [x.shape[1] // 4, x.shape[1] - x.shape[1] // 4], 1)
            return self.conv3(self.conv1(torch.cat([self.partial(a), b], 1)))
        t = self.conv1(x)
        if self.kind == "mixed":
            halves = t.chunk(2, 1)  # indexed, not iterated: fx cannot iterate a traced tuple
            return torch.cat([self.mixed[0](halves[0]), self.mixed[1](halves[1])], 1)
        parts = t.split(t.shape[1] // self.pieces, 1)
        out, sp = [], None
        for i, conv in enumerate(self.inner):
            sp = torch.relu(conv(parts[i] if sp is None else sp + parts[i]))
            out.append(sp)
        return self.conv3(torch.cat([*out, parts[self.pieces - 1]], 1))


@st.composite
def branches(draw, c: int) -> nn.Module:
    kinds = ["basic", "bottleneck", "preact", "groupnorm", "depthwise", "res2net", "mixed"]
    style = draw(st.sampled_from(kinds + (["partial"] if (c // 2) % 4 == 0 else [])))
    if style in ("res2net", "mixed", "partial"):
        pieces = draw(st.sampled_from([2, 4]))
        return SplitBranch(style, c, draw(st.sampled_from([8, 16])), pieces)
    k = draw(st.sampled_from([1, 3]))
    w = draw(st.sampled_from([2, 4, 6]))
    if style == "basic":
        return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    if style == "bottleneck":
        return nn.Sequential(nn.Conv2d(c, w, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                             nn.Conv2d(w, w, k, padding=k // 2), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                             nn.Conv2d(w, c, 1), nn.BatchNorm2d(c))
    if style == "preact":
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, w, k, padding=k // 2),
                             nn.BatchNorm2d(w), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1))
    if style == "groupnorm":
        return nn.Sequential(nn.Conv2d(c, w, k, padding=k // 2), nn.GroupNorm(2, w), nn.GELU(),
                             nn.Conv2d(w, c, 1), nn.GroupNorm(2, c))
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))


@st.composite
def nets(draw) -> tuple[Net, int]:
    c = draw(st.sampled_from([4, 8, 12, 16]))
    n = draw(st.integers(1, 4))
    blocks = [Block(draw(branches(c)), draw(st.booleans())) for _ in range(n)]
    return Net(c, blocks), n


@settings(max_examples=16, deadline=None)
@given(nets(), st.integers(0, 2**16), st.booleans())
def test_random_residual_nets_convert_exactly(net_and_n, seed, pair):
    # pair: ConvertConfig(pair_blocks=True), where F and G of a coupling come from two blocks of
    # different styles (a group-norm block's F before a depthwise block's G, ...)
    net, n = net_and_n
    torch.manual_seed(seed)
    report = revconvert.audit(net, (2, 3, 6, 6))
    assert len(report.blocks) == n and all(b.reversible for b in report.blocks), str(report)
    config = revconvert.ConvertConfig(zero_init=False, pair_blocks=pair)
    converted = revconvert.convert(net, (2, 3, 6, 6), config=config).double()
    segments = [m for m in converted.modules() if isinstance(m, revconvert.ReversibleSegment)]
    assert len(segments) == 1 and len(segments[0].couplings) == ((n + 1) // 2 if pair else n)
    pairs, _ = grads_against_ordinary(converted, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    # A conv bias in front of a train-mode BatchNorm has a gradient that is zero up to rounding;
    # measure each tensor against its own scale, but no finer than the gradients' overall scale.
    floor = 1e-4 * max(want.abs().max().item() for _, want in pairs)
    for got, want in pairs:
        assert got is not None and want is not None
        assert (got - want).abs().max().item() <= 1e-10 * max(want.abs().max().item(), floor)
