"""The revconvert command line: audit, convert, memory, report, plan.

Nothing here imports torch until a command runs, so ``revconvert --help`` and argument errors
answer at once. Mistakes a user can make (a bad flag, an unknown model, an output path that cannot
be written) are checked before any model is traced or converted and end in one line on stderr,
``revconvert: error: ...``, with exit status 2. Warnings print as ``revconvert: warning: ...``, once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from ._cli_input import (MAX_WIDTH, CLIError, check_output, input_shape_for, leaf_modules_for, load_model,
                         parse_input_size, parse_width)

__all__ = ["main", "load_model"]

# Choices of the library, named here so that building the parser imports no torch; a test checks
# them against revconvert.runtime.KEEP_POLICIES, memory.optim.OPTIMIZERS and memory.estimate.DTYPES.
KEEP_CHOICES = ("spatial-convs",)
OPTIMIZER_CHOICES = ("sgd", "sgd-momentum", "adam", "adamw")
DTYPE_CHOICES = ("bfloat16", "float16", "float32", "float64")

DESCRIPTION = """\
Turn a residual network into a reversible one (RevNet) and estimate the memory it saves.

MODEL is one of:
  a torchvision model name          resnet50 (random weights; nothing is downloaded)
  timm:NAME                         timm:convnextv2_atto (timm.create_model, random weights)
  module:factory                    mymodels:TinyNet (the current folder is on the import path)
  file.py:factory                   path/to/nets.py:make_net
  a saved model file                converted.pt, as written by revconvert convert or
                                    torch.save(model, path); loading it runs the code its pickle
                                    names, so load only files you trust
factory is an nn.Module class, a function that returns a module (called without arguments), or a
module object."""

EPILOG = """\
examples:
  revconvert report resnet50 --batch-size 64
  revconvert audit mymodels:TinyNet --input-size 3x32x32
  revconvert convert resnet18 -o converted.pt --only layer3
  revconvert memory converted.pt --batch-size 32 --input-size 160x128"""

INPUT_SIZE_HELP = ("one sample's size: S, HxW or CxHxW for an image model (default 224, i.e. 3x224x224; "
                   "C defaults to the first convolution's input channels); L or CxL for a Conv1d model, "
                   "DxHxW or CxDxHxW for a Conv3d model")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``revconvert: error: ...``), as every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"revconvert: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="revconvert", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"revconvert {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=f"{helptext}.\n\n{DESCRIPTION}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("model", metavar="MODEL", help="torchvision name, module:factory, file.py:factory "
                                                       "or a saved model file")
        sp.add_argument("--input-size", type=parse_input_size, default=(224,), metavar="SIZE",
                        help=INPUT_SIZE_HELP)
        sp.add_argument("--leaf-module", action="append", metavar="NAME",
                        help="trace this submodule (e.g. blocks.1) or module class (e.g. Attention) as one "
                             "opaque step; it then stays stored. Repeatable")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    command("audit", "say which residual blocks can become reversible, and why not")
    c = command("convert", "convert the model and save it with torch.save")
    c.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="file to write the converted model to (its folder must exist)")
    c.add_argument("--only", action="append", metavar="NAME",
                   help="convert only these blocks or prefixes, e.g. --only layer3. Repeatable")
    c.add_argument("--width", type=parse_width, default="match-params", metavar="W",
                   help=f"inner width of F and G: match-params (about the replaced block's parameters), "
                        f"keep (the original inner widths), or a factor > 0 and <= {MAX_WIDTH:g} of the "
                        f"original inner widths (default: %(default)s)")
    c.add_argument("--width-multiple", type=_multiple, default=32, metavar="N",
                   help="round inner widths of F and G to multiples of N (or N/2, N/4... where N would move a "
                        "block more than 10%% from its parameters), which GPUs and vectorised CPU "
                        "kernels run fastest; 1 turns rounding off (default: %(default)s)")
    c.add_argument("--compile", action="store_true",
                   help="run the couplings through torch.compile inside the reversible segments (a "
                        "coupling of conv/norm/ReLU layers as three compiled calls per step, other F and G "
                        "call by call); compiles on the first training step. Not yet faster than eager "
                        "where measured (README, Speed)")
    c.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA, each reversible segment captures its training step as two CUDA graphs and "
                        "replays them (ConvertConfig(cuda_graphs=True)): the same arithmetic without launching "
                        "each kernel from the host; the graphs' memory is not in the memory estimate")
    c.add_argument("--plan", metavar="JSON",
                   help="convert as a plan written by revconvert plan -o says (sets the conversion options)")
    c.add_argument("--always-save", action="store_true",
                   help="write the output even when no block was converted (by default a model without "
                        "a convertible block is not copied to disk)")
    _conversion_flags(c)
    for name, helptext in (("memory", "estimate training memory, original vs converted"),
                           ("report", "the main job: audit, conversion and memory on one page")):
        m = command(name, helptext)
        m.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                       help="samples per training step (default: %(default)s)")
        m.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default=None,
                       help="add this optimizer's state and step (default: none, i.e. forward and backward only)")
        m.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                       help="parameter and input dtype (default: %(default)s)")
        _conversion_flags(m)
        if name == "memory":
            m.add_argument("--plot", metavar="PNG", help="also draw the profile to this file "
                                                         "(needs matplotlib: pip install 'revconvert[plot]')")
        else:
            m.add_argument("--memory", metavar="SIZE",
                           help="also plan the conversion that fits SIZE per training step (e.g. 24GiB)")
    sp = command("plan", "the conversion that fits a memory budget at the least extra FLOPs")
    sp.add_argument("--memory", required=True, metavar="SIZE",
                    help="memory for one training step beyond the parameters, e.g. 24GiB or 512MiB")
    sp.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                    help="batch to fit (default: the largest that fits within --max-flops-ratio)")
    sp.add_argument("--max-flops-ratio", type=_ratio, default=None, metavar="R",
                    help="most step FLOPs over the original's, e.g. 1.2 (needed without --batch-size)")
    sp.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default=None,
                    help="add this optimizer's state and step (default: none)")
    sp.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                    help="parameter and input dtype (default: %(default)s)")
    sp.add_argument("-o", "--output", metavar="JSON", help="write the plan (for revconvert convert --plan)")
    sp.add_argument("--pair-blocks", action="store_true",
                    help="plan for couplings of two blocks each (revconvert convert --pair-blocks): half the "
                         "layers, faster where kernel launches set the pace")
    return p


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 1.2, got {text!r}") from None
    if not 1.0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least 1 (the original's FLOPs), got {text!r}")
    return value


def _plan_file(path: str) -> dict[str, Any]:
    """The JSON a plan was written to, read before any model is built."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"--plan {path}: cannot read a plan from it ({e})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--plan {path}: not a plan written by revconvert plan -o")
    return data


