"""The one recomputation-state helper: what the backward's recomputation must replay or leave alone.

Three pieces of state decide what a recomputed module computes besides its inputs: the random
generators (dropout masks), the autocast state (which ops run in reduced precision), and the running
statistics of normalisation layers (which the recomputation, run in train mode, would otherwise
update a second time). Reversible segments and checkpointed runs both use these helpers.

The helpers are built for the hot path: what a module needs is found once (:func:`recompute_needs`,
cached by the caller until a module registers or drops a submodule, parameter or buffer anywhere, see
:func:`module_generation`), and recomputing then costs no kernel launches of its own:

- norm layers run with momentum 0 and their batch counter set aside (:func:`frozen_running_stats`):
  the update inside the norm kernel leaves the statistics as they are, and no copy is made;
- random generator states are captured only for modules that draw random numbers, and the caller's
  state is saved once per backward (:func:`restored_rng`), not once per module;
- autocast is entered once per backward, and only when the backward's state differs from the
  forward's (:func:`autocast_as`).

Buffers that these cannot protect (functional batch norm inside a traced module, a custom layer's
statistics) fall back to a snapshot restored after the recomputation (:func:`restored_buffers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

# Device types whose autocast state is recorded; others have no autocast or are not used here.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

# --- invalidation ---------------------------------------------------------------------------------

_GENERATION = [0]


def _bump(*_args: object) -> None:
    _GENERATION[0] += 1


# Registration hooks fire whenever any module gains or replaces a submodule, parameter or buffer
# (``module.conv = ...``, ``register_buffer``), which is what can change a cached plan. They cost one
# integer increment per registration and nothing per training step.
torch.nn.modules.module.register_module_module_registration_hook(_bump)
torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)


def module_generation() -> int:
    """A counter that changes whenever any module registers a submodule, parameter or buffer.

    A cache of module-derived lists (parameters, norms, kept modules) is valid while the counter is
    unchanged. Assigning to ``module._parameters`` directly bypasses it; nothing in PyTorch does.
    """
    return _GENERATION[0]


# --- what a module needs --------------------------------------------------------------------------

# Modules and functions that draw random numbers in training mode.
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_RANDOM_NAME_PARTS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "drop_path", "rrelu",
                      "uniform", "exponential", "geometric", "cauchy", "poisson", "random")


def name_draws_random(name: str) -> bool:
    """Whether a function or method of this name may draw random numbers (``dropout``, ``rand*``...)."""
    return any(part in name.lower() for part in _RANDOM_NAME_PARTS)


def _draws_random(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) may draw random numbers, conservatively.

    A module may declare it with a boolean ``draws_random`` attribute. Built-in ``torch.nn`` layers
    are known; a traced module's graph is read op by op; any other user or library module might, so
    it counts as random (its generator state is then captured).
    """
    declared = getattr(module, "draws_random", None)  # a module may say so itself
    if isinstance(declared, bool):
        return declared
    if isinstance(module, _RANDOM_MODULES):
        return True
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                if name_draws_random(name):
                    return True
        return False
    return not type(module).__module__.startswith("torch.nn.")


def _counter_hideable(norm: _NormBase) -> bool:
    # PyTorch's own batch and instance norms skip the counter when it is None; SyncBatchNorm and
    # library subclasses with their own forward may not, and get a scratch counter instead.
    forward = type(norm).forward
    return forward is _BatchNorm.forward or forward is _InstanceNorm.forward


@dataclass(frozen=True)
class RecomputeNeeds:
    """What recomputing one module (F, G, or a checkpointed region) must take care of.

    Attributes:
        norms: its norm layers that track running statistics (frozen during the recomputation).
        other_buffers: buffers outside those norms: snapshotted before the recomputation and put back
            where it changed them (by version counter); empty for ordinary residual functions.
        random: whether it may draw random numbers (its generator state is then captured).
    """

    norms: tuple[_NormBase, ...]
    other_buffers: tuple[tuple[str, torch.Tensor], ...]
    random: bool


def recompute_needs(module: nn.Module) -> RecomputeNeeds:
    """Walk ``module`` once and say what its recomputation needs (see :class:`RecomputeNeeds`)."""
    norms = tuple(m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats)
    owned = {id(b) for m in norms for b in m.buffers(recurse=False)}
    others = tuple((name, b) for name, b in module.named_buffers() if id(b) not in owned)
    random = any(_draws_random(m) for m in module.modules())
    return RecomputeNeeds(norms=norms, other_buffers=others, random=random)


# --- norm statistics -------------------------------------------------------------------------------

