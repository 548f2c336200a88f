"""Time the analysis passes on resnet152: audit (target < 3 s) and convert (target < 5 s).

Medians of interleaved runs (audit, convert, audit, convert, ...), model built once with random
weights. Usage: python benchmarks/bench_pass.py [--model resnet152] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import revconvert


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet152")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = torchvision.models.get_model(args.model, weights=None)
    shape = (1, 3, args.input_size, args.input_size)
    times: dict[str, list[float]] = {"audit": [], "convert": []}
    calls = {"audit": lambda: revconvert.audit(model, shape), "convert": lambda: revconvert.convert(model, shape)}
    calls["audit"]()  # warm-up (imports, first-use caches)
    for _ in range(args.repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    targets = {"audit": 3.0, "convert": 5.0}
    print(f"| pass | {args.model} 1x3x{args.input_size}x{args.input_size}: median s | min s | target s | met |")
    print("|---|---:|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {targets[name]:.1f} | {'yes' if med < targets[name] else 'no'} |")


if __name__ == "__main__":
    main()
