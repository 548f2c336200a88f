"""plan_memory: the least step FLOPs whose peak fits a budget, checked against measurement and brute force."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from revconvert import ConvertConfig
from revconvert.cli import main
from revconvert.memory.estimate import _estimate
from revconvert.memory.plan import _Planner, _Space
from revconvert.memory.plan_costs import realise, step_flops
from revconvert.memory.plan_report import config_from_dict, parse_bytes
from revconvert.memory.step import StepTimeline
from toy_models import CifarResNet


def _measured(model, example, config, optimizer=None):
    """Measured peak beyond the parameters, and FLOPs of one training step, of ``convert(model, config)``."""
    converted = revconvert.convert(model, example, config=config)
    breakdown = revconvert.measure_memory(converted, example, optimizer=optimizer)
    work = revconvert.convert(model, example, config=config).train()
    with FlopCounterMode(display=False) as counter:
        work(example).sum().backward()
    return breakdown.peak_bytes - breakdown.param_bytes, counter.get_total_flops()


def _original_flops(model, example):
    with FlopCounterMode(display=False) as counter:
        model(example).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("24 gigs")
    with pytest.raises(ValueError, match="positive"):
        parse_bytes(0)


def test_bad_arguments_say_what_is_wrong():
    model = CifarResNet(n=1, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="max_flops_ratio"):
        revconvert.plan_memory(model, "1MiB", input_size=32, batch_size=None)
    with pytest.raises(ValueError, match="batch_size"):
        revconvert.plan_memory(model, "1MiB", input_size=32, batch_size=0)
    with pytest.raises(ValueError, match="cannot read memory size"):
        revconvert.plan_memory(model, "lots", input_size=32, batch_size=2)


def test_checkpoint_stored_takes_part_names():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    cfg = ConvertConfig(only=("layer2",), checkpoint_stored=("stem", "layer1.1"), keep_blocks=("layer2.1",))
    converted = revconvert.convert(model, x, config=cfg)
    assert converted.revconvert_summary.checkpointed == {"ckpt_stem": ["stem"], "ckpt_layer1_1": ["layer1.1"]}
    assert converted.revconvert_summary.kept_couplings == ["layer2.rev_1.couplings.0"]
    with pytest.raises(revconvert.ConversionError, match="did you mean 'stem'"):
        revconvert.convert(model, x, config=ConvertConfig(checkpoint_stored=("stme",)))
    with pytest.raises(revconvert.ConversionError, match="keep_blocks names 'layer3.1'"):
        revconvert.convert(model, x, config=ConvertConfig(only=("layer2",), keep_blocks=("layer3.1",)))
    with pytest.raises(ValueError, match="not both"):
        ConvertConfig(keep_blocks=("layer2.1",), recompute_budget=0.2)


@pytest.fixture(scope="module")
def tiny():
    """A CIFAR ResNet with one block per stage (stem, an eligible block, two projection blocks, head):
    every combination of choices can be estimated."""
    torch.manual_seed(0)
    model = CifarResNet(n=1, widths=(8, 16, 32))
    planner = _Planner(model, (3, 32, 32), torch.float32, None, torch.device("cpu"), "spatial-convs", {})
    cal = planner.calibrate(4)
    space = _Space(cal, "spatial-convs")
    combos = []
    for pick in itertools.product(*[range(len(o)) for o in space.options]):
        config = realise(planner.units, space.choices_of(pick))
        est = planner.estimate(config, 4)
        combos.append((pick, est.peak_bytes - est.param_bytes, step_flops(model, (4, 3, 32, 32), config, {})))
    return model, planner, cal, combos


@pytest.mark.parametrize("fraction", [1.0, 0.8, 0.65, 0.5])
def test_plan_matches_brute_force(tiny, fraction):
    model, planner, cal, combos = tiny
    budget = int(cal.original_peak * fraction)
    plan = planner.plan(budget, 4, None, cal)
    fitting = [flops for _, peak, flops in combos if peak <= budget]
    assert plan.fits == bool(fitting)
    if fitting:
        assert plan.flops == min(fitting)
    else:
        assert plan.peak_bytes == min(peak for _, peak, _ in combos)


def test_plan_peak_and_flops_are_measured(tiny):
    model, planner, cal, combos = tiny
    budget = int(cal.original_peak * 0.8)
    plan = planner.plan(budget, 4, None, cal)
    assert plan.fits and plan.flops_ratio > 1
    x = torch.randn(4, 3, 32, 32)
    peak, flops = _measured(model, x, plan.config)
    assert abs(peak - plan.peak_bytes) <= 0.02 * plan.peak_bytes
    assert peak <= budget * 1.02
    assert flops / _original_flops(model, x) == pytest.approx(plan.flops_ratio, rel=1e-9)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_plan_fits_as_measured(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    # 1 byte: nothing fits, the plan is the least peak
    plan = revconvert.plan_memory(model, 1, input_size=64, batch_size=2, optimizer="sgd-momentum")
    assert not plan.fits
    budget = int((plan.peak_bytes + plan.original_peak_bytes) / 2)
    plan = revconvert.plan_memory(model, budget, input_size=64, batch_size=2, optimizer="sgd-momentum")
    x = torch.randn(2, 3, 64, 64)
    peak, flops = _measured(model, x, plan.config, optimizer="sgd-momentum")
    assert plan.fits and peak <= budget * 1.02
    assert abs(peak - plan.peak_bytes) <= 0.02 * plan.peak_bytes
    assert flops / _original_flops(model, x) == pytest.approx(plan.flops_ratio, rel=1e-9)
    assert "decision" in str(plan) and json.dumps(plan.to_dict())
    assert config_from_dict(json.loads(json.dumps(plan.to_dict()))) == plan.config


def test_largest_batch():
    model = CifarResNet(n=1, widths=(8, 16, 32))
    plan = revconvert.plan_memory(model, "2MiB", input_size=32, batch_size=None, max_flops_ratio=1.2)
    assert plan.fits and plan.flops_ratio <= 1.2 + 1e-9
    bigger = revconvert.plan_memory(model, "2MiB", input_size=32, batch_size=plan.batch_size + 1,
                                    max_flops_ratio=1.2)
    assert not bigger.fits


def test_cli_plan_then_convert(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "resnet18", "--input-size", "64", "--batch-size", "2", "--memory", "40MiB",
                 "-o", str(out)]) == 0
    assert "decision" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    pt = tmp_path / "c.pt"
    assert main(["convert", "resnet18", "--input-size", "64", "--plan", str(out), "-o", str(pt), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["converted_blocks"]) == sorted(saved["config"]["only"])


def test_nothing_fits_returns_least_verified_peak(tiny, monkeypatch):
    """When no plan fits, the answer is the least *verified* peak: a model that ranks the truly least
    peak second must not hide it."""
    model, planner, cal, combos = tiny
    least = min(peak for _, peak, _ in combos)
    best = {pick for pick, peak, _ in combos if peak == least}
    true_peak = {pick: peak for pick, peak, _ in combos}
    compose = _Space._compose

    def misjudged(self):
        compose(self)
        rows = [self._row(p) for p in best]
        others = self.peak.clone()
        others[rows] = float("inf")
        self.peak[rows] = others.min() + 1  # just above the model's least peak, which is not the least
    monkeypatch.setattr(_Space, "_compose", misjudged)
    space = _Space(cal, "spatial-convs")
    assert true_peak[space.least_peak(None, set())] > least  # the model is wrong where it matters
    plan = planner.plan(1, 4, None, cal)
    assert not plan.fits
    assert plan.peak_bytes == least


def test_an_overshoot_by_a_keeping_plan_raises_the_plans_sharing_its_keep(tiny, monkeypatch):
    """The composed model errs where outputs are kept. When every keeping plan is modelled to fit but
    none does, the planner must learn that from its verifications and return the cheapest plan that
    truly fits, not one found by lowering its target below the cheaper true fits."""
    model, planner, cal, combos = tiny
    space = _Space(cal, "spatial-convs")
    keeps = {pick for pick, _, _ in combos
             if any(c.cls == "V" and c.keep for c in space.choices_of(pick))}
    cheap = min(flops for pick, _, flops in combos if pick in keeps)  # keeping saves recomputation
    floor = min(peak for pick, peak, flops in combos if pick in keeps or flops <= cheap)
    # the budget: the peak of the cheapest plan that keeps nothing, costs more than the keeping plans,
    # and fits where no keeping plan and nothing as cheap as them does
    budget = min((flops, peak) for pick, peak, flops in combos
                 if pick not in keeps and flops > cheap and peak < floor)[1]
    fits = [flops for pick, peak, flops in combos if peak <= budget]
    assert keeps and fits and min(fits) > cheap
    compose = _Space._compose

    def misjudged(self):
        compose(self)
        for pick in keeps:
            self.peak[self._row(pick)] = budget - 1  # modelled to fit, cheaper than the true fits
    monkeypatch.setattr(_Space, "_compose", misjudged)
    plan = planner.plan(budget, 4, None, cal)
    assert plan.fits
    assert plan.flops == min(fits)


def test_checkpoint_split_runs_each_part_as_two_regions_with_exact_gradients():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    parts = ("stem", "layer1.1", "layer2.0")
    cfg = ConvertConfig(only=(), checkpoint_stored=parts, checkpoint_split=parts)
    converted = revconvert.convert(model, x, config=cfg).train()
    runs = converted.revconvert_summary.checkpointed
    assert sorted(p for covered in runs.values() for p in covered) == sorted(parts * 2)
    model.train()
    model(x).sum().backward()
    converted(x).sum().backward()
    grads = dict(converted.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for name, buf in model.named_buffers():  # running statistics updated once, as in the original
        torch.testing.assert_close(converted.get_buffer(name), buf, rtol=1e-12, atol=0, msg=name)


def test_checkpoint_split_estimate_is_measured_and_lowers_the_part_backward():
    torch.manual_seed(0)
    model = CifarResNet(n=2, widths=(8, 16, 32))
    x = torch.randn(8, 3, 32, 32)
    rise = {}
    for split in ((), ("layer2.0",)):
        cfg = ConvertConfig(only=(), checkpoint_stored=("stem", "layer2.0"), checkpoint_split=split)
        est = revconvert.memory_profile(model, (3, 32, 32), 8, config=cfg).converted
        peak, _ = _measured(model, x, cfg)
        assert est.peak_bytes - est.param_bytes == peak
        timeline = StepTimeline()
        _estimate(model, (3, 32, 32), 8, torch.float32, None, torch.device("cpu"), cfg, {}, timeline)
        rise[split] = max(top - start for label, start, top in timeline.windows if label == "layer2.0")
    assert rise[("layer2.0",)] < 0.8 * rise[()]  # its backward recomputes one half at a time


def test_checkpoint_split_names_must_be_checkpointed_parts():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="checkpoint_split names 'layer2.0', which is not checkpointed"):
        ConvertConfig(checkpoint_stored=("stem",), checkpoint_split=("layer2.0",))
    with pytest.raises(revconvert.ConversionError, match="checkpoint_split names 'layer9.0'"):
        revconvert.convert(model, x, config=ConvertConfig(checkpoint_stored=True, checkpoint_split=("layer9.0",)))


def test_realise_keeps_the_blocks_of_the_last_couplings_when_paired():
    from revconvert.memory.plan_costs import RUN, Choice, Unit

    unit = Unit("layer1.rev_0_2", RUN, ("layer1.0", "layer1.1", "layer1.2"), pairs=True)
    assert unit.couplings == [("layer1.0", "layer1.1"), ("layer1.2",)]
    base = ConvertConfig(pair_blocks=True)
    assert realise([unit], [Choice("V", 1)], base=base).keep_blocks == ("layer1.2",)
    config = realise([unit], [Choice("V", 2)], base=base)
    assert config.keep_blocks == ("layer1.0", "layer1.1", "layer1.2") and config.pair_blocks
    assert Choice("V", 1).label(unit) == "reversible, last 1 of 2 keep"


def test_paired_plan_fits_as_measured():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()  # runs of 2, 3, 5 and 2 eligible blocks: 1, 2, 3 and 1 couplings
    planner = _Planner(model, (3, 64, 64), torch.float32, "sgd-momentum", torch.device("cpu"), "spatial-convs", {},
                       pair_blocks=True)
    cal = planner.calibrate(2)
    least = planner.plan(1, 2, None, cal)
    budget = int((least.peak_bytes + cal.original_peak) / 2)
    plan = planner.plan(budget, 2, None, cal)
    assert plan.fits and plan.config.pair_blocks and "pair_blocks" in str(plan)
    x = torch.randn(2, 3, 64, 64)
    peak, flops = _measured(model, x, plan.config, optimizer="sgd-momentum")
    assert peak <= budget * 1.02 and abs(peak - plan.peak_bytes) <= 0.02 * plan.peak_bytes
    assert flops / _original_flops(model, x) == pytest.approx(plan.flops_ratio, rel=1e-9)
    segments = [m for m in revconvert.convert(model, x, config=plan.config).modules()
                if isinstance(m, revconvert.ReversibleSegment)]
    assert segments and all(len(s.couplings) == (len(s.source_blocks) + 1) // 2 for s in segments)
    assert config_from_dict(json.loads(json.dumps(plan.to_dict()))) == plan.config
    # kernel launches of the planned and the original step, as a real step counts them
    converted = revconvert.convert(model, x, config=plan.config)
    assert plan.ops == revconvert.measure_memory(converted, x, optimizer="sgd-momentum").step_ops
    assert plan.original_ops == revconvert.measure_memory(model, x, optimizer="sgd-momentum").step_ops
    assert f"kernel launches {plan.ops_ratio:.2f}x" in str(plan) and plan.to_dict()["ops"] == plan.ops
    with pytest.raises(TypeError, match="pair_blocks"):
        revconvert.plan_memory(model, budget, input_size=64, batch_size=2, pair_blocks="yes")


class _ScaledBlock(torch.nn.Module):
    """ConvNeXt's layer scale as timm writes it: the parameter reshaped where it is used, an
    expression of parameters alone that fx places among the block's nodes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(c)
        self.gamma = torch.nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv(x)).mul(self.gamma.reshape(1, -1, 1, 1))


