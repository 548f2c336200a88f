"""``plan_memory``: fit a training step into a memory budget at the least extra compute.

What decides whether a batch fits is the **peak** of a training step (saved activations, the
backward's recomputation transients, gradients, optimizer state), not the bytes saved for backward.
The planner decides, per part of the model (see :mod:`revconvert.memory.plan_costs`): each run of
eligible blocks stays ordinary, is checkpointed (each block in one region or in two), or becomes a
reversible segment whose last ``m`` couplings keep their outputs; each stored part is checkpointed
in one region, in two, or not. The objective is the least
training-step FLOPs whose peak fits the budget.

How (the heuristic parts are marked):

1. **Measure** per-part costs once: fifteen whole-step fake-tensor estimates in which every stored part
   shares one class and every run another (:data:`~revconvert.memory.plan_costs.CALIBRATIONS`), plus
   forward FLOPs per part and what keeping saves per coupling, on meta tensors.
2. **Compose** a peak model: the peak is the largest of the forward's peak, each part's backward
   (live bytes when it starts, i.e. what the parts up to it saved plus the gradients of the parts
   after it, plus how far its own backward rises: a checkpointed part's or a coupling's
   recomputation) and the optimizer step. A part's numbers come from the estimate whose classes
   match it and its neighbours best (*heuristic*: neighbours with different classes are not all
   measured together). Keeping in ``m`` of ``n`` couplings is interpolated (*heuristic*), and the
   kept couplings are always the last ``m`` of a run (*heuristic*: their outputs are freed first).
3. **Search** the whole product of choices (vectorised); where it exceeds
   :data:`MAX_CANDIDATES`, the keep counts of the longest runs are thinned to a grid (*heuristic*).
   Where even that leaves more than :data:`MAX_SPACE`, only the combinations on the peak/FLOPs
   frontier are searched, found by dynamic programming along the chain of units (:func:`_frontier`;
   *heuristic* past a grid of bytes and a cap of states).
4. **Verify** the cheapest candidate whose modelled peak fits with one fake-tensor estimate of its
   very ``ConvertConfig``; the search runs again (a few rounds) after what the verification
   taught: a plan that keeps outputs and overshoots raises the modelled peak of every plan sharing
   one of its keep choices by its error (*heuristic*: kept outputs are where the model errs), any
   other overshoot lowers the target by as much. If nothing fits, the cheapest candidate at each of
   the few least modelled peak levels is verified, and the least verified peak is returned.
   ``plan.peak_bytes`` is the verified estimate, ``plan.flops`` the FLOPs counted on the planned
   model, never the composed numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..analysis.hooks import no_global_hooks
from ..analysis.tracing import model_name, unwrap_compiled
from ..passes.convert import ConvertConfig
from .estimate import TRACE_OPTIONS, _check_device, _check_dtype, _check_input_size, _estimate
from .optim import optimizer_spec
from .plan_costs import (CALIBRATIONS, RUN, STORED, Calibration, Choice, Unit, UnitSample,
                         calibration_choices, find_units, forward_flops, keep_costs, realise, step_flops,
                         unit_grad_bytes, unit_samples)
from .plan_report import MemoryPlan, PlanPart, parse_bytes
from .report import MemoryBreakdown
from .step import StepTimeline

__all__ = ["plan_memory", "MAX_CANDIDATES"]

MAX_CANDIDATES = 500_000
"""Above this many combinations the keep counts of the longest runs are thinned to a grid."""
MAX_SPACE = 4 * MAX_CANDIDATES
"""The most combinations enumerated when thinning cannot reach ``MAX_CANDIDATES``; past it, only the
frontier's (:func:`_frontier`)."""

_VERIFY_ROUNDS = 6   # rounds to find a first verified fit
_CHEAPER_TRIES = 3   # cheaper candidates verified after it
_LEAST_TRIES = 3     # least modelled peak levels verified when nothing fits
_FIELDS = 7          # saved, grad, base, rise, opened, forward_base, forward_rise
_MARGIN = 0.02       # least relative model error assumed when looking for cheaper candidates


