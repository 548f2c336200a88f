"""The step cost memory_profile reports before training (FLOPs and kernel-launching aten ops, counted
on fake tensors) is what a real training step runs, for the original and its conversions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from conftest import OpCount, tv_model
from revconvert import ConvertConfig
from revconvert._ops import launches_kernel
from revconvert.memory import measure_memory, memory_profile


def _real_step_cost(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs (``FlopCounterMode``) and kernel-launching aten ops (counted per op by ``OpCount``), of
    one real ``sum()`` training step of copies of ``model``."""
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    flops = FlopCounterMode(display=False)
    with flops:
        first(x).sum().backward()
    with OpCount() as count:
        second(x).sum().backward()
    return flops.get_total_flops(), sum(n for func, n in count.ops.items() if launches_kernel(func))


@pytest.mark.parametrize("config", [ConvertConfig(), ConvertConfig(pair_blocks=True),
                                    ConvertConfig(checkpoint_stored=True, keep="spatial-convs")],
                         ids=["default", "paired", "checkpointed-keep"])
def test_the_estimated_step_cost_is_the_real_steps(config):
    model = tv_model("resnet50").train()
    x = torch.randn(2, 3, 64, 64)
    profile = memory_profile(model, (3, 64, 64), 2, config=config)
    converted = revconvert.convert(model, (2, 3, 64, 64), config=config).train()
    for estimate, real in ((profile.original, model), (profile.converted, converted)):
        assert (estimate.step_flops, estimate.step_ops) == _real_step_cost(real, x)
    assert measure_memory(converted, x).step_ops == profile.converted.step_ops  # the same count, measured
    assert profile.ratios["step_ops"] == profile.converted.step_ops / profile.original.step_ops


def test_pairing_shows_as_fewer_kernel_launches_at_the_same_flops():
    model = tv_model("resnet50")
    default = memory_profile(model, (3, 64, 64), 2)
    paired = memory_profile(model, (3, 64, 64), 2, config=ConvertConfig(pair_blocks=True))
    assert paired.converted.step_ops < 0.7 * default.converted.step_ops
    assert paired.converted.step_flops == pytest.approx(default.converted.step_flops, rel=0.02)
    text = str(paired)
    assert "step cost" in text and "kernel launches" in text
    assert f"{paired.ratios['step_ops']:.2f}x" in text
    assert paired.to_dict()["converted"]["step_ops"] == paired.converted.step_ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_estimated_step_cost_is_the_real_steps_on_cuda():
    # cuDNN's batch norm and convolution ops replace the CPU ones: the estimate for "cuda" must count them
    model = tv_model("resnet50").train()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    config = ConvertConfig(pair_blocks=True)
    profile = memory_profile(model, (3, 64, 64), 2, config=config, device="cuda")
    converted = revconvert.convert(model, (2, 3, 64, 64), config=config).train().cuda()
    for estimate, real in ((profile.original, copy.deepcopy(model).cuda()), (profile.converted, converted)):
        assert (estimate.step_flops, estimate.step_ops) == _real_step_cost(real, x)
