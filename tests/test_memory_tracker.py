"""The two instruments under the memory report, checked against byte counts worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from revconvert.memory.tracker import AllocationTracker, SavedTensorCounter, storage_bytes

F32 = 4


def _modes():
    return [pytest.param(None, id="real"), pytest.param(FakeTensorMode, id="fake")]


@pytest.mark.parametrize("mode_cls", _modes())
def test_tracker_counts_new_storages_and_frees(mode_cls):
    ctx = mode_cls() if mode_cls else torch.device("cpu")
    with ctx:
        existing = torch.zeros(256)
        with AllocationTracker() as tracker:
            a = torch.empty(1024)             # +4 KiB
            b = a.relu()                      # +4 KiB -> peak 8 KiB
            del a                             # -4 KiB
            v = b.view(32, 32)                # view: same storage, free
            existing.add_(1)                  # in place on a pre-existing tensor: free
            c = existing + 1                  # +1 KiB
            assert tracker.live == (1024 + 256) * F32
            del b, v, c
    assert tracker.peak == 2 * 1024 * F32
    assert tracker.live == 0


@pytest.mark.parametrize("mode_cls", _modes())
def test_tracker_windows_and_phases(mode_cls):
    ctx = mode_cls() if mode_cls else torch.device("cpu")
    with ctx, AllocationTracker() as tracker:
        keep = torch.empty(100)                       # forward: 400 B
        tracker.phase = "backward"
        window = tracker.open_window("w")
        tmp = torch.empty(50)                         # backward: 200 B, peak of the window
        del tmp
        tracker.close_window(window)
        late = torch.empty(10)                        # after the window: not in it
    assert window.rise == 50 * F32
    assert tracker.peak == 150 * F32
    assert tracker.peak_by_phase == {"forward": 100 * F32, "backward": 50 * F32}
    del keep, late


@pytest.mark.parametrize("mode_cls", _modes())
def test_saved_counter_dedups_storages_and_excludes_params(mode_cls):
    ctx = mode_cls() if mode_cls else torch.device("cpu")
    with ctx:
        lin = nn.Linear(8, 4, bias=False)
        x = torch.empty(2, 8)
        with SavedTensorCounter(exclude=list(lin.parameters())) as counter:
            counter.segment = "a"
            h = lin(x)                 # saves x (64 B); the weight is a parameter
            counter.segment = "b"
            y = h.relu()               # saves its output (32 B)
            z = y * y                  # saves y twice: already counted
    assert counter.by_segment == {"a": 2 * 8 * F32, "b": 2 * 4 * F32}
    assert counter.total == 96
    del z


def test_storage_bytes_counts_shared_storage_once():
    base = torch.zeros(10, 10)
    assert storage_bytes([base, base[0], base.t()]) == 100 * F32
