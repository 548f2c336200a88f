"""Compare memory_profile's estimate with what a real training step allocates.

On a CUDA machine: for resnet50 and resnet152 (torchvision, random weights), original and converted,
one training step at a batch that fits; prints the estimate (fake tensors, estimated for CUDA), the
allocation tracker's peak on the real step, ``torch.cuda.max_memory_allocated`` and their ratios.
Target: estimate within 10% of ``max_memory_allocated``. Without CUDA it runs the same comparison on
the CPU for a small case (allocation tracker only), so the script itself is always exercised.
If torchinfo is installed, its "estimated total size" is printed beside it for comparison.

    python benchmarks/memory_gpu_check.py [--batch 64] [--size 224] [--optimizer adam] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

import revconvert
from revconvert._format import format_bytes, render_table


def torchinfo_total(model: torch.nn.Module, batch: int, size: int, device: str) -> int | None:
    try:
        import torchinfo
    except ImportError:
        return None
    stats = torchinfo.summary(model, input_size=(batch, 3, size, size), device=device, verbose=0)
    # torchinfo's "Estimated Total Size" = input + forward/backward pass size + params.
    return int(stats.total_input + stats.total_output_bytes + stats.total_param_bytes)


def run(models: list[str], batch: int, size: int, optimizer: str | None, device: str) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        t0 = time.perf_counter()
        profile = revconvert.memory_profile(model, (3, size, size), batch, optimizer=optimizer,
                                            device=device)
        t_est = time.perf_counter() - t0
        converted = revconvert.convert(model, (1, 3, size, size))
        x = torch.randn(batch, 3, size, size, device=device)
        for label, net, est in (("original", model, profile.original),
                                ("converted", converted, profile.converted)):
            net = net.to(device)
            if device == "cuda":
                torch.cuda.empty_cache()
            meas = revconvert.measure_memory(net, x, optimizer=optimizer)
            net.cpu()
            row = {
                "model": name, "variant": label, "batch": batch, "size": size, "optimizer": optimizer,
                "estimate_peak": est.peak_bytes, "tracker_peak": meas.peak_bytes,
                "cuda_peak": meas.cuda_peak_bytes,
                "estimate_activations": est.activation_bytes,
                "measured_activations": meas.activation_bytes,
                "estimate_seconds": round(t_est, 2),
                "torchinfo_total": torchinfo_total(net, batch, size, device) if label == "original" else None,
            }
            ref = row["cuda_peak"] or row["tracker_peak"]
            row["peak_ratio"] = est.peak_bytes / ref
            row["activation_ratio"] = est.activation_bytes / max(1, meas.activation_bytes)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del meas, net
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        models, batch, size = args.models or ["resnet50", "resnet152"], args.batch or 64, args.size or 224
    else:
        print("CUDA not available: CPU comparison only (allocation tracker, no max_memory_allocated)")
        models, batch, size = args.models or ["resnet18"], args.batch or 2, args.size or 64
    rows = run(models, batch, size, args.optimizer, device)
    table = [(r["model"], r["variant"], format_bytes(r["estimate_peak"]), format_bytes(r["tracker_peak"]),
              format_bytes(r["cuda_peak"]) if r["cuda_peak"] is not None else "-",
              f"{r['peak_ratio']:.3f}", f"{r['activation_ratio']:.4f}",
              format_bytes(r["torchinfo_total"]) if r["torchinfo_total"] else "-") for r in rows]
    print(render_table(["model", "variant", "estimate", "tracker", "cuda max_allocated",
                        "est/ref peak", "est/meas act", "torchinfo"], table, align="llrrrrrr"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
