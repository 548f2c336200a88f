"""Trust probe: does every model either convert exactly or refuse with a clear error?

For each model (by default the smallest model of every timm module, and torchvision's classification
models), in a subprocess of its own with a time limit, in float64 with random weights:

1. ``revconvert.convert`` (by default, and with ``--pair``, ``ConvertConfig(pair_blocks=True)``).
   A ``RevConvertError`` (``ConversionError``, ``TraceError``) or a conversion that converts no block
   is a clean refusal; any other exception is a finding.
2. The caller's model is unchanged: its state dict bit for bit, and its train/eval mode.
3. Gradients: one training step of the conversion (memory-saving backward; its reversible segments'
   parameters moved off zero-init's identity by random noise) against the same conversion under
   ``revconvert.ordinary_autograd()``, input and every parameter, relative to the
   largest gradient of each tensor (at least 1e-4 of the largest over the model): at most 1e-8.
4. Wiring: the original with its converted blocks' branches zeroed by the surgery's own zero-init
   walk, and its conversion (whose couplings start as the identity), are equal in eval mode to the
   last bit.

Prints one line per model and a summary; ``--json`` writes every result. Exit status 1 if any model
is a finding. Example::

    python benchmarks/probe.py --json probe.json               # every timm module and torchvision
    python benchmarks/probe.py --models timm:dla34 tv:resnet18 --pair
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time

import torch

SMALL = ("atto", "femto", "pico", "nano", "tiny", "small", "xxs", "xs", "_s", "b0", "lite0", "050", "18", "r18",
         "_10", "_100", "mini")


def timm_candidates(max_params: float = 40e6) -> list[str]:
    """One model per timm module: the first of its models, small-sounding names first, with fewer than
    ``max_params`` parameters (counted on the meta device)."""
    import timm

    chosen = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        names.sort(key=lambda n: (not any(t in n for t in SMALL), len(n), n))
        for name in names[:6]:
            try:
                with torch.device("meta"):
                    count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a model that does not build on meta is tried for real later
                count = 0
            if count < max_params:
                chosen.append(f"timm:{name}")
                break
    return chosen


def torchvision_candidates() -> list[str]:
    """One torchvision classification model per family (the name up to its first digit or size
    word), the one with the fewest parameters."""
    import torchvision

    def params(name: str) -> float:
        try:
            with torch.device("meta"):
                return sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        except Exception:  # noqa: BLE001 - builders that compute on tensors (RegNet) do not build on meta
            return float("inf") if re.search(r"\d+gf", name) else len(name)

    families: dict[str, list[str]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        family = re.split(r"\d|_(?:tiny|small|base|large|huge|[tsblh])(?:_|$)", name)[0]
        families.setdefault(family, []).append(name)
    return [f"tv:{min(names, key=params)}" for _, names in sorted(families.items())]


def build(spec: str) -> torch.nn.Module:
    lib, _, name = spec.partition(":")
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def input_size(model: torch.nn.Module, size: int) -> tuple[int, ...]:
    """``(2, 3, size, size)`` if the model runs on it, else the size it was made for."""
    shape = (2, 3, size, size)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(shape, dtype=torch.float64))
        return shape
    except Exception:  # noqa: BLE001 - any failure: try the model's own size
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        c, h, w = cfg.get("input_size", (3, 224, 224))
        return (2, c, h, w)


def _relative_error(pairs: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> float:
    biggest = max((float(b.abs().max()) for _, b in pairs if b is not None and b.numel()), default=0.0)
    floor = 1e-4 * biggest
    worst = 0.0
    for a, b in pairs:
        if (a is None) != (b is None):
            return float("inf")
        if a is None or not b.numel():
            continue
        scale = max(float(b.abs().max()), floor)
        if scale > 0:
            worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


_IDEMPOTENT = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.relu, torch.nn.functional.relu,
               torch.nn.functional.relu6, torch.nn.functional.hardtanh, "relu", "relu_")


def _zero_branches(model: torch.nn.Module, example: tuple[int, ...], blocks: list[str]) -> list[str]:
    """Zero, in ``model``, what zero-init zeros in F and G, for each block of ``blocks``. Returns the
    activations after the add that are not idempotent (SiLU): an identity coupling then still differs
    from the zeroed block, which applies the activation once per block where the conversion applies
    it once per segment."""
    from revconvert.analysis.audit import analyze
    from revconvert.passes.surgery import _zero_last

    analysis = analyze(model, example, share_modules=True)
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    others = set()
    for name in blocks:
        block = analysis.blocks[name]
        _zero_last(gm, nodes[block.branch_output])
        if block.post_op is not None:
            post = nodes[block.post_op]
            kind = type(gm.get_submodule(post.target)) if post.op == "call_module" else post.target
            if kind not in _IDEMPOTENT:
                others.add(getattr(kind, "__name__", str(kind)))
    return sorted(others)


def probe_one(spec: str, size: int, pair: bool) -> dict:
    """The probe of one model (see the module docstring), as a JSON-ready dict."""
    import warnings

    import revconvert

    out: dict = {"model": spec, "pair_blocks": pair}
    try:  # the original itself must build and run in float64, or there is nothing to compare with
        model = build(spec).double()
        shape = input_size(model, size)
        with torch.no_grad():
            model(torch.randn(shape, dtype=torch.float64))
    except Exception as exc:  # noqa: BLE001 - reported as the model's outcome
        out.update(outcome="skipped", reason=f"the original does not run: {type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0][:150] if str(exc) else ''}")
        return out
    out["input"] = list(shape)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = revconvert.ConvertConfig(pair_blocks=pair)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = revconvert.convert(model, shape, config=config)
    except revconvert.RevConvertError as exc:
        out.update(outcome="refused", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return out
    out["convert_s"] = round(time.perf_counter() - t0, 2)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed or not model.training:
        out.update(outcome="FINDING", reason=f"the caller's model changed: {changed[:3]} training={model.training}")
        return out
    summary = converted.revconvert_summary
    out["converted"] = len(summary.converted_blocks)
    if not summary.converted_blocks:
        reasons = [str(w.message).splitlines()[0][:200] for w in caught]
        out.update(outcome="refused", reason=reasons[0] if reasons else "no eligible block")
        return out
    x = torch.randn(shape, dtype=torch.float64)
    converted.train()
    with torch.no_grad():  # away from zero-init's identity couplings, whose reconstruction is trivially exact
        for segment in converted.modules():
            if isinstance(segment, revconvert.ReversibleSegment):
                for param in segment.parameters():
                    param.add_(0.1 * torch.randn_like(param))
    reference = copy.deepcopy(converted)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    converted(x1).square().sum().backward()
    torch.manual_seed(1)
    with revconvert.ordinary_autograd():
        reference(x2).square().sum().backward()
    pairs = [(x1.grad, x2.grad)] + [(p.grad, q.grad) for p, q in zip(converted.parameters(), reference.parameters())]
    out["grad_error"] = _relative_error(pairs)
    del reference
    # zeroed on a scratch copy, whose trace shares its modules (tracing runs their Python code), and
    # copied over by state dict: the model that is converted again has only been deep-copied
    scratch = copy.deepcopy(model).eval()
    activations = _zero_branches(scratch, shape, summary.converted_blocks)
    zeroed = copy.deepcopy(model).eval()
    zeroed.load_state_dict(scratch.state_dict())
    del scratch
    # converted from the zeroed model: a module called both in a converted block and in stored code
    # (CoaT's shared position encodings) is zeroed on both sides
    fresh = revconvert.convert(zeroed, shape, config=config).eval()
    with torch.no_grad():
        same = torch.equal(fresh(x), zeroed(x))
    if activations and not same:  # inconclusive: see _zero_branches
        out["wiring_exact"] = same = None
        out["wiring_note"] = f"not checked: {', '.join(activations)} after the add is not idempotent"
    else:
        out["wiring_exact"] = same
    ok = out["grad_error"] <= 1e-8 and same is not False
    out["outcome"] = "exact" if ok else "FINDING"
    if not ok:
        out["reason"] = f"gradient error {out['grad_error']:.1e}, wiring exact: {same}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", metavar="LIB:NAME",
                   help="models to probe, e.g. timm:dla34 tv:resnet18 (default: every timm module's smallest "
                        "model and torchvision's classification models)")
    p.add_argument("--pair", action="store_true", help="also probe each model with pair_blocks=True")
    p.add_argument("--size", type=int, default=64, help="input height and width to try first (default: 64)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model and configuration")
    p.add_argument("--json", metavar="PATH", help="write every result as JSON")
    p.add_argument("--one", metavar="LIB:NAME", help=argparse.SUPPRESS)  # the subprocess's own call
    p.add_argument("--paired-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        print("RESULT " + json.dumps(probe_one(args.one, args.size, args.paired_one)), flush=True)
        return 0
    models = args.models or timm_candidates() + torchvision_candidates()
    results = []
    for spec in models:
        for pair in (False, True) if args.pair else (False,):
            command = [sys.executable, os.path.abspath(__file__), "--one", spec, "--size", str(args.size)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(command + (["--paired-one"] if pair else []), capture_output=True, text=True,
                                      timeout=args.timeout)
                found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
                result = json.loads(found.group(1)) if found else {
                    "model": spec, "pair_blocks": pair, "outcome": "FINDING",
                    "reason": "crashed: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
            except subprocess.TimeoutExpired:
                result = {"model": spec, "pair_blocks": pair, "outcome": "timeout"}
            result["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            detail = result.get("reason") or (f"{result['converted']} blocks, gradient error "
                                              f"{result['grad_error']:.1e}, wiring "
                                              f"{result.get('wiring_note') or 'exact'}")
            print(f"{spec}{' paired' if pair else ''}: {result['outcome']} ({detail})", flush=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("summary:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if counts.get("FINDING") else 0


if __name__ == "__main__":
    sys.exit(main())
