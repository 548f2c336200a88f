"""The custom autograd Function behind ReversibleSegment's memory-saving backward.

Forward: run every coupling under no_grad, keep only the segment's output (plus, outside autograd's
saved tensors, the RNG and autocast state needed to replay F and G). Backward: Algorithm 1 of RevNet
(Gomez et al., 2017): walk the couplings from last to first, recompute G(y1) to reconstruct x2,
recompute F(x2) to reconstruct x1, and back-propagate through that coupling alone before moving on.
Parameter gradients are returned from ``backward`` so autograd accumulates them (DDP's hooks fire).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._direct import Casts, DirectSequential, ForwardBatch, autocast_dtype, cast_params, direct_call
from ._fused import FusedCoupling, fused_coupling
from ._keep import Kept, KeepPolicy, kept_modules, kept_thresholds, recording, replaying
from ._state import (
    AutocastState,
    RecomputeNeeds,
    RNGState,
    autocast_as,
    capture_autocast,
    capture_rng,
    frozen_running_stats,
    module_generation,
    recompute_needs,
    restored_buffers,
    restored_rng,
    set_rng,
)
from .coupling import ReversibleCoupling

DOUBLE_BACKWARD_MESSAGE = (
    "ReversibleSegment does not support create_graph=True (double backward): its backward recomputes "
    "activations outside the autograd graph. Run the model under revconvert.ordinary_autograd() or set "
    "segment.use_reversible_backward = False for higher-order gradients."
)


@dataclass(frozen=True)
class Plan:
    """What one application of the Function runs, worked out once per segment (see :func:`make_plan`).

    ``params`` is the deduplicated list handed to the Function as inputs; ``f_index[k]`` and
    ``g_index[k]`` are the positions of coupling k's F and G parameters in it. ``f_needs``/``g_needs``
    say what recomputing each F and G must take care of; ``norms`` are all their tracked norms.
    ``generation`` is :func:`module_generation` when the plan was made: the plan is stale once it moves.
    ``f_calls``/``g_calls`` are what runs F and G: the modules, their direct calls, or compiled versions;
    ``fused[k]``, where compiled couplings are possible, runs coupling k as a whole (see ``_fused``).
    ``direct`` are the direct calls (:class:`~._direct.DirectSequential`) the forward runs, one
    :class:`~._direct.ForwardBatch` for all of them.
    """

    couplings: tuple[ReversibleCoupling, ...]
    dim: int
    params: tuple[nn.Parameter, ...]
    f_index: tuple[tuple[int, ...], ...]
    g_index: tuple[tuple[int, ...], ...]
    f_needs: tuple[RecomputeNeeds, ...] = ()
    g_needs: tuple[RecomputeNeeds, ...] = ()
    norms: tuple[nn.Module, ...] = ()
    random: bool = False
    generation: int = -1
    f_calls: tuple = ()
    g_calls: tuple = ()
    compile_options: dict | None = None
    fused: tuple[FusedCoupling | None, ...] = ()
    direct: tuple[DirectSequential, ...] = ()
    _kept_modules: dict = field(default_factory=dict, compare=False, repr=False)
    _keeps_nothing: set = field(default_factory=set, compare=False, repr=False)

    def kept_modules(self, module: nn.Module, policy: KeepPolicy) -> tuple[nn.Module, ...] | None:
        """``kept_modules(policy, module)``, cached (a coupling's policy may change between steps)."""
        key = (id(module), id(policy))
        if key not in self._kept_modules:
            self._kept_modules[key] = kept_modules(policy, module)
        return self._kept_modules[key]


def check_compile_options(options: dict | None) -> None:
    """Refuse ``torch.compile`` options that capture CUDA graphs (``mode="reduce-overhead"`` or
    ``"max-autotune"``, ``options={"triton.cudagraphs": True}``) for F and G: a CUDA graph's outputs
    are overwritten by its next replay, and the segment hands the outputs of its compiled calls on
    (to the next coupling, and as parameter gradients to autograd), so a later step could change
    gradients still in use without any error."""
    if not options:
        return
    inductor = options.get("options") or {}
    if options.get("mode") in ("reduce-overhead", "max-autotune") or inductor.get("triton.cudagraphs"):
        raise ValueError(
            f"ReversibleSegment: compile={options!r} captures CUDA graphs, whose outputs the next replay "
            "overwrites; the segment passes its compiled calls' outputs on as activations and gradients. "
            "Use mode='max-autotune-no-cudagraphs' or the default mode.")


# Under torch.compile(model) dynamo would trace this (the segment's forward asks for its plan) and
# compile fragments of it, with the compiled calls made inside its trace running eagerly forever.
@torch.compiler.disable
def make_plan(couplings: Sequence[ReversibleCoupling], dim: int, compile_options: dict | None = None) -> Plan:
    """Collect the couplings' parameters once each (a parameter shared by two modules appears once)
    and what recomputing their F and G needs. With ``compile_options``, F and G run compiled (see
    :func:`compiled_call`)."""
    check_compile_options(compile_options)
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
        g_index.append(() if coupling.G is None else indices(coupling.G))
    f_needs = tuple(recompute_needs(c.F) for c in couplings)
    g_needs = tuple(_NOTHING if c.G is None else recompute_needs(c.G) for c in couplings)
    norms = tuple(dict.fromkeys(m for needs in f_needs + g_needs for m in needs.norms))
    random = any(n.random for n in f_needs + g_needs)
    f_calls = tuple(compiled_call(c.F, n, compile_options) for c, n in zip(couplings, f_needs))
    g_calls = tuple(None if c.G is None else compiled_call(c.G, n, compile_options)
                    for c, n in zip(couplings, g_needs))
    fused = tuple(_fused(c, fn, gn, compile_options) for c, fn, gn in zip(couplings, f_needs, g_needs))
    direct = tuple(call for f, g, done in zip(f_calls, g_calls, fused) if done is None
                   for call in (f, g) if type(call) is DirectSequential)
    return Plan(tuple(couplings), dim, tuple(params), tuple(f_index), tuple(g_index), f_needs, g_needs,
                norms, random, module_generation(), f_calls, g_calls, compile_options, fused, direct)


def _fused(coupling: ReversibleCoupling, f_needs: RecomputeNeeds, g_needs: RecomputeNeeds,
           options: dict | None) -> FusedCoupling | None:
    """Coupling ``coupling`` compiled as a whole, where ``options`` ask for compiling and it can be."""
    if options is None or f_needs.random or g_needs.random or f_needs.other_buffers or g_needs.other_buffers:
        return None
    g_call = None if coupling.G is None else direct_call(coupling.G)
    if coupling.G is not None and g_call is None:
        return None
    key = ("coupling", structure_key(coupling.F), None if coupling.G is None else structure_key(coupling.G),
           repr(sorted(options.items())))
    return fused_coupling(direct_call(coupling.F), g_call, key, options)


# What a half coupling's missing G needs.
_NOTHING = RecomputeNeeds(norms=(), other_buffers=(), random=False)

_RUNNERS: dict[tuple, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}


class CompiledCall:
    """``module(x)`` run through the compiled function its structure shares (see :func:`compiled_call`)."""

    __slots__ = ("module", "runner")

    def __init__(self, module: nn.Module, runner: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        self.module, self.runner = module, runner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.module, x)


def structure_key(module: nn.Module) -> tuple:
    """What a compiled graph of ``module`` depends on besides its tensors' values: every submodule's
    name, type and settings (``extra_repr``), and its own parameters' and buffers' shapes, dtypes and
    devices. Modules with the same key run the same graphs with their own parameters."""
    def tensors(items: Iterator[tuple[str, torch.Tensor | None]]) -> tuple:
        return tuple((n, None if t is None else (tuple(t.shape), t.dtype, t.device.type, t.requires_grad))
                     for n, t in items)
    return tuple((name, type(m), m.extra_repr(), tensors(iter(m._parameters.items())),
                  tensors(iter(m._buffers.items())))
                 for name, m in module.named_modules())


def _new_runner(index: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)
    # torch.compile keeps one cache per code object, limited to a few entries
    # (torch._dynamo.config.recompile_limit): a copy of the code per structure gives each its own.
    run.__code__ = run.__code__.replace(co_name=f"revconvert_structure_{index}")
    return run


def compiled_call(module: nn.Module, needs: RecomputeNeeds,
                  options: dict | None) -> nn.Module | CompiledCall | DirectSequential:
    """``module`` run through ``torch.compile(**options)``; without options (or for a module that
    draws random numbers) its direct call (:func:`~._direct.direct_call`) or the module itself.

    Modules of one structure (:func:`structure_key`: e.g. every F and G of a ResNet stage) share one
    compiled function that takes the module as an argument: torch.compile lifts its parameters and
    buffers to graph inputs, so resnet152's 92 F and G compile 4 structures (a few graphs each:
    forward, recomputation with grad, eval) instead of 92. Modules that draw random numbers stay
    eager: the recomputation must replay their draws exactly, which a compiled graph does not promise.
    """
    if options is None or needs.random:
        return direct_call(module) or module
    key = (structure_key(module), repr(sorted(options.items())))  # option values may not hash
    runner = _RUNNERS.get(key)
    if runner is None:
        runner = _RUNNERS[key] = torch.compile(_new_runner(len(_RUNNERS)), **options)
    return CompiledCall(module, runner)


def _version(t: torch.Tensor) -> int | None:
    # Inference tensors carry no version counter.
    return None if t.is_inference() else t._version


def _call_checked(fn: Callable, arg: torch.Tensor, k: int, name: str) -> Any:
    """Call ``fn(arg)`` and refuse in-place changes to ``arg``, which would corrupt the reconstruction."""
    before = _version(arg)
    out = fn(arg)
    if before is not None and _version(arg) != before:
        raise RuntimeError(
            f"ReversibleSegment: couplings[{k}].{name} modified its input in place (e.g. ReLU(inplace=True) "
            "as its first layer). Reversible couplings need F and G to leave their input untouched; use "
            "inplace=False for the first layer."
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
    if grad.dtype != output.dtype:
        grad = grad.to(output.dtype)
    if _run_backward is None:
        return torch.autograd.grad(output, inputs, grad, allow_unused=True)
    # The engine call behind torch.autograd.grad, without its Python argument checks (shapes, dtypes,
    # hooks for functorch), which cost more than a small kernel: here the arguments are ours.
    return _run_backward((output,), (grad,), False, False, tuple(inputs), True, False)


_run_backward = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)


def _plain_call(plan: Plan, arg: torch.Tensor, k: int, name: str, batch: ForwardBatch | None = None
                ) -> torch.Tensor:
    """Coupling k's F or G on ``arg`` as the plan runs it without kept outputs (directly, compiled,
    or the module); a direct call in the forward shares ``batch``."""
    call = (plan.f_calls if name == "F" else plan.g_calls)[k]
    if batch is not None and type(call) is DirectSequential:
        return _call_checked(lambda a: call(a, batch), arg, k, name)
    return _call_checked(call, arg, k, name)


def _keep_key(plan: Plan, k: int, name: str, arg: torch.Tensor) -> tuple:
    coupling = plan.couplings[k]
    return (name, k, id(coupling.keep), coupling.keep_small, arg.shape, arg.dtype, arg.device)


def _forward_one(plan: Plan, fn: nn.Module, arg: torch.Tensor, k: int, name: str,
                 kept: list[Kept | None], batch: ForwardBatch) -> torch.Tensor:
    policy = plan.couplings[k].keep
    # A call whose every candidate was too small to keep (MIN_KEPT_FLOPS), and whose recomputation
    # was checked to run the same kept calls, keeps nothing again at the same input size: it runs like
    # a call without keep (the plan, and this with it, is remade when modules change).
    if policy is None or _keep_key(plan, k, name, arg) in plan._keeps_nothing:
        kept.append(None)
        return _plain_call(plan, arg, k, name, batch)
    modules = plan.kept_modules(fn, policy)
    thresholds = kept_thresholds(policy, plan.couplings[k].keep_small)
    call = (plan.f_calls if name == "F" else plan.g_calls)[k]
    if modules is not None and type(call) is DirectSequential:
        # module-level keeping without the module calls (see DirectSequential.keeping)
        done = _call_checked(lambda a: call.keeping(a, modules, thresholds, batch), arg, k, name)
        if done is not None:
            kept.append(done[1])
            return done[0]
    with recording(policy, fn, modules, keep_small=plan.couplings[k].keep_small) as record:
        out = _call_checked(fn, arg, k, name)
    kept.append(record)
    return out


def _recompute_one(plan: Plan, fn: nn.Module, arg: torch.Tensor, k: int, name: str,
                   kept: Kept | None, policy: KeepPolicy | None) -> torch.Tensor:
    if kept is None:
        return _plain_call(plan, arg, k, name)
    modules = plan.kept_modules(fn, policy)
    with replaying(policy, fn, kept, f"couplings[{k}].{name}", modules):
        out = _call_checked(fn, arg, k, name)
    if modules is not None and not kept.saved():
        plan._keeps_nothing.add(_keep_key(plan, k, name, arg))
    return out


def _step_back(plan: Plan, k: int, name: str, fn: nn.Module, source: torch.Tensor, need_input: bool,
               params: Sequence[int], grad: torch.Tensor, kept: Kept | None, policy: KeepPolicy | None,
               rng: RNGState | None, casts: Casts | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Recompute ``fn`` (coupling k's F or G) on ``source`` and back-propagate ``grad`` through it.

    Returns its output, without history, and the gradients of its input (first, if ``need_input``)
    and of ``params``. Its graph is freed on return, before the next function is recomputed.
    ``casts``: its direct call's weights already cast for autocast (see :func:`_coupling_casts`).
    """
    if rng is not None:
        set_rng(rng)
    other_buffers = (plan.f_needs if name == "F" else plan.g_needs)[k].other_buffers
    call = (plan.f_calls if name == "F" else plan.g_calls)[k]
    if not other_buffers and type(call) is DirectSequential \
            and params == (plan.f_index if name == "F" else plan.g_index)[k] and len(params) == len(call.params):
        # Every parameter wanted, in module.parameters() order: no autograd graph needed (see _direct),
        # with the kept outputs handed back where the forward kept them at module level.
        modules = () if kept is None else plan.kept_modules(fn, policy)  # None: an op-level policy
        done = None if modules is None else call.vjp(source, grad, need_input, kept, modules, casts)
        if done is not None:
            if kept is not None and not kept.saved():
                plan._keeps_nothing.add(_keep_key(plan, k, name, source))
            out, grad_input, param_grads = done
            return out, ((grad_input,) if need_input else ()) + tuple(param_grads)
    z = source.detach().requires_grad_(need_input)
    with restored_buffers(other_buffers) if other_buffers else contextlib.nullcontext():
        out = _recompute_one(plan, fn, _non_leaf(z), k, name, kept, policy)
        grads = _vjp(out, ([z] if need_input else []) + [plan.params[i] for i in params], grad)
    return out.detach(), grads


def _coupling_casts(plan: Plan, k: int, device_type: str) -> tuple[Casts | None, Casts | None]:
    """Under autocast, coupling k's G and F weights cast together for their recomputations (one op
    instead of one per function, see :func:`~._direct.cast_params`), where both are back-propagated
    directly (:func:`_step_back`'s condition that does not depend on the call: no other buffers)."""
    g_call, f_call = plan.g_calls[k], plan.f_calls[k]
    amp = autocast_dtype(device_type)
    if amp is None or type(f_call) is not DirectSequential or plan.f_needs[k].other_buffers:
        return None, None
    if g_call is None:  # a half coupling
        return None, cast_params((f_call,), amp)[0]
    if type(g_call) is not DirectSequential or plan.g_needs[k].other_buffers:
        return None, None
    g_casts, f_casts = cast_params((g_call, f_call), amp)  # one op for both
    return g_casts, f_casts


def _accumulate(param_grads: list[torch.Tensor | None], indices: Sequence[int],
                grads: Sequence[torch.Tensor | None]) -> None:
    for i, grad in zip(indices, grads):
        param_grads[i] = _add(param_grads[i], grad)  # a parameter shared by F and G adds up


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass
class ForwardRecord:
    """What :func:`run_forward` leaves for :func:`run_backward` besides the output: per coupling the
    RNG states F and G drew from (None where they draw nothing), the kept outputs (``kept[2k]`` for
    F, ``kept[2k + 1]`` for G), the keep policies, the CUDA devices whose generators matter, and the
    autocast state."""

    rng: list[tuple[RNGState | None, RNGState | None]]
    kept: list[Kept | None]
    policies: list[KeepPolicy | None]
    devices: tuple[int, ...]
    autocast: AutocastState


def join_halves(x1: torch.Tensor, x2: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``cat((x1, x2), dim)`` laid out in memory as ``like``, the segment's input.

    A segment's input is often a view with other strides than a fresh tensor: a ViT's tokens come as
    a transposed view of the patch embedding, and a channels-last block's ``(N, H, W, C)`` as a
    permuted NCHW tensor. The original passed that layout on to what follows, and the kernels after
    it (a reduction, a matmul) sum in an order that depends on it. The same layout keeps the model's
    results the original's, bit for bit where the couplings are the identity, at the cost of one copy
    where the layouts differ."""
    y = torch.cat((x1, x2), dim)
    if y.stride() == like.stride():
        return y
    out = torch.empty_like(like)  # like's strides, where it is dense and non-overlapping
    return y if out.stride() == y.stride() else out.copy_(y)


def run_forward(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, ForwardRecord]:
    """The segment's forward without history: its output, and what the backward needs to replay it."""
    # Detach before chunking: views of a Function input made here would require grad without a
    # grad_fn, which breaks tools that hook module outputs (torch.utils.module_tracker).
    x = x.detach()
    devices = (x.device.index or 0,) if x.device.type == "cuda" else ()
    rng: list[tuple[RNGState | None, RNGState | None]] = []
    kept: list[Kept | None] = []  # coupling k: kept[2k] for F, kept[2k + 1] for G
    x1, x2 = x.chunk(2, plan.dim)
    batch = ForwardBatch(plan.direct, autocast_dtype(x.device.type))  # casts and counters, once
    try:
        for k, coupling in enumerate(plan.couplings):
            fused = plan.fused[k]
            if fused is not None and coupling.keep is None and fused.usable(x2):
                x1, x2 = fused.forward(x1, x2)
                kept += [None, None]
                rng.append((None, None))
                continue
            rng_f = capture_rng(devices) if plan.f_needs[k].random else None
            y1 = x1 + _forward_one(plan, coupling.F, x2, k, "F", kept, batch)
            rng_g = capture_rng(devices) if plan.g_needs[k].random else None
            if coupling.G is None:  # a half coupling
                y2 = x2
                kept.append(None)
            else:
                y2 = x2 + _forward_one(plan, coupling.G, y1, k, "G", kept, batch)
            rng.append((rng_f, rng_g))
            x1, x2 = y1, y2
    finally:
        batch.finish()
    del batch  # the casts
    y = join_halves(x1, x2, plan.dim, x)
    return y, ForwardRecord(rng, kept, [c.keep for c in plan.couplings], devices, capture_autocast())


def run_backward(plan: Plan, record: ForwardRecord, y: torch.Tensor, grad_y: torch.Tensor,
                 needs: Sequence[bool]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Algorithm 1 over the segment: the gradients of its input and of ``plan.params`` from its output
    ``y`` and the output's gradient. ``needs``: ``needs_input_grad`` of the input followed by the
    params'. The record's kept outputs must hold their saved tensors (:meth:`Kept.refill`)."""
    needs_param = needs[1:]
    # chain[k]: does anything upstream of coupling k (its input or earlier parameters) need a grad?
    chain, upstream = [], needs[0]
    for k in range(len(plan.couplings)):
        chain.append(upstream)
        upstream = upstream or any(needs_param[i] for i in plan.f_index[k] + plan.g_index[k])
    every_param = all(needs_param)  # the usual case: the index lists serve as they are
    kept = record.kept
    y1, y2 = y.detach().chunk(2, plan.dim)
    gy1, gy2 = grad_y.chunk(2, plan.dim)
    param_grads: list[torch.Tensor | None] = [None] * len(plan.params)

    # One state for the whole walk: the callers' generators put back once at the end, norm
    # statistics frozen, the forward's autocast state (entered only if it differs), grad mode on
    # (the recomputations record graphs; the arithmetic below runs on tensors without history).
    with restored_rng(record.devices, enabled=plan.random), frozen_running_stats(plan.norms), \
            autocast_as(record.autocast), torch.enable_grad():
        for k in reversed(range(len(plan.couplings))):
            coupling = plan.couplings[k]
            policy = record.policies[k]
            rng_f, rng_g = record.rng[k]
            f_params = plan.f_index[k] if every_param else [i for i in plan.f_index[k] if needs_param[i]]
            g_params = plan.g_index[k] if every_param else [i for i in plan.g_index[k] if needs_param[i]]
            need_f = chain[k] or bool(f_params)
            fused = plan.fused[k]
            if fused is not None and every_param and chain[k] and kept[2 * k] is None \
                    and kept[2 * k + 1] is None and fused.usable(y1):
                # G's step reconstructs x2 and adds G's input gradient to dy1; F's, x1 and dy2.
                if coupling.G is None:  # a half coupling
                    x2 = y2
                else:
                    x2, gy1, grads = fused.step("G", y1, y2, gy2, gy1)
                    _accumulate(param_grads, g_params, grads)
                y1, gy2, grads = fused.step("F", x2, y1, gy1, gy2)
                _accumulate(param_grads, f_params, grads)
                y2 = x2
                continue

            g_casts, f_casts = _coupling_casts(plan, k, y1.device.type) if need_f and every_param \
                else (None, None)  # else each function that runs directly casts its own
            if coupling.G is None:  # a half coupling: x2 = y2, and dy1 is already total
                x2 = y2
            else:
                # G: reconstruct x2 = y2 - G(y1) and back-propagate dy2 through G.
                g, grads = _step_back(plan, k, "G", coupling.G, y1, need_f, g_params, gy2,
                                      kept[2 * k + 1], policy, rng_g, g_casts)
                x2 = y2 - g
                del g  # G's output is not needed while F is recomputed
                if need_f:
                    gy1 = _add(gy1, grads[0])
                    grads = grads[1:]
                _accumulate(param_grads, g_params, grads)
            del g_casts
            if not need_f:
                break

            # F: reconstruct x1 = y1 - F(x2) and back-propagate dy1 (now total) through F.
            f, grads = _step_back(plan, k, "F", coupling.F, x2, chain[k], f_params, gy1, kept[2 * k],
                                  policy, rng_f, f_casts)
            del f_casts
            x1 = y1 - f
            del f
            if chain[k]:
                gy2 = _add(gy2, grads[0])
                grads = grads[1:]
            _accumulate(param_grads, f_params, grads)
            if not chain[k]:
                break
            y1, y2 = x1, x2

    grad_x = torch.cat((gy1, gy2), plan.dim) if needs[0] else None
    return grad_x, param_grads


class ReversibleFunction(torch.autograd.Function):
    """``y = segment(x)`` storing only ``y``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: Plan, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y, record = run_forward(plan, x)
        tensors = [t for kept in record.kept if kept is not None for t in kept.saved()]
        ctx.save_for_backward(y, *tensors)
        record.kept = [None if kept is None else kept.emptied() for kept in record.kept]
        ctx.plan = plan
        ctx.record = record
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        y, *tensors = ctx.saved_tensors
        record: ForwardRecord = ctx.record
        saved = iter(tensors)
        for kept in record.kept:  # hand each call its saved tensors back
            if kept is not None:
                kept.refill(saved)
        grad_x, param_grads = run_backward(ctx.plan, record, y, grad_y, ctx.needs_input_grad[1:])
        return (None, grad_x, *param_grads)
