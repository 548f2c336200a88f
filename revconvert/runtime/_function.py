"""The custom autograd Function behind ReversibleSegment's memory-saving backward.

Forward: run every coupling under no_grad, keep only the segment's output (plus, outside autograd's
saved tensors, the RNG and autocast state needed to replay F and G). Backward: Algorithm 1 of RevNet
(Gomez et al., 2017): walk the couplings from last to first, recompute G(y1) to reconstruct x2,
recompute F(x2) to reconstruct x1, and back-propagate through that coupling alone before moving on.
Parameter gradients are returned from ``backward`` so autograd accumulates them (DDP's hooks fire).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._state import (
    AutocastState,
    RNGState,
    capture_autocast,
    capture_rng,
    cuda_devices_of,
    preserve_running_stats,
    replay_autocast,
    replay_rng,
)
from ._keep import KeepPolicy, Record, Replay
from .coupling import ReversibleCoupling

DOUBLE_BACKWARD_MESSAGE = (
    "ReversibleSegment does not support create_graph=True (double backward): its backward recomputes "
    "activations outside the autograd graph. Run the model under revconvert.ordinary_autograd() or set "
    "segment.use_reversible_backward = False for higher-order gradients."
)


@dataclass(frozen=True)
class Plan:
    """What one application of the Function runs: the couplings and where their parameters sit.

    ``params`` is the deduplicated list handed to the Function as inputs; ``f_index[k]`` and
    ``g_index[k]`` are the positions of coupling k's F and G parameters in it.
    """

    couplings: tuple[ReversibleCoupling, ...]
    dim: int
    params: tuple[nn.Parameter, ...]
    f_index: tuple[tuple[int, ...], ...]
    g_index: tuple[tuple[int, ...], ...]


def make_plan(couplings: Sequence[ReversibleCoupling], dim: int) -> Plan:
    """Collect the couplings' parameters once each (a parameter shared by two modules appears once)."""
    params: list[nn.Parameter] = []
    position: dict[int, int] = {}

    def indices(module: nn.Module) -> tuple[int, ...]:
        out = []
        for p in module.parameters():
            if id(p) not in position:
                position[id(p)] = len(params)
                params.append(p)
            out.append(position[id(p)])
        return tuple(dict.fromkeys(out))

    f_index, g_index = [], []
    for coupling in couplings:
        f_index.append(indices(coupling.F))
        g_index.append(indices(coupling.G))
    return Plan(tuple(couplings), dim, tuple(params), tuple(f_index), tuple(g_index))


def _version(t: torch.Tensor) -> int | None:
    # Inference tensors carry no version counter.
    return None if t.is_inference() else t._version


def _call_checked(fn: nn.Module, arg: torch.Tensor, where: str) -> torch.Tensor:
    """Call ``fn(arg)`` and refuse in-place changes to ``arg``, which would corrupt the reconstruction."""
    before = _version(arg)
    out = fn(arg)
    if before is not None and _version(arg) != before:
        raise RuntimeError(
            f"ReversibleSegment: {where} modified its input in place (e.g. ReLU(inplace=True) as its first "
            "layer). Reversible couplings need F and G to leave their input untouched; use inplace=False "
            "for the first layer."
        )
    return out


def _non_leaf(t: torch.Tensor) -> torch.Tensor:
    """An alias of ``t`` with a grad_fn when ``t`` requires grad.

    Module hooks that watch their inputs' gradients (ModuleTracker, hence FlopCounterMode) cannot
    handle a leaf input inside ``torch.autograd.grad``; F and G see a view instead, as they do in the
    ordinary forward, where their inputs are chunks of the segment input.
    """
    return t.view_as(t) if t.requires_grad else t


