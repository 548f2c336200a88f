"""Which models convert: audit, conversion and saved activations over torchvision and timm models.

For each model (random weights): the residual blocks the audit finds, how many have an identity
shortcut, how many the conversion makes reversible, the reasons the rest stay stored, the parameter
ratio of the converted model, and the ratio of activation bytes a training step saves for backward
(converted / original), estimated on fake tensors by ``revconvert.memory_profile`` (no memory used).

Usage:
    python benchmarks/models.py                      # Markdown table on stdout (the README's)
    python benchmarks/models.py --json models.json   # also the rows as JSON
    python benchmarks/models.py --models tv:resnet18 timm:convnext_atto
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
import warnings

import torch
import torchvision

import revconvert

MODELS = [
    "tv:resnet18", "tv:resnet50", "tv:resnext50_32x4d", "tv:mobilenet_v2", "tv:mobilenet_v3_small",
    "tv:mobilenet_v3_large", "tv:efficientnet_b0", "tv:efficientnet_v2_s", "tv:regnet_x_400mf",
    "tv:regnet_y_400mf", "tv:convnext_tiny", "tv:shufflenet_v2_x1_0", "tv:vit_b_16", "tv:swin_t",
    "timm:resnet50", "timm:resnetv2_50", "timm:seresnet50", "timm:mobilenetv2_100", "timm:efficientnet_b0",
    "timm:convnext_atto", "timm:rexnet_100", "timm:ghostnet_100", "timm:mixnet_s", "timm:cspresnet50",
    "timm:cspdarknet53", "timm:regnetz_b16", "timm:dla34", "timm:convnextv2_atto", "timm:poolformer_s12",
    "timm:res2net50_14w_8s", "timm:fasternet_t0", "timm:inception_next_atto", "timm:mambaout_femto",
]


def build(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":")
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        return timm.create_model(name)
    return torchvision.models.get_model(name, weights=None)


def row(spec: str, side: int, batch: int) -> dict:
    model = build(spec)
    shape = (1, 3, side, side)
    out: dict = {"model": spec.replace("tv:", "torchvision ").replace("timm:", "timm "),
                 "params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    try:
        report = revconvert.audit(model, shape)
    except revconvert.RevConvertError as e:
        return {**out, "error": str(e).splitlines()[0][:80]}
    out["blocks"] = len(report.blocks)
    out["identity"] = sum(b.shortcut == "identity" for b in report.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = revconvert.convert(model, shape)
        summary = converted.revconvert_summary
        out["converted"] = len(summary.converted_blocks)
        out["param_ratio"] = round(summary.param_ratio, 3)
        reasons = collections.Counter(b.reason for b in report.blocks if not b.reversible)
        out["stored"] = dict(reasons)
        # the first reason of the identity blocks that stay stored, in the audit's words
        stuck = [b for b in report.blocks if not b.reversible and b.shortcut == "identity"]
        out["example"] = f"{stuck[0].name}: {stuck[0].message}" if stuck else ""
        if out["converted"]:
            profile = revconvert.memory_profile(model, (3, side, side), batch)
            out["saved_ratio"] = round(profile.converted.activation_bytes / profile.original.activation_bytes, 3)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | residual blocks | identity | converted | stored: reasons | params | saved activations |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | trace error: {r['error']} | | |")
            continue
        why = ", ".join(f"`{k}` {v}" for k, v in sorted(r["stored"].items())) or "-"
        saved = f"{r['saved_ratio']:.2f}x" if "saved_ratio" in r else "1.00x"
        ratio = f"{r['param_ratio']:.3f}x" if r["converted"] else "-"
        lines.append(f"| {r['model']} | {r['blocks']} | {r['identity']} | {r['converted']} | {why} | {ratio} | "
                     f"{saved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS, help="tv:NAME or timm:NAME")
    parser.add_argument("--side", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the memory estimate (default 32)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, its row as JSON
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.one:
        try:
            result = row(args.one, args.side, args.batch)
        except Exception as e:  # a failure is a row of the table, not the end of the run
            result = {"model": args.one, "error": f"{type(e).__name__}: {e}".splitlines()[0][:80]}
        print(json.dumps(result))
        return
    for spec in args.models:
        # one process per model: nothing one model leaves behind (caches, fake-tensor state) reaches the next
        done = subprocess.run([sys.executable, __file__, "--one", spec, "--side", str(args.side),
                               "--batch", str(args.batch)], capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        rows.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                    {"model": spec, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:80]})
        print(f"# {spec}: {rows[-1]}", flush=True)
    print()
    print(f"Input 1x3x{args.side}x{args.side} (saved activations: batch {args.batch}, float32, estimated on fake "
          f"tensors; converted / original bytes autograd keeps for backward).")
    print()
    print(markdown(rows))
    for r in rows:
        if r.get("example"):
            print(f"- {r['model']}: {r['example']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
