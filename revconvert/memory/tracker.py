"""Live tensor bytes, counted per storage, for real tensors on any device and for fake tensors.

Two instruments, used together by :mod:`revconvert.memory.step`:

- :class:`AllocationTracker`, a ``TorchDispatchMode`` that sees every aten op. A storage first seen as
  an op *output* is a new allocation: its ``nbytes()`` are added to the live total and a weak
  reference subtracts them when the storage is freed. A storage first seen as an op *input* existed
  before tracking began (parameters, the input batch, optimizer state) and is never counted. Views
  and in-place results share a storage that is already known, so they cost nothing. This is what a
  caching allocator would report as allocated bytes, minus kernel workspaces that never reach Python.
- :class:`SavedTensorCounter`, ``torch.autograd.graph.saved_tensors_hooks`` that credit the bytes of
  each tensor autograd saves for backward to the current segment, once per storage, leaving out
  parameters and buffers.

Both work identically on ``FakeTensor`` (whose storages are meta storages with the real byte size),
which is why an estimate on fake tensors and a measurement on real ones can be compared op for op.
Storage Python objects are preserved by PyTorch while their storage lives, so ``id(storage)`` is a
stable key and a weak reference to it fires exactly when the memory is released.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

__all__ = ["AllocationTracker", "SavedTensorCounter", "Window", "storage_key", "storage_bytes"]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, or functional wrapper tensors
        return None


def storage_key(t: torch.Tensor) -> int | None:
    """An id that two tensors share exactly when they share memory (valid while the storage lives)."""
    st = _storage(t)
    return None if st is None else id(st)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None:
            seen[id(st)] = st.nbytes()
    return sum(seen.values())


@dataclass
class Window:
    """Peak of live bytes over an interval, relative to the live bytes when it opened."""

    label: str
    start: int
    peak: int = 0
    closed: bool = False

    @property
    def rise(self) -> int:
        """How far live bytes rose above their value at the start of the window."""
        return max(0, self.peak - self.start)


@dataclass
class _PeakSnapshot:
    live: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)


class AllocationTracker(TorchDispatchMode):
    """Count live bytes of storages allocated by ops run under this mode, and their peak.

    Attributes:
        live: bytes of tracked storages alive now.
        peak: the largest value ``live`` reached.
        phase: label given to new allocations ("forward", "backward", "optimizer"); the split of
            live bytes by phase at the peak is kept in :attr:`peak_by_phase`.

    Example:
        >>> with AllocationTracker() as tracker:
        ...     y = torch.randn(1024).relu()          # two 4 KiB allocations, one freed
        >>> tracker.peak
        8192
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "forward"
        self._refs: dict[int, weakref.ref] = {}  # storage id -> weak ref (keeps the callback alive)
        self._bytes: dict[int, tuple[int, str]] = {}  # tracked storage id -> (bytes, phase)
        self._live_by_phase: dict[str, int] = {}
        self._peak_snapshot = _PeakSnapshot()
        self._windows: list[Window] = []
        self._active = True

    # -- bookkeeping -------------------------------------------------------------------------
    def _forget(self, key: int) -> None:
        self._refs.pop(key, None)
        entry = self._bytes.pop(key, None)
        if entry is not None and self._active:
            nbytes, phase = entry
            self.live -= nbytes
            self._live_by_phase[phase] -= nbytes

    def _watch(self, st: torch.UntypedStorage) -> int:
        key = id(st)
        if key not in self._refs:
            # The callback must not hold the storage; a bound method of self is fine.
            self._refs[key] = weakref.ref(st, lambda _ref, key=key: self._forget(key))
        return key

    def _see_input(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is not None:
            self._watch(st)  # pre-existing storage: known, never counted

    def _see_output(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is None or id(st) in self._refs:
            return
        key = self._watch(st)
        nbytes = st.nbytes()
        self._bytes[key] = (nbytes, self.phase)
        self.live += nbytes
        self._live_by_phase[self.phase] = self._live_by_phase.get(self.phase, 0) + nbytes

    def _update_peaks(self) -> None:
        if self.live > self.peak:
            self.peak = self.live
            self._peak_snapshot = _PeakSnapshot(self.live, dict(self._live_by_phase))
        for window in self._windows:
            if self.live > window.peak:
                window.peak = self.live

    # -- public API --------------------------------------------------------------------------
    def mark_existing(self, tensors: Iterable[Any]) -> None:
        """Declare storages that exist before tracking (so an in-place op on them is not counted)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see_input(t)

    def open_window(self, label: str) -> Window:
        """Start recording the peak of live bytes from now until :meth:`close_window`."""
        window = Window(label=label, start=self.live, peak=self.live)
        self._windows.append(window)
        return window

    def close_window(self, window: Window) -> None:
        if window in self._windows:
            self._windows.remove(window)
        window.closed = True

    @property
    def live_by_phase(self) -> dict[str, int]:
        """Live bytes now, per phase of allocation."""
        return {k: v for k, v in self._live_by_phase.items() if v}

    @property
    def peak_by_phase(self) -> dict[str, int]:
        """Live bytes per phase at the moment of the peak (sums to :attr:`peak`)."""
        return {k: v for k, v in self._peak_snapshot.by_phase.items() if v}

    def stop(self) -> None:
        """Stop reacting to frees (call once the numbers have been read)."""
        self._active = False
        self._refs.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        # Flat loops instead of pytree: this runs for every aten op of the step.
        for a in itertools.chain(args, kwargs.values()):
            if isinstance(a, torch.Tensor):
                self._see_input(a)
            elif isinstance(a, (list, tuple)):
                for t in a:
                    if isinstance(t, torch.Tensor):
                        self._see_input(t)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._see_output(out)
        else:
            for o in tree_iter(out):
                if isinstance(o, torch.Tensor):
                    self._see_output(o)
        self._update_peaks()
        return out


class SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Credit the bytes autograd saves for backward to the current segment, once per storage.

    Parameters and buffers (``exclude``) are left out: they are resident whatever autograd does.
    A tensor saved again later (the next convolution saving the ReLU output that the ReLU saved)
    is credited only to the segment that saved it first.

    Attributes:
        segment: name credited for tensors packed now; ``None`` stops counting (e.g. during the
            backward pass, whose recomputation saves tensors only transiently).
        by_segment: bytes credited to each segment.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.segment: str | None = None
        self.by_segment: dict[str, int] = {}
        self._excluded = {k for k in (storage_key(t) for t in exclude) if k is not None}
        self._exclude_refs = list(exclude)  # keep ids valid
        self._seen: dict[int, weakref.ref] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorCounter:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.segment is not None:
            st = _storage(t)
            if st is not None and id(st) not in self._excluded and id(st) not in self._seen:
                key = id(st)
                self._seen[key] = weakref.ref(st, lambda _r, key=key: self._seen.pop(key, None))
                self.by_segment[self.segment] = self.by_segment.get(self.segment, 0) + st.nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.by_segment.values())

    def close(self) -> None:
        """Drop the references this counter holds (call after reading the numbers)."""
        self.segment = None
        self._seen.clear()
        self._exclude_refs.clear()
