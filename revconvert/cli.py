"""The ``revconvert`` command line: audit, convert, memory, report, plan.

MODEL is a torchvision model name (``resnet50``) or ``package.module:factory`` (a callable that
returns an ``nn.Module``). Models are built with random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .runtime._keep import KEEP_POLICIES

__all__ = ["main", "load_model"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``spec`` (torchvision name or ``package.module:factory``)."""
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:
            raise CLIError(f"cannot import module {mod_name!r} for model {spec!r}: {type(e).__name__}: {e}") from e
        factory = getattr(module, attr, None)
        if factory is None:
            close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=3)
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
        try:
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        except Exception as e:
            raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    names = _torchvision_names()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise CLIError(f"unknown model {spec!r} ({hint}); or pass package.module:factory")
    import torchvision

    return torchvision.models.get_model(spec, weights=None)


def _input_shape(text: str) -> tuple[int, ...]:
    """``224`` -> (3, 224, 224); ``3x128x128`` -> (3, 128, 128)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be N or CxHxW, got {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-size must be positive, got {text!r}")
    return (3, dims[0], dims[0]) if len(dims) == 1 else dims


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revconvert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="torchvision model name or package.module:factory")
        sp.add_argument("--input-size", type=_input_shape, default=(3, 224, 224), metavar="N|CxHxW",
                        help="input size (default 224, i.e. 3x224x224)")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    a = sub.add_parser("audit", help="which residual blocks can become reversible, and why not")
    common(a)
    c = sub.add_parser("convert", help="convert and save the model")
    common(c)
    c.add_argument("-o", "--output", required=True, help="where to torch.save the converted model")
    c.add_argument("--only", action="append", metavar="NAME",
                   help="convert only these blocks or prefixes (repeatable), e.g. --only layer3")
    c.add_argument("--width", default="match-params", help="match-params (default), keep, or a factor")
    _conversion_flags(c)
    c.add_argument("--plan", metavar="JSON", help="convert as a plan written by `revconvert plan -o` says")
    for name, helptext in (("memory", "estimate training memory, original vs converted"),
                           ("report", "the main job: audit + conversion + memory on one page")):
        m = sub.add_parser(name, help=helptext)
        common(m)
        m.add_argument("--batch-size", type=int, default=1)
        m.add_argument("--optimizer", choices=["sgd", "sgd-momentum", "adam", "adamw"], default=None)
        m.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
        _conversion_flags(m)
        if name == "memory":
            m.add_argument("--plot", metavar="PNG", help="write a plot (needs the 'plot' extra)")
        else:
            m.add_argument("--memory", metavar="SIZE", help="also plan the conversion that fits SIZE (e.g. 24GiB)")
    _add_plan_parser(sub, common)
    return p


def _add_plan_parser(sub: Any, common: Any) -> None:
    sp = sub.add_parser("plan", help="the conversion that fits a memory budget at the least extra FLOPs")
    common(sp)
    sp.add_argument("--memory", required=True, metavar="SIZE", help="budget for one training step, e.g. 24GiB")
    sp.add_argument("--batch-size", type=int, default=None,
                    help="batch to fit (default: the largest that fits within --max-flops-ratio)")
    sp.add_argument("--max-flops-ratio", type=float, default=None, metavar="R",
                    help="most step FLOPs over the original's (e.g. 1.2); required without --batch-size")
    sp.add_argument("--optimizer", choices=["sgd", "sgd-momentum", "adam", "adamw"], default=None)
    sp.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    sp.add_argument("-o", "--output", metavar="JSON", help="write the plan (use with convert --plan)")


def _make_plan(args: argparse.Namespace, model: nn.Module):  # noqa: ANN202 - MemoryPlan, imported lazily
    import revconvert  # lazy: keeps torch out of the CLI start-up

    batch = getattr(args, "batch_size", None)
    if batch is None and getattr(args, "max_flops_ratio", None) is None:
        raise CLIError("give --batch-size, or --max-flops-ratio to find the largest batch that fits")
    try:
        return revconvert.plan_memory(model, args.memory, input_size=args.input_size, batch_size=batch,
                                      optimizer=args.optimizer, dtype=_DTYPES[args.dtype],
                                      max_flops_ratio=getattr(args, "max_flops_ratio", None))
    except ValueError as e:
        raise CLIError(str(e)) from e


def _run_plan(args: argparse.Namespace) -> int:
    plan = _make_plan(args, load_model(args.model))
    out = plan.to_dict()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    text = str(plan) + (f"\n\nplan written to {args.output} (revconvert convert MODEL --plan {args.output})"
                        if args.output else "")
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def _plan_config(path: str, width: str | float):  # noqa: ANN202 - ConvertConfig, imported lazily
    from .memory.plan_report import config_from_dict  # lazy: keeps torch out of the CLI start-up

    try:
        with open(path) as f:
            data = json.load(f)
        return dataclasses.replace(config_from_dict(data), width=width)
    except (OSError, ValueError) as e:
        raise CLIError(f"--plan {path}: {e}") from e


def _conversion_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checkpoint-stored", action="store_true",
                    help="also run the stored parts (stem, projection blocks) under activation "
                         "checkpointing: less memory, their forward runs twice")
    sp.add_argument("--keep", choices=sorted(KEEP_POLICIES), default=None,
                    help="couplings keep these outputs from the forward, so the backward recomputes less "
                         "(every coupling, or those --recompute-budget picks)")
    sp.add_argument("--recompute-budget", type=_budget, default=None, metavar="FRACTION",
                    help="most extra FLOPs per step the memory-saving backward may cost, as a fraction of "
                         "ordinary autograd (e.g. 0.2); couplings keep outputs until it fits")


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (a fraction of the ordinary step's FLOPs), got {text!r}")
    return value


def _config(args: argparse.Namespace, **kwargs: Any):  # noqa: ANN202 - ConvertConfig, imported lazily
    import revconvert  # lazy: keeps torch out of the CLI start-up

    return revconvert.ConvertConfig(checkpoint_stored=args.checkpoint_stored, keep=args.keep,
                                    recompute_budget=args.recompute_budget, **kwargs)


def _width(text: str) -> str | float:
    if text in ("match-params", "keep"):
        return text
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--width must be match-params, keep or a number, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    import revconvert  # lazy: keeps torch out of the CLI start-up

    model = load_model(args.model)
    example = (1, *args.input_size)
    out: dict[str, Any] = {}
    text: list[str] = []
    if args.command == "audit":
        report = revconvert.audit(model, example)
        out, text = report.to_dict(), [str(report)]
    elif args.command == "convert":
        if args.plan and (args.only or args.checkpoint_stored or args.keep or args.recompute_budget is not None):
            raise CLIError("--plan sets the conversion; do not combine it with --only, --checkpoint-stored, "
                           "--keep or --recompute-budget")
        config = (_plan_config(args.plan, _width(args.width)) if args.plan else
                  _config(args, only=tuple(args.only) if args.only else None, width=_width(args.width)))
        converted = revconvert.convert(model, example, config=config)
        torch.save(converted, args.output)
        summary = converted.revconvert_summary
        out = {**summary.to_dict(), "output": args.output}
        text = [str(summary), "", f"saved to {args.output} (load with torch.load(path, weights_only=False))"]
    else:
        if args.batch_size < 1:
            raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
        config = _config(args)
        profile = revconvert.memory_profile(model, input_size=args.input_size, batch_size=args.batch_size,
                                            dtype=_DTYPES[args.dtype], optimizer=args.optimizer, config=config)
        if args.command == "report":
            report = revconvert.audit(model, example)
            converted = revconvert.convert(model, example, config=config)
            summary = converted.revconvert_summary
            out = {"audit": report.to_dict(), "conversion": summary.to_dict(), "memory": profile.to_dict()}
            text = ["== Audit ==", report.summary(), "", "== Conversion ==", str(summary), "",
                    f"== Memory (batch {args.batch_size}, {'x'.join(map(str, args.input_size))}) ==",
                    str(profile)]
            if args.memory:
                plan = _make_plan(args, model)
                out["plan"] = plan.to_dict()
                text += ["", f"== Plan for {args.memory} ==", str(plan)]
        else:
            out, text = profile.to_dict(), [str(profile)]
            if getattr(args, "plot", None):
                profile.plot(args.plot)
                text.append(f"plot written to {args.plot}")
    print(json.dumps(out, indent=2, default=str) if args.json else "\n".join(text))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revconvert`` console script."""
    from .errors import RevConvertError  # lazy: keeps torch out of the CLI start-up

    args = _parser().parse_args(argv)
    try:
        return _run_plan(args) if args.command == "plan" else _run(args)
    except (CLIError, RevConvertError, ImportError) as e:
        print(f"revconvert {args.command}: error: {e}".splitlines()[0] if isinstance(e, CLIError)
              else f"revconvert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
