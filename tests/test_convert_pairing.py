"""ConvertConfig(pair_blocks=True): a coupling per two consecutive blocks, F from the first and G from
the second, so the converted model runs the original's layers once (half the default conversion's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import revconvert
from revconvert import ConvertConfig, ReversibleSegment
from conftest import OpCount, grads_against_ordinary, tv_model

PAIR = ConvertConfig(pair_blocks=True)


class MixedKernels(nn.Module):
    """Five stride-1 identity blocks whose 3x3/5x5/7x7/3x3/5x5 kernels tell which block F or G came
    from (blocks ``blocks.0`` .. ``blocks.4``)."""

    def __init__(self, c: int = 16, kernels: tuple[int, ...] = (3, 5, 7, 3, 5)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)) for k in kernels)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.blocks:
            x = torch.relu(x + branch(x))
        return self.head(x.mean((2, 3)))


def _kernels(fn: nn.Module | None) -> set[int] | None:
    return None if fn is None else {m.kernel_size[0] for m in fn.modules() if isinstance(m, nn.Conv2d)}


def _segment(model: nn.Module) -> ReversibleSegment:
    (seg,) = [m for m in model.modules() if isinstance(m, ReversibleSegment)]
    return seg


def test_f_comes_from_one_block_and_g_from_the_next():
    converted = revconvert.convert(MixedKernels(), (1, 3, 8, 8), config=PAIR)
    seg = _segment(converted)
    # the odd block out is a half coupling (F only): each block becomes one function
    assert [(_kernels(c.F), _kernels(c.G)) for c in seg.couplings] == [({3}, {5}), ({7}, {3}), ({5}, None)]
    assert seg.coupling_blocks == (("blocks.0", "blocks.1"), ("blocks.2", "blocks.3"), ("blocks.4",))
    assert seg.source_blocks == tuple(f"blocks.{i}" for i in range(5))
    summary = converted.revconvert_summary
    assert summary.couplings == {seg_name: 3 for seg_name in summary.segments}
    assert summary.half_couplings == {seg_name: 1 for seg_name in summary.segments}
    assert "3 (1 half)  blocks.0 .. blocks.4" in str(summary)
    default = _segment(revconvert.convert(MixedKernels(), (1, 3, 8, 8)))
    assert [(_kernels(c.F), _kernels(c.G)) for c in default.couplings] == [({k}, {k}) for k in (3, 5, 7, 3, 5)]


def test_each_function_matches_its_own_blocks_parameters():
    model = tv_model("resnet50")
    converted = revconvert.convert(model, (1, 3, 32, 32), config=PAIR)
    summary = converted.revconvert_summary
    assert abs(summary.param_ratio - 1) <= 0.05 and not summary.param_mismatch
    nparams = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    checked = 0
    for seg in (m for m in converted.modules() if isinstance(m, ReversibleSegment)):
        for coupling, blocks in zip(seg.couplings, seg.coupling_blocks):
            if len(blocks) == 2:  # F alone stands for the first block, G for the second
                for fn, block in zip((coupling.F, coupling.G), blocks):
                    assert abs(nparams(fn) / nparams(model.get_submodule(block)) - 1) <= 0.10, block
                    checked += 1
            else:  # the odd block out of a run of 3 or 5: a half coupling, F alone stands for it
                assert coupling.G is None
                assert abs(nparams(coupling.F) / nparams(model.get_submodule(blocks[0])) - 1) <= 0.10, blocks
                checked += 1
    # layer1 (1.1, 1.2), layer2 (2.1, 2.2; 2.3 alone), layer3 (3.1 .. 3.4; 3.5 alone), layer4 (4.1, 4.2)
    assert checked == 12
    # wider inner layers than the default's, which splits each block's parameters over two functions
    paired_inner = _segment_inner(converted, "layer1")
    default_inner = _segment_inner(revconvert.convert(model, (1, 3, 32, 32)), "layer1")
    assert min(paired_inner) > max(default_inner), (paired_inner, default_inner)


def _segment_inner(converted: nn.Module, stage: str) -> set[int]:
    seg = next(m for n, m in converted.named_modules() if isinstance(m, ReversibleSegment) and n.startswith(stage))
    first = seg.couplings[0].F
    outer = next(m for m in first.modules() if isinstance(m, nn.Conv2d)).in_channels
    return {m.out_channels for m in first.modules() if isinstance(m, nn.Conv2d)} - {outer}


def _convs_per_step(model: nn.Module, x: torch.Tensor, ordinary: bool = False) -> int:
    with OpCount() as count, (revconvert.ordinary_autograd() if ordinary else torch.enable_grad()):
        model(x).square().mean().backward()
    return count.ops[torch.ops.aten.convolution.default] + count.ops[torch.ops.aten.convolution_backward.default]


def test_a_paired_step_runs_the_originals_layers_once():
    # Four blocks pair up exactly: under ordinary autograd the paired model runs as many convolutions
    # (forward and backward) as the original; the default conversion runs twice as many in its blocks.
    model = MixedKernels(kernels=(3, 3, 3, 3)).train()
    x = torch.randn(2, 3, 8, 8)
    original = _convs_per_step(copy.deepcopy(model), x)
    paired = revconvert.convert(model, x.shape, config=PAIR).train()
    default = revconvert.convert(model, x.shape).train()
    assert _convs_per_step(paired, x, ordinary=True) == original == 2 * (1 + 4 * 2)  # stem + 8 block convs
    assert _convs_per_step(default, x, ordinary=True) == original + 2 * 8
    # memory-saving: the recomputation adds one forward of the blocks' convolutions, no more
    assert _convs_per_step(paired, x) == original + 8


def test_an_odd_run_ends_with_a_half_coupling_and_runs_each_layer_once():
    # Five blocks: two pairs and a half coupling, so still exactly the original's convolutions under
    # ordinary autograd (a full coupling for the fifth block would run its layers twice).
    model = MixedKernels(kernels=(3, 3, 3, 3, 3)).train()
    x = torch.randn(2, 3, 8, 8)
    original = _convs_per_step(copy.deepcopy(model), x)
    paired = revconvert.convert(model, x.shape, config=PAIR).train()
    assert [c.G is None for c in _segment(paired).couplings] == [False, False, True]
    assert _convs_per_step(paired, x, ordinary=True) == original == 2 * (1 + 5 * 2)
    assert _convs_per_step(paired, x) == original + 10


def test_a_paired_run_of_one_block_keeps_a_full_coupling():
    # A half coupling of a lone block would leave half the channels untouched by the whole run.
    seg = _segment(revconvert.convert(MixedKernels(kernels=(3,)), (1, 3, 8, 8), config=PAIR))
    assert seg.coupling_blocks == (("blocks.0",),)
    assert seg.couplings[0].G is not None and _kernels(seg.couplings[0].G) == {3}


def test_paired_gradients_equal_ordinary_autograd_in_float64():
    converted = revconvert.convert(MixedKernels().double(), (2, 3, 8, 8), config=PAIR)
    for m in converted.modules():  # leave the zero-initialised identity start: exercise F and G
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    pairs, reference = grads_against_ordinary(converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(converted.buffers(), reference.buffers()):  # norm statistics updated once, alike
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_paired_couplings_start_as_identity():
    converted = revconvert.convert(tv_model("resnet50").eval(), (1, 3, 64, 64), config=PAIR).eval()
    seg = converted.get_submodule("layer3.rev_1_5")
    assert len(seg.couplings) == 3
    x = torch.relu(torch.randn(1, 1024, 4, 4))
    torch.testing.assert_close(seg(x), x)


def test_keep_blocks_names_either_block_of_a_pair():
    model = tv_model("resnet50")
    cfg = ConvertConfig(pair_blocks=True, keep_blocks=("layer3.2", "layer3.5"))
    converted = revconvert.convert(model, (1, 3, 64, 64), config=cfg)
    seg = converted.get_submodule("layer3.rev_1_5")  # couplings: (3.1, 3.2), (3.3, 3.4), (3.5,)
    assert [c.keep is not None for c in seg.couplings] == [True, False, True]
    assert converted.revconvert_summary.kept_couplings == ["layer3.rev_1_5.couplings.0",
                                                           "layer3.rev_1_5.couplings.2"]


def test_pair_blocks_is_validated():
    with pytest.raises(TypeError, match="pair_blocks"):
        ConvertConfig(pair_blocks="yes")


def test_memory_estimate_of_a_paired_conversion_equals_measurement():
    model = MixedKernels(c=32)
    profile = revconvert.memory_profile(model, input_size=(3, 16, 16), batch_size=4, config=PAIR)
    converted = revconvert.convert(model, (4, 3, 16, 16), config=PAIR)
    measured = revconvert.measure_memory(converted, torch.randn(4, 3, 16, 16))
    assert profile.converted.peak_bytes == measured.peak_bytes


def test_paired_with_checkpointed_stored_parts_and_kept_outputs_is_exact():
    config = ConvertConfig(pair_blocks=True, checkpoint_stored=True, keep="spatial-convs")
    converted = revconvert.convert(MixedKernels().double(), (2, 3, 8, 8), config=config)
    assert converted.revconvert_summary.checkpointed and len(converted.revconvert_summary.kept_couplings) == 3
    for m in converted.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, revconvert.ReversibleCoupling):
            m.keep_small = True  # keep every 3x3 convolution, however small
    pairs, _ = grads_against_ordinary(converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_summary_pickled_before_the_coupling_counts_still_loads_and_prints():
    import pickle

    summary = revconvert.convert(MixedKernels(), (1, 3, 8, 8), config=PAIR).revconvert_summary
    old_state = {k: v for k, v in vars(summary).items() if k not in ("couplings", "half_couplings")}
    old = type(summary).__new__(type(summary))
    old.__setstate__(old_state)  # what unpickling a summary saved by an older version does
    assert old.couplings == {} and old.half_couplings == {}
    assert "5  blocks.0 .. blocks.4" in str(pickle.loads(pickle.dumps(old)))  # one coupling per block assumed
