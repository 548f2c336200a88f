"""What the command line reads: model specs, input sizes, widths, output paths.

Every check here runs before a model is traced or converted, and fails with :class:`CLIError`
(one line on stderr, exit status 2). Nothing at module level imports torch: ``revconvert --help``
and argument errors must answer without it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "load_model", "parse_input_size", "input_shape_for", "parse_width", "check_output",
           "leaf_modules_for", "MAX_WIDTH"]

MAX_WIDTH = 4.0
"""Largest ``--width`` factor: F and G then have 4x the inner width, about 16x the parameters of
match-params. Larger factors are almost certainly typos (``1e3`` asks for tens of GB)."""

_MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------- #
# MODEL
# --------------------------------------------------------------------------------------------- #
def load_model(spec: str) -> Any:
    """Build or load the model named by ``spec``; returns an ``nn.Module``.

    ``spec`` is one of:

    - a torchvision model name (``resnet50``), built with random weights;
    - ``timm:NAME``: ``timm.create_model(NAME)`` with random weights, for any name timm lists
      (``timm:convnextv2_atto``); an attribute of the ``timm`` package itself is taken first;
    - ``module:factory`` or ``package.module:factory``, imported with the current folder on
      ``sys.path`` (like ``python -m``); ``factory`` is a class, a function returning a module, or a
      module instance, and may be dotted (``zoo:Nets.small``);
    - ``path/to/file.py:factory`` (or ``file.py:factory``): the same, from a file;
    - a file saved by ``revconvert convert`` or ``torch.save(model, path)`` (``.pt``, ``.pth``,
      ``.pkl``, or any existing file). Loading it unpickles it, which runs code named in the file:
      only load files you trust (your own).
    """
    if ":" in spec and not Path(spec).is_file():
        where, _, attr = spec.rpartition(":")  # rpartition: a Windows path has a colon too
        if not where or not attr:
            raise CLIError(f"model {spec!r}: expected module:factory or file.py:factory")
        module = _import_file(where, spec) if _looks_like_file(where) else _import_module(where, spec)
        if where == "timm" and not hasattr(module, attr.split(".")[0]):
            return _timm_model(module, attr, spec)
        return _call_factory(module, attr, spec)
    path = Path(spec)
    if path.suffix == ".py":
        raise CLIError(f"model {spec!r}: name the factory too, e.g. {spec}:MyNet (a class or a function "
                       f"that returns an nn.Module)")
    if path.is_file() or path.suffix in _MODEL_FILE_SUFFIXES:
        return _load_saved(path)
    names = _torchvision_names()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise CLIError(f"unknown model {spec!r} ({hint}); for your own model pass module:factory, "
                       f"file.py:factory or a file saved by revconvert convert")
    import torchvision

    return torchvision.models.get_model(spec, weights=None)


def _timm_model(timm: Any, name: str, spec: str) -> Any:
    """``timm.create_model(name)`` with random weights (timm's model names are not attributes of
    the package: ``timm:resnet50`` means the registered model)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "see timm.list_models()"
        raise CLIError(f"timm has no model {name!r} ({hint})")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as e:
        raise CLIError(f"timm.create_model({name!r}) failed: {type(e).__name__}: {e}") from e


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _looks_like_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_module(name: str, spec: str) -> Any:
    # The console script's sys.path[0] is its own bin folder, not the current one; put the current
    # folder first, as ``python -m`` does, so a model file next to the user is found.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except Exception as e:
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name == name.split(".")[0]:
            hint = f" (looked in {cwd} and on sys.path)"
        raise CLIError(f"cannot import module {name!r} for model {spec!r}: {type(e).__name__}: {e}{hint}") from e


def _import_file(where: str, spec: str) -> Any:
    path = Path(where)
    if not path.is_file():
        raise CLIError(f"model {spec!r}: no such file {where!r}")
    # The file's folder goes on sys.path so that it can import its neighbours, as when it is run.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem if path.stem.isidentifier() else "_revconvert_user_model"
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise CLIError(f"model {spec!r}: cannot import {where!r} as Python")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module  # so that pickling (revconvert convert -o) finds its classes again
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CLIError(f"importing {where} for model {spec!r} failed: {type(e).__name__}: {e}") from e
    return module


