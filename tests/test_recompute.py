"""Recompute budget: ConvertConfig(keep=..., recompute_budget=...) and revconvert.recompute."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from conftest import _meta_flops_and_bytes, saved_bytes, tv_model
from revconvert import ConvertConfig
from revconvert.runtime import ReversibleSegment, keep_spatial_convolutions

SHAPE = (1, 3, 64, 64)


def step_flops(model, x, ordinary=False) -> int:
    counter = FlopCounterMode(display=False)
    ctx = revconvert.ordinary_autograd() if ordinary else torch.enable_grad()
    with counter, ctx:
        model(x).float().sum().backward()
    return counter.get_total_flops()


def couplings(model):
    return [c for m in model.modules() if isinstance(m, ReversibleSegment) for c in m.couplings]


@pytest.fixture(scope="module")
def resnet50():
    return tv_model("resnet50").train()


@pytest.mark.parametrize("budget", [0.12, 0.2])
def test_budget_is_met_and_the_plan_predicts_the_measured_flops_exactly(resnet50, budget):
    x = torch.randn(*SHAPE)
    planned = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(recompute_budget=budget))
    summary = planned.revconvert_summary
    ordinary = step_flops(planned, x, ordinary=True)
    overhead = step_flops(planned, x) / ordinary - 1
    assert overhead <= budget
    assert summary.recompute_overhead == pytest.approx(overhead, abs=1e-12)
    kept = [c for c in couplings(planned) if c.keep is keep_spatial_convolutions]
    assert 0 < len(kept) == len(summary.kept_couplings) < len(couplings(planned))
    # Without the plan the same model recomputes everything: over the budget.
    assert step_flops(revconvert.convert(resnet50, SHAPE), x) / ordinary - 1 > budget


def test_a_tighter_budget_keeps_more_and_saves_more_bytes(resnet50):
    x = torch.randn(*SHAPE, requires_grad=True)
    models = [revconvert.convert(resnet50, SHAPE, config=ConvertConfig(recompute_budget=b))
              for b in (0.2, 0.15, 0.12)]
    kept = [len(m.revconvert_summary.kept_couplings) for m in models]
    saved = [saved_bytes(m, x) for m in models]
    assert kept[0] < kept[1] < kept[2]
    assert saved[0] < saved[1] < saved[2]


def test_keep_alone_applies_to_every_coupling(resnet50):
    model = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(keep="spatial-convs"))
    assert all(c.keep is keep_spatial_convolutions for c in couplings(model))
    assert len(model.revconvert_summary.kept_couplings) == len(couplings(model))
    assert all(c.keep is None for c in couplings(revconvert.convert(resnet50, SHAPE)))


def test_an_unreachable_budget_warns_with_what_is_reachable(resnet50):
    with pytest.warns(UserWarning, match=r"recompute_budget=0.0 cannot be met.*adds \d+\.\d%"):
        model = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(recompute_budget=0.0))
    assert all(c.keep is not None for c in couplings(model))


@pytest.mark.parametrize("kwargs, match", [
    ({"recompute_budget": -0.1}, "recompute_budget must be a number >= 0"),
    ({"recompute_budget": "20%"}, "recompute_budget must be a number >= 0"),
    ({"keep": "all"}, "keep must be None or one of"),
])
def test_bad_options_are_refused_with_a_hint(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvertConfig(**kwargs)


def test_summary_reports_the_plan(resnet50):
    model = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(recompute_budget=0.2))
    text = str(model.revconvert_summary)
    assert f"{len(model.revconvert_summary.kept_couplings)} coupling(s) keep" in text
    assert "extra FLOPs per step" in text
    assert model.revconvert_summary.to_dict()["kept_couplings"] == model.revconvert_summary.kept_couplings


def test_memory_estimate_counts_kept_outputs_exactly(resnet50):
    from revconvert.memory import measure_memory, memory_profile

    plain = revconvert.convert(resnet50, SHAPE)
    kept = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(keep="spatial-convs"))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    estimate = memory_profile(kept, (3, 64, 64), 2, converted=False).original
    measured = measure_memory(kept, x)
    assert estimate.activation_bytes == measured.activation_bytes
    assert estimate.activation_bytes > memory_profile(plain, (3, 64, 64), 2, converted=False).original.activation_bytes


def test_ordinary_autograd_also_stores_the_checkpointed_parts(resnet50):
    # The planner's denominator: the step with every activation stored, checkpointed parts included.
    x = torch.randn(*SHAPE)
    default = revconvert.convert(resnet50, SHAPE)
    hybrid = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(checkpoint_stored=True))
    assert step_flops(hybrid, x, ordinary=True) == step_flops(default, x, ordinary=True)
    assert step_flops(hybrid, x) > step_flops(default, x)


def test_budget_with_checkpointed_parts_still_predicts_the_measured_flops(resnet50):
    x = torch.randn(*SHAPE)
    # 0.25: with every coupling keeping, the stored parts' and 1x1 convolutions' recomputation alone
    # add 20.2% (resnet50 at the default widths), so a budget must be above that to be met
    model = revconvert.convert(resnet50, SHAPE, config=ConvertConfig(checkpoint_stored=True, recompute_budget=0.25))
    overhead = step_flops(model, x) / step_flops(model, x, ordinary=True) - 1
    assert overhead <= 0.25
    assert model.revconvert_summary.recompute_overhead == pytest.approx(overhead, abs=1e-12)


def test_cli_recompute_flags(tmp_path, capsys):
    import json

    from revconvert.cli import main

    out = tmp_path / "c.pt"
    assert main(["convert", "resnet50", "-o", str(out), "--input-size", "64", "--recompute-budget", "0.15",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept_couplings"] and summary["recompute_overhead"] <= 0.15
    loaded = torch.load(out, weights_only=False)
    assert sum(c.keep is not None for c in couplings(loaded)) == len(summary["kept_couplings"])
    assert main(["convert", "resnet18", "-o", str(out), "--input-size", "64", "--keep", "spatial-convs",
                 "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["kept_couplings"]
    assert len(kept) == len(couplings(torch.load(out, weights_only=False))) == 5  # every coupling of resnet18
    with pytest.raises(SystemExit):
        main(["convert", "resnet18", "-o", str(out), "--recompute-budget", "-1"])
    assert "must be >= 0" in capsys.readouterr().err


def test_resnet152_at_checkpoint_sequentials_flops_keeps_at_most_half_its_bytes():
    """Issue 6's target, counted on meta tensors (same shapes and storages as real ones)."""
    import math

    from torch.utils.checkpoint import checkpoint_sequential

    shape = (4, 3, 128, 128)
    with torch.device("meta"):
        model = tv_model("resnet152").train()
    x = torch.empty(*shape, device="meta")

    body = torch.nn.Sequential(torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
                               *model.layer1, *model.layer2, *model.layer3, *model.layer4)

    def sequential(inp):
        h = checkpoint_sequential(body, round(math.sqrt(len(body))), inp, use_reentrant=False)
        return model.fc(torch.flatten(model.avgpool(h), 1))

    ckpt_flops, ckpt_bytes = _meta_flops_and_bytes(sequential, x, model)
    ordinary_flops, _ = _meta_flops_and_bytes(revconvert.convert(model, shape), x, ordinary=True)
    config = ConvertConfig(checkpoint_stored=True, recompute_budget=ckpt_flops / ordinary_flops - 1)
    planned = revconvert.convert(model, shape, config=config)
    flops, nbytes = _meta_flops_and_bytes(planned, x)
    assert flops <= ckpt_flops
    assert nbytes <= 0.5 * ckpt_bytes
