"""How long memory_profile takes, and how much resident memory it needs, for a large model and batch.

Target (issue 5): ``memory_profile(resnet152, batch_size=256)`` (original and converted, 224x224)
in under 20 s and under 2 GB of resident memory. Prints the time of each stage, the peak RSS of the
process and the estimated peaks (which are far larger than the RSS: nothing activation-sized is
allocated).

    python benchmarks/memory_estimate_speed.py [--model resnet152] [--batch 256] [--optimizer adam]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torchvision

import revconvert
from revconvert._format import format_bytes


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet152")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--optimizer", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None)
    rss_model = peak_rss_bytes()
    t0 = time.perf_counter()
    profile = revconvert.memory_profile(model, (3, args.size, args.size), args.batch,
                                        optimizer=args.optimizer)
    seconds = time.perf_counter() - t0
    rss = peak_rss_bytes()
    print(profile)
    print()
    print(f"memory_profile({args.model}, batch_size={args.batch}, optimizer={args.optimizer}): "
          f"{seconds:.1f} s (target < 20 s)")
    print(f"peak RSS of the process: {format_bytes(rss)} (target < 2 GB; "
          f"{format_bytes(rss_model)} after building the model)")
    print(f"estimated peak: original {format_bytes(profile.original.peak_bytes)}, "
          f"converted {format_bytes(profile.converted.peak_bytes)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