def _call_factory(module: Any, attr: str, spec: str) -> Any:
    from torch import nn

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            raise CLIError(f"{getattr(obj, '__name__', spec)!r} has no attribute {part!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CLIError(f"{spec} is a {type(obj).__name__}, not an nn.Module or a function returning one")
    try:
        model = obj()
    except Exception as e:
        raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {e} (the factory is called "
                       f"without arguments)") from e
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_saved(path: Path) -> Any:
    if not path.is_file():
        raise CLIError(f"no such model file {str(path)!r}")
    import torch
    from torch import nn

    # A file from ``revconvert convert`` is a pickled module: loading it needs weights_only=False,
    # which runs the code the pickle names. That is what loading one's own saved model means.
    folder = str(path.resolve().parent)  # the module that defined a pickled class may live there
    for extra in (os.getcwd(), folder):
        if extra not in sys.path:
            sys.path.insert(0, extra)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CLIError(f"{str(path)!r} refers to classes of module {e.name!r}, which is not importable here: "
                       f"run from the folder that holds {e.name}.py, or put that folder on PYTHONPATH") from e
    except Exception as e:
        raise CLIError(f"cannot load {str(path)!r} as a saved model: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise CLIError(f"{str(path)!r} holds a state dict (weights only), not a model; pass the model's "
                       f"factory instead (module:factory or file.py:factory)")
    raise CLIError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")


# --------------------------------------------------------------------------------------------- #
# --input-size
# --------------------------------------------------------------------------------------------- #
def parse_input_size(text: str) -> tuple[int, ...]:
    """argparse type: ``224``, ``160x128``, ``3x224x224`` or up to 4 sizes (C x D x H x W)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(d) for d in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes joined by x, e.g. 224, 160x128 (HxW) or 3x224x224 (CxHxW); got {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    if len(dims) > 4:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(dims)} sizes; one sample has at most 4 (C x D x H x W for a 3-d model), "
            f"the batch is --batch-size")
    return dims


def input_shape_for(model: Any, dims: tuple[int, ...]) -> tuple[int, ...]:
    """One sample's shape from ``--input-size`` and the model's first convolution.

    A model whose first convolution is k-dimensional takes samples of shape (C, *k sizes*): ``dims``
    gives either the k sizes (C is the convolution's in_channels) or C and the k sizes; a single
    number S means S along every dimension. A model without convolutions takes (3, H, W) images.
    """
    from torch import nn

    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    k = len(conv.kernel_size) if conv is not None else 2
    channels = conv.in_channels if conv is not None else 3
    kind = f"{type(conv).__name__} ({conv.in_channels} input channels)" if conv else "no convolution"
    if len(dims) == 1:
        return (channels, *dims * k)
    if len(dims) == k:
        return (channels, *dims)
    if len(dims) == k + 1:
        return dims
    forms = {1: "L or CxL", 2: "S, HxW or CxHxW", 3: "S, DxHxW or CxDxHxW"}[k]
    raise CLIError(f"--input-size {'x'.join(map(str, dims))} does not fit the model (first layer: {kind}); "
                   f"give {forms}")


# --------------------------------------------------------------------------------------------- #
# convert's options
# --------------------------------------------------------------------------------------------- #
def parse_width(text: str) -> str | float:
    """argparse type of ``--width``: match-params, keep, or a factor in (0, MAX_WIDTH]."""
    if text in ("match-params", "keep"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected match-params, keep or a factor such as 0.5, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_WIDTH):
        raise argparse.ArgumentTypeError(f"a factor must be > 0 and <= {MAX_WIDTH:g} (inner width of F and G "
                                         f"relative to the original's), got {text!r}")
    return value


def check_output(text: str, flag: str = "-o") -> Path:
    """An output path (``-o``, ``--plot``): its folder exists and is writable; it is not a folder."""
    path = Path(text)
    if path.is_dir():
        raise CLIError(f"{flag} {text}: is a folder; give a file name, e.g. {path / 'converted.pt'}")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {text}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {text}: folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {text}: file exists and is not writable")
    return path


def leaf_modules_for(model: Any, names: list[str] | None) -> tuple[Any, ...]:
    """``--leaf-module`` values as tracer leaf modules: a submodule's name, or a module class name."""
    if not names:
        return ()
    modules = dict(model.named_modules())
    classes = {type(m).__name__: type(m) for m in modules.values()}
    leaves: list[Any] = []
    for name in names:
        if name in modules and name:
            leaves.append(name)
        elif name in classes:
            leaves.append(classes[name])
        else:
            close = difflib.get_close_matches(name, [n for n in modules if n] + sorted(classes), n=3)
            raise CLIError(f"--leaf-module {name}: the model has no submodule or module class of that name"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
    return tuple(leaves)
