"""Keeping chosen outputs of F and G from the forward, so the backward's recomputation skips those ops.

The recomputation of a coupling re-runs every op of F and G. Some ops are worth keeping instead: a 3x3
convolution of a bottleneck does about half its FLOPs while its output is the block's narrowest
tensor. A *keep policy* says which ops.

Two mechanisms carry it out, both with exact gradients:

- **Module level** (the named policies, e.g. ``"spatial-convs"``): the policy also selects modules
  (``policy.select_module``). In the forward, each selected module's output is recorded as it
  returns; in the recomputation, the module's call returns the recorded output through
  :class:`KeptConvolution`, an autograd Function whose backward is the convolution's own
  (``aten.convolution_backward`` on the recomputed input and the weight). No Python runs per aten op.
  An F or G that runs through direct calls (``_direct.DirectSequential``) makes the same record in
  its direct forward and hands the outputs back in its direct backward, without module calls or an
  autograd graph; either record serves either replay.
- **Op level** (a custom ``policy(func, args, kwargs)``): :class:`Record` and :class:`Replay`,
  ``TorchDispatchMode`` classes below autograd, keep and hand back the outputs of the selected aten ops,
  so the recomputed graph still records each op's backward node. This runs Python for every aten op
  of the coupling: it saves FLOPs but, on small kernels, costs more time than it saves. The same
  mechanism backs PyTorch's selective activation checkpointing.

Kept tensors are saved through ``ctx.save_for_backward``, so saved-tensor hooks (and revconvert's
memory tools) count them. :func:`recording` and :func:`replaying` choose the mechanism.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KEEP_POLICIES", "MIN_KEPT_FLOPS", "KeepPolicy", "keep_spatial_convolutions", "kept_modules",
           "recording", "replaying", "resolve_keep"]

KeepPolicy = Callable[[Any, tuple, dict], bool]
"""``policy(func, args, kwargs) -> bool``: keep the output of this aten op call (``func`` is an
``OpOverload`` such as ``torch.ops.aten.convolution.default``; ``args`` are its tensor arguments)."""


def keep_spatial_convolutions(func: Any, args: tuple, kwargs: dict) -> bool:
    """Keep convolutions whose kernel is larger than 1x1 (the 3x3 convs of basic and bottleneck blocks).

    Per byte kept they save the most recomputation: a convolution's FLOPs per output element are
    ``2 * C_in / groups * kernel area``, so a 3x3 conv saves nine times what a 1x1 conv of the same
    width saves for the same bytes. A call smaller than ``MIN_KEPT_FLOPS`` for its device is
    recomputed instead: handing its output back would cost more time than running it.
    """
    if func is not torch.ops.aten.convolution.default:
        return False
    weight = args[1]
    return weight.dim() > 2 and math.prod(weight.shape[2:]) > 1


def _is_spatial_convolution(module: nn.Module) -> bool:
    """The modules :func:`keep_spatial_convolutions` keeps at module level: kernel larger than 1x1,
    not transposed, explicit zero padding (other padding modes and ``"same"`` pad outside the
    convolution op or asymmetrically, and are recomputed instead)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and math.prod(module.kernel_size) > 1)


# The module-level selection of the same policy: what the fast mechanism keeps.
keep_spatial_convolutions.select_module = _is_spatial_convolution  # type: ignore[attr-defined]

KEEP_POLICIES: dict[str, KeepPolicy] = {"spatial-convs": keep_spatial_convolutions}


def resolve_keep(keep: str | KeepPolicy | None, where: str) -> KeepPolicy | None:
    """Turn a policy name or callable into a callable; a clear error for anything else."""
    if keep is None or callable(keep):
        return keep
    if isinstance(keep, str) and keep in KEEP_POLICIES:
        return KEEP_POLICIES[keep]
    raise ValueError(f"{where}: keep must be None, a callable policy(func, args, kwargs) -> bool or one of "
                     f"{sorted(KEEP_POLICIES)}, got {keep!r}")


def _signature(func: Any, args: tuple) -> tuple:
    shapes = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
    return (func, shapes)