def _vjp(
    output: torch.Tensor, inputs: Sequence[torch.Tensor], grad: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    if not inputs or not output.requires_grad:
        return (None,) * len(inputs)
    # Ordinary autograd casts an incoming gradient to its output's dtype (autocast mixes dtypes).
    return torch.autograd.grad(output, inputs, grad.to(output.dtype), allow_unused=True)


@contextlib.contextmanager
def _recording(policy: KeepPolicy | None) -> Iterator[Record | None]:
    if policy is None:
        yield None
        return
    with Record(policy) as rec:
        yield rec


@dataclass(frozen=True)
class _KeptSpan:
    """Where F's or G's kept outputs sit in the saved tensors, and the policy that chose them."""

    policy: KeepPolicy
    start: int
    stop: int
    signatures: list


@contextlib.contextmanager
def _replaying(kept: list[torch.Tensor], span: _KeptSpan | None, where: str) -> Iterator[None]:
    """Replay F's or G's kept outputs under the forward's policy."""
    if span is None:
        yield
        return
    with Replay(span.policy, kept[span.start:span.stop], span.signatures, where) as rep:
        yield
    rep.check_done()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class ReversibleFunction(torch.autograd.Function):
    """``y = segment(x)`` storing only ``y``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: Plan, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Detach before chunking: views of a Function input made here would require grad without a
        # grad_fn, which breaks tools that hook module outputs (torch.utils.module_tracker).
        x = x.detach()
        cuda_devices = cuda_devices_of((x, *params))
        rng: list[tuple[RNGState, RNGState]] = []
        kept: list[torch.Tensor] = []
        kept_at: list[tuple[_KeptSpan | None, _KeptSpan | None]] = []  # coupling k: (F's, G's)
        x1, x2 = x.chunk(2, plan.dim)
        for k, coupling in enumerate(plan.couplings):
            policy = coupling.keep
            rng_f = capture_rng(cuda_devices)
            with _recording(policy) as rec_f:
                y1 = x1 + _call_checked(coupling.F, x2, f"couplings[{k}].F")
            rng_g = capture_rng(cuda_devices)
            with _recording(policy) as rec_g:
                y2 = x2 + _call_checked(coupling.G, y1, f"couplings[{k}].G")
            rng.append((rng_f, rng_g))
            spans = []
            for rec in (rec_f, rec_g):
                spans.append(None if rec is None else
                             _KeptSpan(policy, len(kept), len(kept) + len(rec.kept), rec.signatures))
                kept += [] if rec is None else rec.kept
            kept_at.append((spans[0], spans[1]))
            x1, x2 = y1, y2
        y = torch.cat((x1, x2), plan.dim)
        ctx.save_for_backward(y, *kept)
        ctx.kept_at = kept_at
        ctx.plan = plan
        ctx.rng = rng
        ctx.autocast = capture_autocast()
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        plan: Plan = ctx.plan
        autocast: AutocastState = ctx.autocast
        needs = ctx.needs_input_grad
        needs_param = [needs[2 + i] for i in range(len(plan.params))]
        # chain[k]: does anything upstream of coupling k (its input or earlier parameters) need a grad?
        chain, upstream = [], needs[1]
        for k in range(len(plan.couplings)):
            chain.append(upstream)
            upstream = upstream or any(needs_param[i] for i in plan.f_index[k] + plan.g_index[k])

        y, *kept = ctx.saved_tensors
        y1, y2 = y.detach().chunk(2, plan.dim)
        gy1, gy2 = grad_y.chunk(2, plan.dim)
        param_grads: list[torch.Tensor | None] = [None] * len(plan.params)

        for k in reversed(range(len(plan.couplings))):
            coupling = plan.couplings[k]
            rng_f, rng_g = ctx.rng[k]
            f_params = [i for i in plan.f_index[k] if needs_param[i]]
            g_params = [i for i in plan.g_index[k] if needs_param[i]]
            need_f = chain[k] or bool(f_params)
            kept_f, kept_g = ctx.kept_at[k]

            # G: reconstruct x2 = y2 - G(y1) and back-propagate dy2 through G.
            with preserve_running_stats(coupling.G), replay_rng(rng_g), replay_autocast(autocast):
                z1 = y1.detach().requires_grad_(need_f)
                with torch.enable_grad(), _replaying(kept, kept_g, f"couplings[{k}].G"):
                    g = _call_checked(coupling.G, _non_leaf(z1), f"couplings[{k}].G")
                x2 = y2 - g.detach()
                grads = _vjp(g, ([z1] if need_f else []) + [plan.params[i] for i in g_params], gy2)
            del g, z1  # frees G's graph before F is recomputed
            if need_f:
                gy1 = _add(gy1, grads[0])
                grads = grads[1:]
            for i, grad in zip(g_params, grads):
                param_grads[i] = _add(param_grads[i], grad)
            if not need_f:
                break

            # F: reconstruct x1 = y1 - F(x2) and back-propagate dy1 (now total) through F.
            with preserve_running_stats(coupling.F), replay_rng(rng_f), replay_autocast(autocast):
                z2 = x2.detach().requires_grad_(chain[k])
                with torch.enable_grad(), _replaying(kept, kept_f, f"couplings[{k}].F"):
                    f = _call_checked(coupling.F, _non_leaf(z2), f"couplings[{k}].F")
                x1 = y1 - f.detach()
                grads = _vjp(f, ([z2] if chain[k] else []) + [plan.params[i] for i in f_params], gy1)
            del f, z2
            if chain[k]:
                gy2 = _add(gy2, grads[0])
                grads = grads[1:]
            for i, grad in zip(f_params, grads):
                param_grads[i] = _add(param_grads[i], grad)
            if not chain[k]:
                break
            y1, y2 = x1, x2

        grad_x = torch.cat((gy1, gy2), plan.dim) if needs[1] else None
        return (None, grad_x, *param_grads)
