"""Whole-model exactness on CUDA: converted resnet50, memory-saving backward vs ordinary autograd.

For float32 and for autocast float16 / bfloat16 it runs one training step of the same converted
model twice (reversible backward; ``revconvert.ordinary_autograd()``) from the same state and RNG
seed, and prints the largest relative gradient difference over the input and every parameter, and
whether the BatchNorm running statistics agree. It also prints the reconstruction error of the
longest segment in each dtype. Runs on CPU too (autocast bfloat16 only) if no GPU is present.

    python benchmarks/cuda_check.py [--model resnet50] [--batch 8] [--size 128] [--pair-blocks]
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torchvision

import revconvert


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, ordinary: bool):
    x = x.clone().requires_grad_()
    amp = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    ctx = revconvert.ordinary_autograd() if ordinary else contextlib.nullcontext()
    torch.manual_seed(0)
    with ctx, amp:
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    return x.grad, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--tf32", choices=["default", "off"], default="default",
                   help="off: disable TF32 convolutions and matmuls (cuDNN's default is on)")
    p.add_argument("--pair-blocks", action="store_true", help="convert with ConvertConfig(pair_blocks=True)")
    args = p.parse_args()
    if args.tf32 == "off":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None)
    config = revconvert.ConvertConfig(pair_blocks=args.pair_blocks)
    converted = revconvert.convert(model, (1, 3, args.size, args.size), config=config).to(device)
    for m in converted.modules():  # leave the identity start so F and G matter
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    dtypes = [None, torch.float16, torch.bfloat16] if device == "cuda" else [None, torch.bfloat16]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    tf32 = torch.backends.cudnn.allow_tf32 if device == "cuda" else False
    print(f"# {args.model} converted{' (pair_blocks)' if args.pair_blocks else ''}, batch {args.batch}x3x{args.size}x{args.size}, {name}, "
          f"torch {torch.__version__}, TF32 convolutions {'on' if tf32 else 'off'}")
    print("| precision | rev vs ordinary: whole-gradient rel. L2 diff | worst tensor (max abs diff / max abs) "
          "| BN running stats equal | for scale: ordinary in this precision vs ordinary float64 |")
    print("|---|---:|---:|---|---:|")
    ref64 = copy.deepcopy(converted).double()
    gx64, gp64, _ = step(ref64, x.double(), None, ordinary=True)
    flat64 = torch.cat([g.flatten() for g in [gx64, *gp64]])
    for dtype in dtypes:
        a, b = copy.deepcopy(converted), copy.deepcopy(converted)
        gx1, gp1, buf1 = step(a, x, dtype, ordinary=False)
        gx2, gp2, buf2 = step(b, x, dtype, ordinary=True)
        worst = max([rel(gx1, gx2)] + [rel(u, v) for u, v in zip(gp1, gp2)])
        flat1 = torch.cat([g.float().flatten() for g in [gx1, *gp1]])
        flat2 = torch.cat([g.float().flatten() for g in [gx2, *gp2]])
        l2 = ((flat1 - flat2).norm() / flat2.norm()).item()
        base = ((flat2.double() - flat64).norm() / flat64.norm()).item()
        same = all(torch.allclose(u.float(), v.float(), rtol=1e-3, atol=1e-5) for u, v in zip(buf1, buf2))
        label = "float32" if dtype is None else f"autocast {str(dtype).split('.')[-1]}"
        print(f"| {label} | {l2:.2e} | {worst:.2e} | {same} | {base:.2e} |")
    segs = {n: m for n, m in converted.named_modules() if isinstance(m, revconvert.ReversibleSegment)}
    longest = max(segs, key=lambda n: len(segs[n].couplings))
    seg = segs[longest]
    # the segment's input: run the model up to it with a forward pre-hook
    captured = {}
    handle = seg.register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0].detach()))
    with torch.no_grad():
        copy.deepcopy(converted)(x)  # train mode: batch statistics, as in training
    handle.remove()
    print(f"\nreconstruction error of {longest} ({len(seg.couplings)} couplings), train mode:")
    for dtype in [torch.float64, torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else []):
        s = copy.deepcopy(seg).to(dtype)
        errs = s.reconstruction_errors(captured["x"].to(dtype))
        print(f"  {str(dtype).split('.')[-1]:9s} max_rel {max(e.max_rel for e in errs):.2e}")


if __name__ == "__main__":
    main()