def plan_memory(
    model: nn.Module,
    budget: int | float | str,
    *,
    input_size: Sequence[int] | int = (3, 224, 224),
    batch_size: int | None = 1,
    optimizer: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    max_flops_ratio: float | None = None,
    keep: str = "spatial-convs",
    pair_blocks: bool = False,
    **trace_options: Any,
) -> MemoryPlan:
    """Choose the conversion whose training step fits ``budget`` at the least step FLOPs.

    "Peak" is what a training step allocates beyond the parameters (``measure_memory``'s
    ``peak_bytes - param_bytes``): activations, gradients, optimizer state and step, recomputation
    transients, the input batch and buffers. The decisions are per part: each run of eligible blocks
    stays ordinary, is checkpointed (each block in one region or two), or becomes reversible with its
    last ``m`` couplings keeping their outputs; each stored part (stem, projection blocks) is
    checkpointed in one region, in two (``ConvertConfig.checkpoint_split``), or not. Estimated on
    fake and meta tensors; the caller's model is not touched.

    Args:
        model: the model to plan for.
        budget: bytes, or a string such as ``"24GiB"`` / ``"1.5GB"``.
        input_size: one sample's shape ``(C, H, W)``, or an int ``S`` for ``(3, S, S)``.
        batch_size: the batch to fit; None finds the largest batch that fits with step FLOPs at most
            ``max_flops_ratio`` times the original's.
        optimizer: None, "sgd", "sgd-momentum", "adam" or "adamw" (its state and step count).
        dtype: parameter and input dtype.
        device: device to plan for (default: where the model's parameters are).
        max_flops_ratio: the most step FLOPs a plan may cost, over the original's (required with
            ``batch_size=None``; otherwise plans above it are not considered).
        keep: the outputs a kept coupling keeps (``ReversibleCoupling(keep=...)``).
        pair_blocks: plan for couplings of two blocks each (``ConvertConfig(pair_blocks=True)``: half
            the layers, faster where kernel launches set the pace); ``plan.config`` then has it set,
            and "the last ``m`` couplings keep" counts those couplings.
        **trace_options: tracing options (``leaf_modules=...``).

    Returns:
        A :class:`MemoryPlan`; ``plan.config`` realises it: ``revconvert.convert(model, example,
        config=plan.config)``. If nothing fits, the plan with the least verified peak among those
        checked (the model's few least peaks and the near fits tried), and ``plan.fits`` is False.

    Raises:
        ValueError: bad budget, sizes, dtype, optimizer or ``max_flops_ratio``.

    Example:
        >>> plan = revconvert.plan_memory(torchvision.models.resnet50(), "6GiB", input_size=224,
        ...                               batch_size=64, optimizer="adam")
        >>> print(plan)
        >>> converted = revconvert.convert(model, (64, 3, 224, 224), config=plan.config)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget_bytes = parse_bytes(budget)
    model = unwrap_compiled(model)  # torch.compile(model): plan the module it wraps
    shape = _check_input_size(input_size, model)
    dtype = _check_dtype(dtype)
    optimizer_spec(optimizer)
    device = _check_device(model, device)
    unknown = sorted(set(trace_options) - set(TRACE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; plan_memory passes only "
                         f"tracing options on: {', '.join(TRACE_OPTIONS)}")
    if not isinstance(pair_blocks, bool):
        raise TypeError(f"pair_blocks must be True or False, got {pair_blocks!r}")
    if max_flops_ratio is not None and (isinstance(max_flops_ratio, bool) or
                                        not isinstance(max_flops_ratio, (int, float)) or max_flops_ratio < 1):
        raise ValueError(f"max_flops_ratio must be a number >= 1 (e.g. 1.2: at most 20% more step FLOPs), "
                         f"got {max_flops_ratio!r}")
    if batch_size is None:
        if max_flops_ratio is None:
            raise ValueError("batch_size=None finds the largest batch within max_flops_ratio; give "
                             "max_flops_ratio (e.g. 1.2)")
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    with no_global_hooks():  # its steps run on fake and meta tensors: no hook of the caller's may see them
        planner = _Planner(model, shape, dtype, optimizer, device, keep, trace_options, pair_blocks)
        try:
            if batch_size is None:
                return planner.largest_batch(budget_bytes, float(max_flops_ratio))
            return planner.plan(budget_bytes, batch_size, max_flops_ratio)
        finally:
            # The estimates' fx graphs are cyclic: one full collection here releases them all. A
            # collection after each estimate cost a fifth of a plan's time for the same peak memory.
            del planner
            gc.collect()


class _Planner:
    def __init__(self, model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, optimizer: str | None,
                 device: torch.device, keep: str, trace_options: dict[str, Any], pair_blocks: bool = False) -> None:
        self.model, self.shape, self.dtype, self.optimizer, self.device = model, shape, dtype, optimizer, device
        self.keep = keep
        self.trace_options = trace_options
        self.base = ConvertConfig(pair_blocks=pair_blocks, **trace_options)
        self.units = find_units(model, (2, *shape), trace_options, pairs=pair_blocks)

    # -- measuring ---------------------------------------------------------------------------------
    def estimate(self, config: ConvertConfig | None, batch: int,
                 timeline: StepTimeline | None = None) -> MemoryBreakdown:
        return _estimate(self.model, self.shape, batch, self.dtype, self.optimizer, self.device, config,
                         self.trace_options, timeline)

    def calibrate(self, batch: int) -> Calibration:
        example = (batch, *self.shape)
        samples: dict[str, dict[str, UnitSample]] = {}
        optimizer_offset = None
        original: MemoryBreakdown | None = None
        grads: dict[str, dict[str, int]] = {}  # class "P" (as in the original) / "V" (converted) -> unit -> bytes
        for label in ("A", "C", *(k for k in CALIBRATIONS if k not in ("A", "C"))):
            choices = calibration_choices(self.units, label)
            config = None if label == "A" else realise(self.units, choices, self.keep, self.base)
            timeline = StepTimeline()
            breakdown = self.estimate(config, batch, timeline)
            if label in ("A", "C"):
                grads["P" if label == "A" else "V"] = unit_grad_bytes(self.units, timeline)
            grad = {u.name: grads["V" if c.cls in ("V", "VK") else "P"][u.name] for u, c in zip(self.units, choices)}
            samples[label] = unit_samples(self.units, breakdown.segments, timeline, grad)
            if self.optimizer is not None:
                off = timeline.optimizer_peak - sum(s.grad for s in samples[label].values())
                optimizer_offset = off if optimizer_offset is None else max(optimizer_offset, off)
            if label == "A":
                original = breakdown
        assert original is not None
        converted = ConvertConfig(only=tuple(b for u in self.units if u.kind == RUN for b in u.blocks),
                                  pair_blocks=self.base.pair_blocks, **self.trace_options)
        keep_flops, keep_bytes = keep_costs(self.units, self.model, example, self.keep, self.trace_options)
        return Calibration(
            units=self.units, samples=samples, optimizer_offset=optimizer_offset,
            resident=original.buffer_bytes + original.optimizer_bytes + original.input_bytes,
            original_peak=original.peak_bytes - original.param_bytes,
            original_saved={u.name: samples["A"][u.name].saved for u in self.units},
            fwd_original=forward_flops(self.units, self.model, example, None, self.trace_options),
            fwd_converted=forward_flops(self.units, self.model, example, converted, self.trace_options),
            keep_saved_flops=keep_flops, keep_bytes=keep_bytes,
            original_flops=step_flops(self.model, example, None, self.trace_options),
            batch=batch, input_bytes=original.input_bytes, original_ops=original.step_ops)

    # -- planning ----------------------------------------------------------------------------------
    def plan(self, budget: int, batch: int, max_flops_ratio: float | None,
             calibration: Calibration | None = None) -> MemoryPlan:
        cal = calibration or self.calibrate(batch)
        space = _Space(cal, self.keep)
        verified: dict[tuple[int, ...], MemoryPlan] = {}

        def ok(plan: MemoryPlan) -> bool:
            return plan.fits and (max_flops_ratio is None or plan.flops_ratio <= max_flops_ratio + 1e-9)

        def check(pick: tuple[int, ...]) -> MemoryPlan:
            verified[pick] = self.verify(cal, space, pick, budget, batch)
            return verified[pick]

        # 1. the cheapest modelled fit, verified. An overshoot by a plan that keeps outputs raises the
        # modelled peak of the plans sharing its keep choices; any other lowers the target by as much.
        best, target, margin = None, float(budget), _MARGIN
        for _ in range(_VERIFY_ROUNDS):
            pick = space.cheapest(target, max_flops_ratio, exclude=set(verified))
            if pick is None:
                break
            plan = check(pick)
            margin = max(margin, min(0.1, 1.5 * abs(plan.peak_bytes - plan.model_peak_bytes) / budget))
            if ok(plan):
                best = plan
                break
            if not space.learn(pick, plan.peak_bytes - plan.model_peak_bytes):
                target -= plan.peak_bytes - budget
        if best is not None:
            # 2. cheaper candidates the model put just above the budget may fit: verify a few
            for _ in range(_CHEAPER_TRIES):
                pick = space.cheapest(budget * (1 + margin), best.flops_ratio - 1e-9, exclude=set(verified))
                if pick is None:
                    break
                plan = check(pick)
                if ok(plan) and plan.flops < best.flops:
                    best = plan
            return best
        # Nothing verified to fit: the cheapest plan at each of the model's few least peak levels
        # (within the FLOP limit when given) is verified too, since the model errs; the answer is the
        # least *verified* peak of every plan checked.
        level = None
        for _ in range(_LEAST_TRIES):
            pick = space.least_peak(max_flops_ratio, exclude=set(verified), above=level)
            if pick is None:
                break
            check(pick)
            level = space.expected_peak_of(pick)
        return min(verified.values(), key=lambda p: (p.peak_bytes, p.flops))

    def verify(self, cal: Calibration, space: _Space, pick: tuple[int, ...], budget: int,
               batch: int) -> MemoryPlan:
        choices = space.choices_of(pick)
        config = realise(self.units, choices, self.keep, self.base)
        breakdown = self.estimate(config, batch)
        flops = step_flops(self.model, (batch, *self.shape), config, self.trace_options)
        of = {alias: u.name for u in self.units for alias in u.aliases}
        saved = {u.name: 0 for u in self.units}
        for row in breakdown.segments:
            if row.name in of:
                saved[of[row.name]] += row.activation_bytes
        parts = [PlanPart(name=u.name, blocks=u.blocks, decision=c.label(u), saved_bytes=saved[u.name],
                          original_saved_bytes=cal.original_saved[u.name],
                          extra_flops=space.extra_flops(i, c) / cal.original_flops)
                 for i, (u, c) in enumerate(zip(self.units, choices))]
        return MemoryPlan(config=config, budget_bytes=budget, peak_bytes=breakdown.peak_bytes - breakdown.param_bytes,
                          original_peak_bytes=cal.original_peak, flops=flops, original_flops=cal.original_flops,
                          model_peak_bytes=int(space.peak_of(pick)), parts=parts, batch_size=batch,
                          input_size=self.shape, dtype=str(self.dtype).removeprefix("torch."),
                          optimizer=self.optimizer, model_name=model_name(self.model),
                          ops=breakdown.step_ops, original_ops=cal.original_ops)

    def largest_batch(self, budget: int, max_flops_ratio: float) -> MemoryPlan:
        """The largest batch whose plan fits within the FLOP limit.

        The batch is searched on the peak model, scaled from a calibration (activation-sized numbers
        grow with the batch, gradients and optimizer state do not); the model is re-calibrated at the
        batch it predicts, and the answer is checked with verified plans: the batch fits, and the
        next one does not (or the search steps down until one fits).
        """
        cal = self.calibrate(4)
        batch = self._model_largest(cal, budget, max_flops_ratio)
        cal = self.calibrate(batch)
        batch = self._model_largest(cal, budget, max_flops_ratio)
        fits = self._fitting_plan(cal, budget, batch, max_flops_ratio)
        if fits is not None:
            while True:  # step up while the next batch verifiably fits too
                bigger = self._fitting_plan(cal, budget, batch + 1, max_flops_ratio)
                if bigger is None:
                    return self._with_original(fits)
                fits, batch = bigger, batch + 1
        while batch > 1:  # step down, by the overshoot, until one fits
            plan = self.plan(budget, batch, max_flops_ratio, cal.scaled(batch))
            if plan.fits and plan.flops_ratio <= max_flops_ratio + 1e-9:
                return self._with_original(plan)
            batch = max(1, min(batch - 1, int(batch * budget / plan.peak_bytes)))
        return self._with_original(self.plan(budget, 1, max_flops_ratio))

    def _fitting_plan(self, cal: Calibration, budget: int, batch: int,
                      max_flops_ratio: float) -> MemoryPlan | None:
        plan = self.plan(budget, batch, max_flops_ratio, cal if batch == cal.batch else cal.scaled(batch))
        return plan if plan.fits and plan.flops_ratio <= max_flops_ratio + 1e-9 else None

    def _model_largest(self, cal: Calibration, budget: int, max_flops_ratio: float) -> int:
        """Largest batch whose least modelled peak within the FLOP limit fits (binary search)."""
        def fits(batch: int) -> bool:
            space = _Space(cal.scaled(batch), self.keep)
            pick = space.least_peak(max_flops_ratio, set())
            return pick is not None and space.peak_of(pick) <= budget
        lo, hi = 1, 2
        while fits(hi) and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _with_original(self, plan: MemoryPlan) -> MemoryPlan:
        """The plan with the original model's peak estimated at its batch (a scaled calibration only
        approximates it)."""
        original = self.estimate(None, plan.batch_size)
        return dataclasses.replace(plan, original_peak_bytes=original.peak_bytes - original.param_bytes)


def _options(units: Sequence[Unit]) -> tuple[list[list[Choice]], bool]:
    """Each unit's choices, and whether the whole product of them is searched.

    Where the product exceeds :data:`MAX_CANDIDATES`, the keep counts of the longest runs are thinned
    to a coarser grid until it does not (heuristic). Where even that leaves more than
    :data:`MAX_SPACE` combinations (a model cut into many short parts: MobileNetV3, EfficientNet-B3,
    GhostNet, DLA), every choice stays and the search keeps only the combinations on the peak/FLOPs
    frontier (:func:`_frontier`) instead of all of them: each combination is a row of tensors."""
    full = []
    for u in units:
        opts = [Choice(c) for c in u.classes() if c != "VK"]
        if u.kind == RUN:
            opts += [Choice("V", m) for m in range(1, len(u.couplings) + 1)]
        full.append(opts)
    options = list(full)
    while math.prod(len(o) for o in options) > MAX_CANDIDATES:
        i = max(range(len(options)), key=lambda k: len(options[k]))
        opts = options[i]
        keeps = [c for c in opts if c.cls == "V" and c.keep]
        if len(keeps) < 3:
            break
        thinned = keeps[1::2] if keeps[-1] in keeps[1::2] else keeps[1::2] + [keeps[-1]]
        options[i] = [c for c in opts if not (c.cls == "V" and c.keep)] + thinned
    if math.prod(len(o) for o in options) > MAX_SPACE:
        return full, False
    return options, True


class _Space:
    """Every combination of choices (one row each), with its composed peak and FLOPs ratio (tensors)."""

    def __init__(self, cal: Calibration, keep: str) -> None:
        self.cal = cal
        self.options, exhaustive = _options(cal.units)
        sizes = [len(o) for o in self.options]
        self.sizes = sizes
        self._rows: dict[tuple[int, ...], int] | None = None  # row of each pick, where not every pick is a row
        if exhaustive:
            self.index = torch.stack(torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij"),
                                     dim=-1).reshape(-1, len(sizes))
        else:
            picks = [state[5] for state in _frontier(self)]
            self.index = torch.tensor(picks, dtype=torch.long).reshape(-1, len(sizes))
            self._rows = {pick: r for r, pick in enumerate(picks)}
        self._compose()
        self.correction = torch.zeros_like(self.peak)  # what verifications taught (see learn)

    # a unit's numbers under one choice, given its neighbours' classes
    def _sample(self, i: int, prev: Choice | None, cur: Choice, nxt: Choice | None) -> list[float]:
        cal, units = self.cal, self.cal.units
        def pick(cls: str) -> UnitSample:
            best, score = None, -1
            for label, (s_cls, r_cls) in CALIBRATIONS.items():
                def cls_of(u: Unit) -> str:
                    return r_cls if u.kind == RUN else s_cls if u.kind == STORED else "P"
                if cls_of(units[i]) != cls:
                    continue
                sc = (2 if prev is not None and cls_of(units[i - 1]) == _base(prev) else 0) + \
                     (1 if nxt is not None and cls_of(units[i + 1]) == _base(nxt) else 0)
                if sc > score:
                    best, score = cal.samples[label][units[i].name], sc
            assert best is not None
            return best
        def vec(s: UnitSample) -> list[float]:
            return [s.saved, s.grad, s.base, s.rise, float(s.opened), s.forward_base, s.forward_rise]
        if cur.cls == "V" and cur.keep:
            n = len(units[i].couplings)
            lo, hi = vec(pick("V")), vec(pick("VK"))
            kept = sum(self.cal.keep_bytes.get(units[i].name, [0])[n - cur.keep:])
            allk = sum(self.cal.keep_bytes.get(units[i].name, [0])) or 1
            w = kept / allk if allk else cur.keep / n
            mixed = [a + (b - a) * w for a, b in zip(lo, hi)]
            mixed[4] = max(lo[4], hi[4])
            return mixed
        return vec(pick(cur.cls))

    def extra_flops(self, i: int, c: Choice) -> float:
        cal, u = self.cal, self.cal.units[i]
        if c.cls in ("K", "K2"):
            return cal.fwd_original[u.name]
        if c.cls == "V":
            saved = cal.keep_saved_flops.get(u.name, [])
            kept = sum(saved[len(saved) - c.keep:]) if c.keep else 0
            return 4 * cal.fwd_converted[u.name] - 3 * cal.fwd_original[u.name] - kept
        return 0.0

    def _compose(self) -> None:
        cal, units, idx = self.cal, self.cal.units, self.index
        n, rows = len(units), len(self.index)
        data = torch.zeros((n, rows, _FIELDS), dtype=torch.float64)
        for i in range(n):
            prev_opts = self.options[i - 1] if i > 0 else [None]
            next_opts = self.options[i + 1] if i + 1 < n else [None]
            table = torch.zeros((len(prev_opts), len(self.options[i]), len(next_opts), _FIELDS), dtype=torch.float64)
            for (a, p), (b, c), (d, q) in itertools.product(enumerate(prev_opts), enumerate(self.options[i]),
                                                           enumerate(next_opts)):
                table[a, b, d] = torch.tensor(self._sample(i, p, c, q), dtype=torch.float64)
            pa = idx[:, i - 1] if i > 0 else torch.zeros(rows, dtype=torch.long)
            na = idx[:, i + 1] if i + 1 < n else torch.zeros(rows, dtype=torch.long)
            data[i] = table[pa, idx[:, i], na]
        saved, grad, base, rise, opened, fbase, frise = (data[..., k] for k in range(_FIELDS))
        prefix = torch.cumsum(saved, dim=0)
        suffix = grad.sum(dim=0)[None, :] - torch.cumsum(grad, dim=0)
        backward = torch.where(opened > 0, base + prefix + suffix + rise,
                               torch.tensor(float("-inf"), dtype=torch.float64)).amax(dim=0)
        forward = (fbase + prefix - saved + frise).amax(dim=0)
        self.backward_peak, self.forward_peak = backward, forward  # for the frontier's tests
        peak = torch.maximum(backward, forward)
        if cal.optimizer_offset is not None:
            peak = torch.maximum(peak, cal.optimizer_offset + grad.sum(dim=0))
        self.peak = torch.round(peak + cal.resident)
        self.activation = prefix[-1]  # grows with the batch; used by the batch search
        flops = torch.zeros(rows, dtype=torch.float64)
        for i in range(n):
            per = torch.tensor([self.extra_flops(i, c) for c in self.options[i]], dtype=torch.float64)
            flops += per[idx[:, i]]
        self.flops = (cal.original_flops + flops) / cal.original_flops

    def choices_of(self, pick: tuple[int, ...]) -> list[Choice]:
        return [self.options[i][k] for i, k in enumerate(pick)]

    def _row(self, pick: tuple[int, ...]) -> int:
        if self._rows is not None:
            return self._rows[pick]
        row = 0
        for k, size in zip(pick, self.sizes):
            row = row * size + k
        return row

    def peak_of(self, pick: tuple[int, ...]) -> float:
        """The composed model's peak of ``pick``, as composed (what a verification's error is of)."""
        return float(self.peak[self._row(pick)])

    def expected_peak_of(self, pick: tuple[int, ...]) -> float:
        """``peak_of(pick)`` with what verifications taught (:meth:`learn`): what the search compares."""
        return float(self._expected()[self._row(pick)])

    def _expected(self) -> torch.Tensor:
        return self.peak + self.correction

    def _allowed(self, max_flops_ratio: float | None, exclude: set[tuple[int, ...]]) -> torch.Tensor:
        ok = torch.ones(len(self.index), dtype=torch.bool)
        if max_flops_ratio is not None:
            ok &= self.flops <= max_flops_ratio + 1e-9
        for pick in exclude:
            if self._rows is None or pick in self._rows:
                ok[self._row(pick)] = False
        return ok

    def cheapest(self, target: float, max_flops_ratio: float | None,
                 exclude: set[tuple[int, ...]]) -> tuple[int, ...] | None:
        peak = self._expected()
        ok = self._allowed(max_flops_ratio, exclude) & (peak <= target)
        return self._first(ok, self.flops, peak)

    def least_peak(self, max_flops_ratio: float | None, exclude: set[tuple[int, ...]],
                   above: float | None = None) -> tuple[int, ...] | None:
        """The allowed row with the least expected peak (above ``above`` when given), then the least FLOPs."""
        peak = self._expected()
        ok = self._allowed(max_flops_ratio, exclude)
        if above is not None:
            ok &= peak > above
        return self._first(ok, peak, self.flops)

    def learn(self, pick: tuple[int, ...], error: float) -> bool:
        """Raise the modelled peak of every candidate sharing a keep choice with ``pick`` by ``error``
        (the verified peak less the modelled one), the least it may be underestimated by (heuristic).

        Kept outputs are where the composed model errs: keeping ``m`` of ``n`` is interpolated, and
        kept tensors live across the parts the calibrations measured apart; plans without them come
        out exact. Returns False (nothing learned) when ``pick`` keeps nothing or was not underestimated.
        """
        kept = [(i, k) for i, k in enumerate(pick) if self.options[i][k].cls == "V" and self.options[i][k].keep]
        if error <= 0 or not kept:
            return False
        shares = torch.zeros(len(self.index), dtype=torch.bool)
        for i, k in kept:
            shares |= self.index[:, i] == k
        self.correction = torch.where(shares, torch.clamp(self.correction, min=error), self.correction)
        return True

    def _first(self, ok: torch.Tensor, key: torch.Tensor, tie: torch.Tensor) -> tuple[int, ...] | None:
        """The allowed row with the least ``key``, then the least ``tie``."""
        if not bool(ok.any()):
            return None
        rows = torch.nonzero(ok).flatten()
        k = key[rows]
        near = rows[k <= k.min() + 1e-12 * max(1.0, float(k.min().abs()))]
        row = near[torch.argmin(tie[near])]
        return tuple(int(v) for v in self.index[row])


#: Frontier beginnings kept per last choice and the class before it (:func:`_frontier`; heuristic
#: beyond it): bounds the search's time and memory where a space is too large to enumerate
MAX_FRONTIER = 300
#: Resolution of the frontier's comparisons, as a fraction of the original step's peak
FRONTIER_GRID = 1e-3


def _frontier(space: _Space) -> list[tuple]:
    """The combinations of choices on the frontier of the composed peak and the FLOPs, by dynamic
    programming along the chain of units, for spaces too large to enumerate.

    The composed peak (``_Space._compose``) is the largest of a unit's backward term
    ``base + rise + P_j - G_j + G`` (``P_j``: bytes saved up to and with it, ``G_j``: gradient
    bytes up to it, ``G``: all gradient bytes), a unit's forward term
    ``forward_base + forward_rise + P_(j-1)`` and the optimizer step's ``offset + G``. Walking the
    units in order, a beginning of a combination is summed up by four numbers in which the peak of
    any completion does not decrease: the largest backward term so far with ``G_j`` for ``G``,
    ``P_j``, the largest forward term so far, and ``G_j``. A unit's numbers depend on its own choice
    and its neighbours' classes, so of two beginnings whose last choice and the class before it are
    the same, one no worse in those four numbers and in FLOPs leaves the other nothing, and it is
    dropped. The comparison is on a grid of :data:`FRONTIER_GRID` of the original step's peak
    (heuristic: a beginning better by less is taken as equal), and at most :data:`MAX_FRONTIER`
    beginnings per last choice and class are kept, spread over their FLOPs (heuristic).

    Returns the completed combinations as ``(backward, saved, forward, gradients, FLOPs, picks)``: the
    composition's backward and forward peaks, the saved and gradient bytes, and the extra FLOPs."""
    n = len(space.options)
    grid = max(1.0, space.cal.original_peak * FRONTIER_GRID)
    samples: dict[tuple, list[float]] = {}

    def sample(i: int, prev: Choice | None, cur: int, nxt: Choice | None) -> list[float]:
        key = (i, None if prev is None else _base(prev), cur, None if nxt is None else _base(nxt))
        if key not in samples:
            samples[key] = space._sample(i, prev, space.options[i][cur], nxt)
        return samples[key]

    ninf = float("-inf")
    # a beginning: (backward so far + G_j, P_j, forward so far, G_j, FLOPs, picks), by the class before
    # its last choice and its last choice; closing unit i - 1 needs unit i's choice
    states: dict[tuple, list[tuple]] = {
        (None, k): [(ninf, 0.0, ninf, 0.0, space.extra_flops(0, c), (k,))] for k, c in enumerate(space.options[0])}
    for i in range(1, n + 1):
        grown: dict[tuple, list[tuple]] = {}
        for (prev, cur), group in states.items():
            prev_choice = None if prev is None else Choice(*prev)
            for nxt in (range(len(space.options[i])) if i < n else [None]):
                nxt_choice = None if nxt is None else space.options[i][nxt]
                saved, grad, base, rise, opened, fbase, frise = sample(i - 1, prev_choice, cur, nxt_choice)
                extra = 0.0 if nxt_choice is None else space.extra_flops(i, nxt_choice)
                here = space.options[i - 1][cur]
                out = grown.setdefault(((here.cls, min(here.keep, 1)), nxt), [])
                for b, p, f, g, flops, picks in group:
                    f = max(f, fbase + frise + p)
                    p, g, b = p + saved, g + grad, b + grad
                    if opened > 0:
                        b = max(b, base + rise + p)
                    out.append((b, p, f, g, flops + extra, picks if nxt is None else picks + (nxt,)))
        states = {key: _pareto(group, grid) for key, group in grown.items()}
    return [state for group in states.values() for state in group]


def _pareto(states: list[tuple], grid: float) -> list[tuple]:
    """The states that no other is at most in FLOPs and in each of the four byte numbers (compared on
    ``grid``); beyond :data:`MAX_FRONTIER` of them, that many spread evenly over their FLOPs."""
    def cell(v: float) -> float:
        return v if v == float("-inf") else math.floor(v / grid)
    keyed = sorted(((s[4], cell(s[0]), cell(s[1]), cell(s[2]), cell(s[3])), s) for s in states)
    kept: list[tuple] = []
    marks: list[tuple] = []
    for (flops, b, p, f, g), s in keyed:
        if not any(m[0] <= b and m[1] <= p and m[2] <= f and m[3] <= g for m in marks):
            kept.append(s)
            marks.append((b, p, f, g))
    if len(kept) > MAX_FRONTIER:
        step = (len(kept) - 1) / (MAX_FRONTIER - 1)
        kept = [kept[round(k * step)] for k in range(MAX_FRONTIER)]
    return kept


def _base(c: Choice) -> str:
    return "VK" if c.cls == "V" and c.keep else c.cls