def _scaled_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ScaledBlock(8), _ScaledBlock(8),
                               torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), _ScaledBlock(16), _ScaledBlock(16),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))


# the stem convolution, a run of two blocks, the strided convolution between the runs, a run, the head
SCALED_NET_SEGMENTS = [("stem", "stored"), ("rev_1_2", "reversible"), ("stored_0", "stored"),
                       ("rev_4_5", "reversible"), ("head", "stored")]


def test_parameter_expressions_between_blocks_make_no_part_of_their_own():
    """They go with their user: a part of parameter reads alone has nothing to checkpoint, and plan_memory
    used to hand such parts to checkpoint_stored, which refused them (timm's ConvNeXt, DLA)."""
    report = revconvert.audit(_scaled_net(), (2, 3, 16, 16))
    assert [(s.name, s.kind) for s in report.segments] == SCALED_NET_SEGMENTS
    plan = revconvert.plan_memory(_scaled_net(), "1MiB", input_size=(3, 16, 16), batch_size=8)
    converted = revconvert.convert(_scaled_net(), (8, 3, 16, 16), config=plan.config)
    converted(torch.randn(8, 3, 16, 16)).sum().backward()


def _many_parts(runs: int) -> torch.nn.Module:
    """The stem, ``runs`` runs of one block with a stored convolution after each: 2 * runs + 1 parts."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(runs):
        layers += [_ScaledBlock(8), torch.nn.Conv2d(8, 8, 3, padding=1)]
    return torch.nn.Sequential(*layers)


def test_the_frontier_search_finds_what_the_exhaustive_search_finds(monkeypatch):
    """Forced onto a space small enough to enumerate, the dynamic programming over the chain of parts
    (no grid, no cap) keeps, for every budget, a combination as cheap as the cheapest of all, and the
    least peak of all."""
    import revconvert.memory.plan as plan_module

    planner = _Planner(_many_parts(3), (3, 8, 8), torch.float32, None, torch.device("cpu"), "spatial-convs", {})
    cal = planner.calibrate(2)
    every = _Space(cal, "spatial-convs")
    assert every._rows is None and len(every.index) > 1000  # enumerated
    monkeypatch.setattr(plan_module, "MAX_SPACE", 0)
    monkeypatch.setattr(plan_module, "MAX_FRONTIER", 10**9)
    monkeypatch.setattr(plan_module, "FRONTIER_GRID", 1e-15)
    frontier = _Space(cal, "spatial-convs")
    assert frontier._rows is not None and len(frontier.index) < len(every.index) / 4
    low, high = float(every.peak.min()), float(every.peak.max())
    for k in range(41):
        target = low + (high - low) * k / 40
        a, b = every.cheapest(target, None, set()), frontier.cheapest(target, None, set())
        assert (a is None) == (b is None)
        if a is not None:
            assert float(frontier.flops[frontier._row(b)]) == float(every.flops[every._row(a)])
            assert frontier.peak_of(b) == every.peak_of(b)  # the same composition, row for row
    assert frontier.peak_of(frontier.least_peak(None, set())) == low
    # the numbers the search compares are the composition's own, combination by combination
    for b, saved, f, grads, flops, pick in plan_module._frontier(frontier):
        row = frontier._row(pick)
        assert b == pytest.approx(float(frontier.backward_peak[row]), rel=1e-12)
        assert f == pytest.approx(float(frontier.forward_peak[row]), rel=1e-12)
        assert flops / cal.original_flops + 1 == pytest.approx(float(frontier.flops[row]), rel=1e-12)


def test_a_model_cut_into_many_parts_is_planned_on_the_frontier(monkeypatch):
    """DLA's 16 parts made 854 million combinations, MobileNetV3's and GhostNet's 13 some 20 million:
    each a row of tensors. Past MAX_SPACE only the peak/FLOPs frontier is kept, and the plan is
    verified as any other."""
    import revconvert.memory.plan as plan_module

    built = []
    frontier = plan_module._frontier
    monkeypatch.setattr(plan_module, "_frontier", lambda space: built.append(1) or frontier(space))
    model = _many_parts(7)
    original = revconvert.memory_profile(model, (3, 8, 8), 2).original
    budget = int(0.8 * (original.peak_bytes - original.param_bytes))
    plan = revconvert.plan_memory(model, budget, input_size=(3, 8, 8), batch_size=2)
    assert built and len(plan.parts) == 15
    assert plan.fits and plan.peak_bytes <= budget
    converted = revconvert.convert(model, (2, 3, 8, 8), config=plan.config)
    measured = revconvert.measure_memory(converted, torch.randn(2, 3, 8, 8))
    assert measured.peak_bytes - measured.param_bytes == pytest.approx(plan.peak_bytes, rel=0.02)
