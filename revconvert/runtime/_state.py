"""Stash-and-restore helpers that make the backward recomputation replay the forward exactly.

Three pieces of state decide what F and G compute besides their inputs: the random generators
(dropout masks), the autocast state (which ops run in reduced precision), and the running statistics
of normalisation layers (which the recomputation, run in train mode, would otherwise update a second
time). Each helper here captures one of them in the forward and replays or protects it in the backward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# Device types whose autocast state is recorded; others have no autocast or are not used here.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


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


@contextlib.contextmanager
def replay_rng(state: RNGState) -> Iterator[None]:
    """Run the body with the generators set to ``state``, then put the callers' states back.

    Forking (instead of reseeding) keeps the global generators exactly where an ordinary training
    step would leave them: the recomputation neither consumes nor resets random numbers.
    """
    devices = [d for d, _ in state.cuda]
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state.cpu)
        for device, cuda_state in state.cuda:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


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
def replay_autocast(state: AutocastState) -> Iterator[None]:
    """Run the body under ``state``; disabled entries are entered too, since backward threads may differ."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state.settings:
            stack.enter_context(
                torch.autocast(
                    device_type=device_type, dtype=dtype, enabled=enabled, cache_enabled=state.cache_enabled
                )
            )
        yield


def _norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    buffers = []
    for sub in module.modules():
        if isinstance(sub, _NormBase) and sub.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(sub, name, None)
                if buf is not None:
                    buffers.append(buf)
    return buffers


@contextlib.contextmanager
def preserve_running_stats(module: nn.Module) -> Iterator[None]:
    """Undo, in place, what the body does to the running statistics of norm layers in ``module``.

    The recomputation must run norm layers in train mode (batch statistics, as in the forward), which
    also updates their running statistics a second time. Restoring a snapshot is exact, and doing it in
    place keeps the buffers' identity (optimisers, DDP buffer broadcast, state_dict views). Call the
    body's ``autograd.grad`` inside the block: batch norm saves the running buffers for its backward,
    so restoring them earlier would trip autograd's in-place check.

    Other buffers changed by the body cannot be restored generically; a warning names them.
    """
    norm = _norm_buffers(module)
    norm_ids = {id(b) for b in norm}
    others = [(name, b, b._version) for name, b in module.named_buffers() if id(b) not in norm_ids]
    with torch.no_grad():
        snapshot = [b.clone() for b in norm]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, saved in zip(norm, snapshot):
                buf.copy_(saved)
        changed = [name for name, b, version in others if b._version != version]
        if changed:
            warnings.warn(
                f"ReversibleSegment: buffers {changed} of {type(module).__name__} were modified during the "
                "backward recomputation and are not restored (only norm running statistics are); they "
                "are updated twice per step. Use ordinary_autograd() if that matters.",
                RuntimeWarning,
                stacklevel=2,
            )