class Record(TorchDispatchMode):
    """Run ops as usual and keep the outputs of those the policy selects, in call order."""

    def __init__(self, policy: KeepPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.kept: list[torch.Tensor] = []
        self.signatures: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and self.policy(func, args, kwargs):
            self.kept.append(out)
            self.signatures.append(_signature(func, args))
        return out


class Replay(TorchDispatchMode):
    """Hand back recorded outputs instead of running the selected ops; run every other op."""

    def __init__(self, policy: KeepPolicy, kept: list[torch.Tensor], signatures: list[tuple], where: str) -> None:
        super().__init__()
        self.policy = policy
        self.kept = kept
        self.signatures = signatures
        self.where = where
        self.used = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        kwargs = kwargs or {}
        if not self.policy(func, args, kwargs):
            return func(*args, **kwargs)
        if self.used >= len(self.kept) or self.signatures[self.used] != _signature(func, args):
            raise RuntimeError(
                f"ReversibleSegment: {self.where} ran a different sequence of kept ops in the backward "
                f"recomputation than in the forward (at kept op {self.used}: {func}). F and G must compute "
                "the same ops on every call; use keep=None for this coupling."
            )
        out = self.kept[self.used]
        self.used += 1
        # A fresh alias: autograd attaches the recomputed op's backward node to it, not to the kept one.
        return out.detach()

    def check_done(self) -> None:
        if self.used != len(self.kept):
            raise RuntimeError(
                f"ReversibleSegment: {self.where} ran {self.used} kept op(s) in the backward recomputation "
                f"but {len(self.kept)} in the forward; F and G must compute the same ops on every call"
            )


# --- module level ---------------------------------------------------------------------------------


def kept_modules(policy: KeepPolicy | None, module: nn.Module) -> tuple[nn.Module, ...] | None:
    """The submodules of ``module`` whose outputs ``policy`` keeps, or None for an op-level policy."""
    select = getattr(policy, "select_module", None)
    if select is None:
        return None
    return tuple(m for m in module.modules() if select(m))


class KeptConvolution(torch.autograd.Function):
    """``conv(x)`` without running it: returns the output kept from the forward, with the
    convolution's own backward (``aten.convolution_backward`` on ``x`` and the weight).

    The convolution ran in the kept output's dtype (autocast casts its operands); the backward runs
    in that dtype too, and casts each gradient back to its operand's dtype, as autocast's casts do.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kept, stride, padding, dilation, groups):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.conf = (None if bias is None else (list(bias.shape), bias.dtype), stride, padding, dilation, groups,
                    kept.dtype)
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        bias, stride, padding, dilation, groups, dtype = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(dtype), x.to(dtype), weight.to(dtype), None if bias is None else bias[0], stride, padding,
            dilation, False, [0] * len(stride), groups, mask)
        gx = None if gx is None else gx.to(x.dtype)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias[1])
        return gx, gw, gb, None, None, None, None, None


# The smallest convolution (FLOPs per call) worth keeping, per device type. Handing a kept output back
# costs a Python autograd Function (tens of microseconds of host time); a smaller convolution is
# cheaper to recompute. On the CPU that is about 4 MFLOP (benchmarks/speed.py, launch-bound proxy).
# On an H200, resnet152 at batch 32 is host-bound and keeping its 4.3 GFLOP convolutions made the
# step 0.91-1.28x as long: the threshold sits above them, at 1e10.
MIN_KEPT_FLOPS: dict[str, float] = {"cpu": 4e6, "cuda": 1e10}
keep_spatial_convolutions.min_flops = MIN_KEPT_FLOPS  # type: ignore[attr-defined]


def worth_keeping(thresholds: dict[str, float] | None, conv: nn.Module, out: torch.Tensor) -> bool:
    """Whether ``conv``'s output ``out`` is large enough to keep under ``thresholds`` (None: any)."""
    if thresholds is None:
        return True
    device = out.device.type
    flops = 2 * out.numel() * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return flops >= thresholds.get(device, 0.0)


def kept_thresholds(policy: KeepPolicy, keep_small: bool) -> dict[str, float] | None:
    """The smallest call worth keeping per device (:data:`MIN_KEPT_FLOPS`) under ``policy``; None
    (keep every call) with ``keep_small`` or for a policy without ``min_flops``."""
    return None if keep_small else getattr(policy, "min_flops", None)


class _ModuleRecord:
    """Records the outputs of ``modules`` in call order while installed (see :func:`recording`);
    a call too small to be worth keeping records None and is recomputed."""

    def __init__(self, modules: Sequence[nn.Module], thresholds: dict[str, float] | None) -> None:
        # An output an in-place op changes right after (conv -> ReLU(inplace=True)) cannot be
        # kept: the replay notices the changed version and recomputes that call.
        self.modules = modules
        self.thresholds = thresholds
        self.kept: list[torch.Tensor | None] = []
        self.versions: list[int | None] = []

    def install(self) -> None:
        for m in self.modules:
            forward = type(m).forward

            def record(x, *args, _m=m, _forward=forward, **kwargs):  # noqa: ANN001, ANN202
                out = _forward(_m, x, *args, **kwargs)
                if worth_keeping(self.thresholds, _m, out):
                    self.kept.append(out)
                    self.versions.append(out._version)
                else:
                    self.kept.append(None)
                    self.versions.append(None)
                return out

            m.__dict__["forward"] = record

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)