# One scratch counter per device and dtype, shared by every norm and every step: no allocation per
# recomputation. Only plain tensors are kept. A tensor subclass (a FakeTensor of memory_profile, a
# functional tensor of a compiler's trace) belongs to the mode that made it, and a later call under
# another mode could not use it ("Mixing fake modes"), so those counters are made afresh each time.
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch_counter(like: torch.Tensor) -> torch.Tensor:
    if type(like) is not torch.Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    key = (like.device, like.dtype)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return _SCRATCH[key]


@contextlib.contextmanager
def frozen_running_stats(norms: Sequence[_NormBase]) -> Iterator[None]:
    """Run the body without changing the running statistics of ``norms``, at no extra kernel.

    Momentum 0 makes the norm kernel's in-place update ``(1 - 0) * running + 0 * batch`` leave the
    values as they are, while the op and what it saves for backward stay those of the forward (which
    non-reentrant checkpointing requires). The batch counter is set aside for the body (None, or a
    scratch tensor for norms whose forward needs one), so it is neither incremented nor restored.
    Attributes are swapped directly in ``_buffers``, so no registration hook fires.
    """
    saved = []
    try:
        for m in norms:
            attrs, buffers = m.__dict__, m._buffers  # plain dict writes: Module.__setattr__ is slow
            counter = buffers.get("num_batches_tracked")
            saved.append((attrs, buffers, attrs["momentum"], counter))
            attrs["momentum"] = 0.0
            if counter is not None:
                buffers["num_batches_tracked"] = None if _counter_hideable(m) else _scratch_counter(counter)
        yield
    finally:
        for attrs, buffers, momentum, counter in saved:
            attrs["momentum"] = momentum
            if counter is not None:
                buffers["num_batches_tracked"] = counter


@contextlib.contextmanager
def restored_buffers(buffers: Sequence[tuple[str, torch.Tensor]]) -> Iterator[None]:
    """Fallback for buffers :func:`frozen_running_stats` cannot protect: put back what the body changed.

    Only buffers whose version counter moved are restored, from a snapshot taken before the body;
    the snapshot costs one copy per buffer and is skipped when there is none. Call the body's
    ``autograd.grad`` inside the block: an op that saved a buffer for its backward would otherwise see
    it modified.
    """
    if not buffers:
        yield
        return
    versions = [b._version for _, b in buffers]
    with torch.no_grad():
        snapshot = [b.clone() for _, b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, buf), version, copy in zip(buffers, versions, snapshot):
                if buf._version != version:
                    buf.copy_(copy)


# --- random generators -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RNGState:
    """The CPU generator state and the states of the CUDA devices the segment touches."""

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()


def cuda_devices_of(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Indices of the CUDA devices holding any of ``tensors`` (sorted, unique)."""
    return tuple(sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"}))


def capture_rng(cuda_devices: tuple[int, ...]) -> RNGState:
    """Return a copy of the global generator states (CPU, and each of ``cuda_devices``)."""
    cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in cuda_devices)
    return RNGState(cpu=torch.get_rng_state(), cuda=cuda)


def set_rng(state: RNGState) -> None:
    """Set the global generators to ``state`` (inside :func:`restored_rng`)."""
    torch.set_rng_state(state.cpu)
    for device, cuda_state in state.cuda:
        torch.cuda.set_rng_state(cuda_state, device)


@contextlib.contextmanager
def restored_rng(cuda_devices: tuple[int, ...], enabled: bool = True) -> Iterator[None]:
    """Run the body, then put the callers' generator states back (once, whatever the body set).

    Forking (instead of reseeding) keeps the global generators exactly where an ordinary training
    step would leave them: the recomputation neither consumes nor resets random numbers.
    """
    if not enabled:
        yield
        return
    caller = capture_rng(cuda_devices)
    try:
        yield
    finally:
        set_rng(caller)


@contextlib.contextmanager
def replay_rng(state: RNGState) -> Iterator[None]:
    """Run the body with the generators set to ``state``, then put the callers' states back."""
    with restored_rng(tuple(d for d, _ in state.cuda)):
        set_rng(state)
        yield


# --- autocast --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings per device type (enabled, dtype) and the shared cast-cache flag."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool


def capture_autocast() -> AutocastState:
    """Record the current autocast state of the CPU and (when present) CUDA."""
    settings = []
    for device_type in _AUTOCAST_DEVICE_TYPES:
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        settings.append(
            (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        )
    return AutocastState(settings=tuple(settings), cache_enabled=torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def autocast_as(state: AutocastState) -> Iterator[None]:
    """Run the body under ``state``; nothing is entered when the current state already is ``state``.

    Backward threads may run under another state than the forward (autograd's CUDA threads start
    with autocast off), so the comparison is made where the body runs.
    """
    if capture_autocast() == state:
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state.settings:
            stack.enter_context(
                torch.autocast(
                    device_type=device_type, dtype=dtype, enabled=enabled, cache_enabled=state.cache_enabled
                )
            )
        yield
