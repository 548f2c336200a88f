"""Find the largest training batch of resnet152 that fits a memory budget, before and after conversion.

memory_profile runs one training step on fake tensors, so an estimate costs seconds and no
activation memory, whatever the batch. Peak memory grows with the batch, so the largest batch that
fits is found by bisection; two estimates (batch 1 and 2) give a linear first guess that makes the
bracket small.

Run: python examples/estimate_memory.py            (REVCONVERT_EXAMPLE_TINY=1 for a quick check)
"""

from __future__ import annotations

import functools
import os
import time

import torchvision

import revconvert

TINY = os.environ.get("REVCONVERT_EXAMPLE_TINY") == "1"
GiB = 2**30

model = torchvision.models.resnet18() if TINY else torchvision.models.resnet152()
IMAGE = 64 if TINY else 224  # at 32 px, batch 1 leaves BatchNorm one value per channel
BUDGET = 8 * GiB            # e.g. the GPU memory one training step may use
LIMIT = 2 if TINY else 4096  # largest batch considered
OPTIMIZER = "sgd-momentum"

START = time.perf_counter()


def say(text: str) -> None:
    """Progress: each estimate takes a few seconds, and a search makes about a dozen."""
    print(f"[{time.perf_counter() - START:5.1f} s] {text}", flush=True)


# Convert once; memory_profile(..., converted=False) then estimates each model on its own.
say(f"converting {type(model).__name__} ...")
variants = {"original": model, "converted": revconvert.convert(model)}


@functools.cache
def peak(name: str, batch: int) -> int:
    """Estimated peak bytes of one training step: weights, gradients, optimizer state, activations."""
    profile = revconvert.memory_profile(variants[name], (3, IMAGE, IMAGE), batch, optimizer=OPTIMIZER,
                                        converted=False)
    bytes_ = profile.original.peak_bytes
    say(f"  {name:9}  batch {batch:4d}: peak {bytes_ / GiB:6.2f} GiB "
        f"({'fits' if bytes_ <= BUDGET else 'too big'})")
    return bytes_


def largest_batch(name: str) -> int:
    fits = lambda b: peak(name, b) <= BUDGET  # noqa: E731
    if not fits(1):
        return 0
    per_sample = max(peak(name, 2) - peak(name, 1), 1)
    guess = min(LIMIT, 1 + (BUDGET - peak(name, 1)) // per_sample)
    # Bracket the answer around the guess: lo fits, hi does not (hi = LIMIT + 1 means "all fit").
    lo, hi, step = 1, LIMIT + 1, max(1, guess // 64)
    probe = guess
    while lo < probe < hi:
        if fits(probe):
            lo, probe = probe, min(probe + step, hi)
        else:
            hi, probe = probe, max(probe - step, lo)
        step *= 2
    while hi - lo > 1:  # bisection inside the bracket
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


print(f"{type(model).__name__}, {IMAGE}x{IMAGE} images, {OPTIMIZER}, budget {BUDGET / GiB:.0f} GiB", flush=True)
found = {}
for name in variants:
    say(f"searching the largest {name} batch ...")
    found[name] = largest_batch(name)
print()
for name, batch in found.items():
    print(f"  {name:9}  largest batch {batch:4d}   peak {peak(name, batch) / GiB:.2f} GiB" if batch else
          f"  {name:9}  does not fit even at batch 1")