class _ModuleReplay:
    """Hands the recorded outputs back through :class:`KeptConvolution` (see :func:`replaying`)."""

    def __init__(self, modules: Sequence[nn.Module], kept: Sequence[torch.Tensor], versions: Sequence[int],
                 where: str) -> None:
        self.modules, self.kept, self.versions, self.where = modules, kept, versions, where
        self.used = 0

    def install(self) -> None:
        for m in self.modules:
            def replay(x, *args, _m=m, _forward=type(m).forward, **kwargs):  # noqa: ANN001, ANN202
                if self.used >= len(self.kept):
                    raise keep_mismatch(self.where, self.used, len(self.kept))
                kept, version = self.kept[self.used], self.versions[self.used]
                self.used += 1
                # Too small to keep, or changed in place after it was kept (an in-place op right
                # after the convolution): recompute it, which is always exact.
                if kept is None or kept._version != version:
                    return _forward(_m, x, *args, **kwargs)
                return KeptConvolution.apply(x, _m.weight, _m.bias, kept, list(_m.stride), list(_m.padding),
                                             list(_m.dilation), _m.groups)

            m.__dict__["forward"] = replay

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)

    def check_done(self) -> None:
        if self.used != len(self.kept):
            raise keep_mismatch(self.where, self.used, len(self.kept))


def keep_mismatch(where: str, used: int, recorded: int) -> RuntimeError:
    return RuntimeError(
        f"ReversibleSegment: {where} ran {used} kept op(s) in the backward recomputation but {recorded} in "
        "the forward (or more); F and G must compute the same ops on every call, or use keep=None")


# --- choosing the mechanism -----------------------------------------------------------------------


class Kept:
    """What one call of F or G kept: per kept op, its output (None: not worth keeping, recomputed)
    and what replaying it checks (module level: version counters; op level: op signatures)."""

    def __init__(self, tensors: list[torch.Tensor | None], check: list) -> None:
        self.tensors = tensors
        self.check = check

    def saved(self) -> list[torch.Tensor]:
        """The tensors to save for backward."""
        return [t for t in self.tensors if t is not None]

    def emptied(self) -> Kept:
        """A copy that remembers where the tensors go, without holding them (see :meth:`refill`)."""
        return Kept([None if t is None else _SLOT for t in self.tensors], self.check)

    def refill(self, saved: Iterator[torch.Tensor]) -> None:
        """Put the saved tensors back in their places, in order."""
        self.tensors = [None if t is None else next(saved) for t in self.tensors]


_SLOT = object()  # a place for a saved tensor in an emptied Kept


@contextlib.contextmanager
def recording(policy: KeepPolicy, module: nn.Module, modules: Sequence[nn.Module] | None = None, *,
              keep_small: bool = False) -> Iterator[Kept]:
    """Run the body (a call of ``module``) keeping the outputs ``policy`` selects.

    ``modules`` is ``kept_modules(policy, module)`` when the caller has it cached. ``keep_small``
    keeps calls below the policy's ``min_flops`` too.
    """
    modules = kept_modules(policy, module) if modules is None else modules
    if modules is None:
        with Record(policy) as rec:
            kept = Kept(rec.kept, rec.signatures)
            yield kept
        return
    rec = _ModuleRecord(modules, kept_thresholds(policy, keep_small))
    rec.install()
    try:
        yield Kept(rec.kept, rec.versions)
    finally:
        rec.remove()


@contextlib.contextmanager
def replaying(policy: KeepPolicy, module: nn.Module, kept: Kept, where: str,
              modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Run the body (a call of ``module``) with the kept outputs handed back instead of recomputed."""
    modules = kept_modules(policy, module) if modules is None else modules
    if modules is None:
        with Replay(policy, kept.tensors, kept.check, where) as rep:
            yield
        rep.check_done()
        return
    rep = _ModuleReplay(modules, kept.tensors, kept.check, where)
    rep.install()
    try:
        yield
    finally:
        rep.remove()
    rep.check_done()