def _conversion_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checkpoint-stored", action="store_true",
                    help="also run the stored parts (stem, projection blocks) under activation "
                         "checkpointing: less memory, their forward runs twice")
    sp.add_argument("--keep", choices=KEEP_CHOICES, default=None,
                    help="couplings keep these outputs from the forward, so the backward recomputes less "
                         "(every coupling, or those --recompute-budget picks; default: none)")
    sp.add_argument("--recompute-budget", type=_budget, default=None, metavar="FRACTION",
                    help="most extra FLOPs per step the memory-saving backward may cost, as a fraction of "
                         "ordinary autograd (e.g. 0.2); couplings keep outputs until it fits")
    sp.add_argument("--pair-blocks", action="store_true",
                    help="build each coupling from two consecutive blocks (F from one, G from the next) "
                         "instead of F and G both from one block: half the layers, so a step launches "
                         "about half the kernels (faster where launches set the pace, as on GPUs); "
                         "a run of odd length ends with a coupling of F alone")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite (a fraction of the ordinary step's FLOPs, "
                                         f"e.g. 0.2), got {text!r}")
    return value


def _multiple(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 8, got {text!r}") from None
    if not 1 <= value <= 128:
        raise argparse.ArgumentTypeError(f"must be from 1 to 128 (1: no rounding), got {text!r}")
    return value


# --------------------------------------------------------------------------------------------- #
# running a command
# --------------------------------------------------------------------------------------------- #
def _run(args: argparse.Namespace) -> int:
    # Checks that need no model come first: a typo must not cost a conversion.
    output = check_output(args.output) if args.command == "convert" or getattr(args, "output", None) else None
    if getattr(args, "plot", None):
        check_output(args.plot, "--plot")
    plan_data = _plan_file(args.plan) if getattr(args, "plan", None) else None
    if plan_data is not None and (args.only or args.checkpoint_stored or args.keep or args.recompute_budget is not None
                                  or args.pair_blocks):
        raise CLIError("--plan sets the conversion; do not combine it with --only, --checkpoint-stored, --keep, "
                       "--recompute-budget or --pair-blocks")
    if args.command == "plan" and args.batch_size is None and args.max_flops_ratio is None:
        raise CLIError("give --batch-size, or --max-flops-ratio to find the largest batch that fits")
    if getattr(args, "memory", None):
        from .memory.plan_report import parse_bytes  # lazy: keeps torch out of the CLI start-up

        try:
            parse_bytes(args.memory)
        except ValueError as e:
            raise CLIError(f"--memory: {e}") from None
    model = load_model(args.model)
    shape = input_shape_for(model, args.input_size)
    trace: dict[str, Any] = {}
    if args.leaf_module:
        trace["leaf_modules"] = leaf_modules_for(model, args.leaf_module)

    import torch

    import revconvert  # lazy: keeps torch out of the CLI start-up

    example = (1, *shape)
    if args.command == "audit":
        report = revconvert.audit(model, example, **trace)
        return _emit(args, report.to_dict(), [str(report)])
    if args.command == "plan":
        plan = _make_plan(args, model, shape, args.batch_size)
        text = [str(plan)]
        if output is not None:
            output.write_text(json.dumps(plan.to_dict(), indent=2))
            text += ["", f"plan written to {output} (revconvert convert MODEL --plan {output})"]
        return _emit(args, plan.to_dict(), text)

    config = revconvert.ConvertConfig(checkpoint_stored=args.checkpoint_stored, keep=args.keep,
                                      recompute_budget=args.recompute_budget, pair_blocks=args.pair_blocks,
                                      **trace)
    if args.command == "convert":
        from dataclasses import replace

        if plan_data is not None:
            from .memory.plan_report import config_from_dict  # lazy: keeps torch out of the CLI start-up

            config = replace(config_from_dict(plan_data), **trace)
        else:
            config = replace(config, only=tuple(args.only) if args.only else None)
        config = replace(config, width=args.width, width_multiple=args.width_multiple, compile=args.compile,
                         cuda_graphs=args.cuda_graphs)
        converted = revconvert.convert(model, example, config=config)
        summary = converted.revconvert_summary
        written = bool(summary.converted_blocks) or args.always_save
        text = [str(summary), ""]
        if written:
            torch.save(converted, output)
            text.append(f"saved to {output} (load with torch.load(path, weights_only=False), or pass the "
                        f"file to revconvert memory/audit)")
        else:
            text.append(f"nothing was converted, so {output} was not written (the copy would equal the "
                        f"original); pass --always-save to write it anyway")
        return _emit(args, {**summary.to_dict(), "output": str(output) if written else None}, text)

    dtype = getattr(torch, args.dtype)
    profile = revconvert.memory_profile(model, input_size=shape, batch_size=args.batch_size, dtype=dtype,
                                        optimizer=args.optimizer, config=config)
    if args.command == "report":
        report = revconvert.audit(model, example, **trace)
        # the batch memory_profile converted at, so that a budget warning reads the same and shows once
        summary = revconvert.convert(model, (args.batch_size, *shape), config=config).revconvert_summary
        out = {"audit": report.to_dict(), "conversion": summary.to_dict(), "memory": profile.to_dict()}
        text = ["== Audit ==", report.summary(), "", "== Conversion ==", str(summary), "",
                f"== Memory (batch {args.batch_size}, {'x'.join(map(str, shape))}) ==", str(profile)]
        hint = None if args.pair_blocks else _pairing_hint(summary)
        if hint:
            text += ["", hint]
        if args.memory:
            plan = _make_plan(args, model, shape, args.batch_size)
            out["plan"] = plan.to_dict()
            text += ["", f"== Plan for {args.memory} ==", str(plan)]
        return _emit(args, out, text)
    _emit(args, profile.to_dict(), [str(profile)])
    if args.plot:
        try:
            profile.plot(args.plot)
        except ImportError:
            # The table is already out: say in one line why the plot is not.
            _error("--plot needs matplotlib, which is not installed: pip install 'revconvert[plot]' "
                   "(the table above is complete; no plot was written)")
            return 1
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _pairing_hint(summary: Any) -> str | None:
    """One line on what ``--pair-blocks`` would change for this conversion, or None where it would
    change nothing (every run a single block, which stays a full coupling)."""
    from .passes.convert import coupling_groups  # lazy: keeps torch out of the CLI start-up

    now = sum(summary.couplings.get(seg, len(blocks)) for seg, blocks in summary.segments.items())
    paired = sum(len(coupling_groups(blocks, True)) for blocks in summary.segments.values())
    if paired >= now:
        return None
    return (f"hint: --pair-blocks builds each coupling from two blocks (F from one, G from the next): "
            f"{paired} coupling{'s' if paired != 1 else ''} instead of {now}, the layers of paired blocks run "
            f"once instead of twice, so a step launches fewer kernels at about the same memory (run report "
            f"again with it to see the step cost). Where launches set the pace, as on GPUs, that is faster: "
            f"resnet152 at batch 32 on an H200 took 1.27x-1.35x the original's step time with it, 2.2x-2.4x "
            f"without (README, Speed).")


def _make_plan(args: argparse.Namespace, model: Any, shape: tuple[int, ...], batch: int | None) -> Any:
    import torch

    import revconvert  # lazy: keeps torch out of the CLI start-up

    return revconvert.plan_memory(model, args.memory, input_size=shape, batch_size=batch,
                                  optimizer=args.optimizer, dtype=getattr(torch, args.dtype),
                                  max_flops_ratio=getattr(args, "max_flops_ratio", None),
                                  pair_blocks=args.pair_blocks)


def _emit(args: argparse.Namespace, data: dict[str, Any], text: list[str]) -> int:
    print(json.dumps(data, indent=2, default=str) if args.json else "\n".join(text), flush=True)
    return 0


# --------------------------------------------------------------------------------------------- #
# messages: Python-facing advice worded for the command line, one line each
# --------------------------------------------------------------------------------------------- #
# (pattern, replacement): the library's messages speak to Python callers; on the command line the
# same advice names flags. Rules are data; the replacement may use {model}.
_CLI_WORDING: tuple[tuple[str, str], ...] = (
    (r"pass leaf_modules=\['([^']+)'\]", r"pass --leaf-module \1"),
    (r"pass leaf_modules=\[SomeModuleType\]", "pass --leaf-module NAME (a submodule or module class)"),
    (r"leaf_modules=\[[^\]]*\]", "--leaf-module NAME"),
    (r", or concrete_args=\.\.\. to fix", ", or (from Python only) concrete_args=... to fix"),
    (r"run revconvert\.audit\(model\)", "run revconvert audit {model}"),
    (r"ConvertConfig\.only names", "--only names"),
    (r"ConvertConfig\.width_multiple", "--width-multiple"),
    (r"ConvertConfig\.width", "--width"),
    (r"check that example_input has the shape the model expects \(e\.g\. \(1, 3, 224, 224\) for an image "
     r"model\)", "check --input-size (e.g. 3x224x224 for an image model)"),
    (r"use batch_size >= 2 or a larger input_size", "use --batch-size 2 or more, or a larger --input-size"),
    # messages name the function that raised; the tool's own prefix says enough
    (r"^revconvert\.\w+: ", ""),
    (r"^memory_profile: ", ""),
)


def _for_cli(message: str, model: str = "MODEL") -> str:
    """One line: the first line of ``message`` (and its Hint line), worded for the command line."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    hint = next((line for line in lines[1:] if line.startswith("Hint:")), None)
    text = lines[0] + (f" {hint}" if hint else "")
    for pattern, replacement in _CLI_WORDING:
        text = re.sub(pattern, replacement.replace("{model}", model), text)
    return text


def _error(message: str) -> None:
    print(f"revconvert: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revconvert`` console script and of ``python -m revconvert``."""
    args = _parser().parse_args(argv)
    seen: set[str] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = _for_cli(str(message), args.model)
        if text not in seen:  # report converts twice (estimate and summary): say it once
            seen.add(text)
            print(f"revconvert: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            return _run(args)
        except CLIError as e:
            _error(str(e))
        except Exception as e:
            from .errors import RevConvertError  # lazy: keeps torch out of the CLI start-up

            # Errors a user can cause: the library raises its own errors or ValueError with a hint.
            if not isinstance(e, (RevConvertError, ValueError, ImportError)):
                raise
            _error(_for_cli(str(e), args.model))
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
