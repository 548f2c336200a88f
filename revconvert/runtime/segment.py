"""ReversibleSegment: a run of reversible couplings whose activations are recomputed, not stored."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._function import Plan, ReversibleFunction, check_compile_options, join_halves, make_plan
from ._graphs import GraphedFunction, SegmentGraphs
from ._state import capture_rng, cuda_devices_of, frozen_running_stats, module_generation, recompute_needs, \
    replay_rng
from .coupling import ReversibleCoupling

__all__ = ["ReconstructionError", "ReversibleSegment", "ordinary_autograd", "ordinary_autograd_enabled"]

_ORDINARY = contextvars.ContextVar("revconvert_ordinary_autograd", default=False)


@contextlib.contextmanager
def ordinary_autograd() -> Iterator[None]:
    """Run every :class:`ReversibleSegment` with ordinary autograd (all activations stored).

    For debugging and exactness checks; the result is the same function, only memory differs. The
    per-segment switch is ``segment.use_reversible_backward = False``.

    Example:
        >>> with revconvert.ordinary_autograd():
        ...     loss = model(images).sum()
        >>> loss.backward()      # ordinary backward, even outside the block
    """
    token = _ORDINARY.set(True)
    try:
        yield
    finally:
        _ORDINARY.reset(token)


def ordinary_autograd_enabled() -> bool:
    """True inside :func:`ordinary_autograd` (checkpointed parts of a converted model honour it too)."""
    return _ORDINARY.get()


@dataclass(frozen=True)
class ReconstructionError:
    """How far coupling ``index``'s input, reconstructed as the backward pass would, is from the truth.

    Attributes:
        index: position of the coupling in the segment.
        max_abs: largest absolute error over both halves.
        max_rel: ``max_abs`` divided by the largest absolute value of the true input.
    """

    index: int
    max_abs: float
    max_rel: float


class ReversibleSegment(nn.Module):
    """A run of :class:`ReversibleCoupling` on one tensor, with RevNet's memory-saving backward.

    The input is split into halves along ``dim``, the couplings run in order, the halves are
    concatenated and, if given, ``exit_activation`` is applied. When autograd needs the segment
    (grad enabled and the input or a parameter requires grad), the run is one custom autograd
    Function that stores only its output and reconstructs each coupling's input in the backward pass
    (one extra forward of F and G per step). Batch-norm running statistics are updated once per step,
    dropout masks are replayed and the forward's autocast state is used for the recomputation, so
    gradients equal those of ordinary autograd up to reconstruction rounding.

    Under ``torch.no_grad()``, ``torch.inference_mode()`` or when nothing requires grad it is a plain
    forward. Under ``torch.compile`` the Function is a graph break: it runs eagerly, running its
    couplings compiled if ``compile`` is set.

    Args:
        couplings: the couplings, applied first to last.
        dim: dimension split into halves (channels, 1, for NCHW images); its size must be even.
        exit_activation: module applied to the result, e.g. the ReLU that followed the original
            residual add. It is applied out of place (an in-place module gets a copy of the output)
            because the Function's output is saved for the backward pass.
        compile: run the couplings through ``torch.compile`` (True, or a dict of its options such
            as ``{"mode": "max-autotune-no-cudagraphs"}``): fused norm-activation kernels, fewer
            launches. A coupling whose F and G are Sequentials of convolutions, batch norms and ReLUs
            runs as three compiled calls per training step (its forward, and one backward step per
            function: recomputation, reconstruction and gradients in one graph; two for a half
            coupling); other F and G run
            compiled call by call, in the forward and the recomputation. F or G that draw random
            numbers (dropout) and couplings that keep outputs stay eager. Each structure compiles on
            first use.
        cuda_graphs: on CUDA, capture the segment's training forward and backward once as two CUDA
            graphs and replay them at every later step (two launches instead of one per kernel;
            see ``runtime/_graphs.py``). The same arithmetic; a new input shape, autocast state,
            train/eval mode or ``requires_grad`` captures again. Where a graph cannot reproduce the
            eager step (not on CUDA, dropout, ``keep``, ``compile``, hooks, ...) the segment runs
            eagerly and says why in a warning. Costs memory the estimate does not include: the
            graphs' pool (one coupling's working set, the segment's output and its parameters'
            gradients) and a copy of the input and of the output's gradient.

    Attributes:
        use_reversible_backward: ``False`` makes this segment use ordinary autograd.
        cuda_graphs: whether training steps on CUDA replay captured graphs; may be changed between
            steps (see ``cuda_graphs`` above).
        compile_options: the ``torch.compile`` options F and G run with, or None (eager); may be
            changed between steps.
        apply_exit_activation: ``False`` leaves ``exit_activation`` to the caller, which calls
            ``segment.exit_activation`` itself. A conversion with ``checkpoint_stored=True`` does
            this so that the activation runs inside the next checkpointed part: the activation's
            output is then recomputed, and only the segment's output is kept.
        source_blocks, coupling_blocks: set by :func:`revconvert.convert` only: the names of the
            residual blocks the segment replaces, and those each coupling was built from (one block,
            or two with ``ConvertConfig(pair_blocks=True)``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from revconvert import ReversibleCoupling, ReversibleSegment
        >>> def half():  # one residual function on 32 of the 64 channels of a resnet18 layer1 block
        ...     return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        >>> seg = ReversibleSegment([ReversibleCoupling(half(), half()) for _ in range(2)],
        ...                         exit_activation=nn.ReLU())
        >>> seg(torch.randn(8, 64, 56, 56)).sum().backward()
    """

    def __init__(
        self,
        couplings: Sequence[ReversibleCoupling],
        *,
        dim: int = 1,
        exit_activation: nn.Module | None = None,
        compile: bool | Mapping[str, Any] = False,  # noqa: A002 - the natural name, as torch's
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        couplings = list(couplings)
        for k, coupling in enumerate(couplings):
            if not isinstance(coupling, ReversibleCoupling):
                raise TypeError(
                    f"ReversibleSegment: couplings[{k}] is a {type(coupling).__name__}, expected a "
                    "ReversibleCoupling(F, G) (or ReversibleCoupling(F), a half coupling)"
                )
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"ReversibleSegment: dim must be an int, got {dim!r}")
        if exit_activation is not None and not isinstance(exit_activation, nn.Module):
            raise TypeError(
                f"ReversibleSegment: exit_activation must be an nn.Module or None, got "
                f"{type(exit_activation).__name__}"
            )
        self.couplings = nn.ModuleList(couplings)
        self.dim = dim
        self.exit_activation = exit_activation
        self.use_reversible_backward: bool = True
        self.apply_exit_activation: bool = True
        self.compile_options: dict[str, Any] | None = _compile_options(compile)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"ReversibleSegment: cuda_graphs must be a bool, got {cuda_graphs!r}")
        self.cuda_graphs: bool = cuda_graphs
        self._plan: Plan | None = None
        self._graphs: SegmentGraphs | None = None

    def __getstate__(self) -> dict:
        # The plan and the captured graphs hold references to modules, parameters and device memory;
        # copies and pickles make their own.
        return {**self.__dict__, "_plan": None, "_graphs": None}

    def plan(self, dim: int) -> Plan:
        """The Function's plan for this segment, made once and remade only when a module changed
        (a submodule, parameter or buffer registered anywhere, see ``module_generation``)."""
        plan = getattr(self, "_plan", None)  # absent in segments pickled by older versions
        options = getattr(self, "compile_options", None)
        if plan is None or plan.dim != dim or plan.generation != module_generation() \
                or plan.compile_options != options:
            plan = self._plan = make_plan(self.couplings, dim, options)
        return plan

    def reset_cuda_graphs(self) -> None:
        """Drop the captured CUDA graphs (``cuda_graphs``); the next training step captures again.

        A captured step sees changes to parameters' and buffers' values, and to modules' plain
        attributes (``momentum``, ``eps``, ...); call this after a change it cannot see, e.g. a
        module attribute that holds an object.
        """
        self._graphs = None

    def extra_repr(self) -> str:
        graphs = ", cuda_graphs=True" if getattr(self, "cuda_graphs", False) else ""
        return f"dim={self.dim}, use_reversible_backward={self.use_reversible_backward}{graphs}"

    def _split_dim(self, x: torch.Tensor) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ReversibleSegment: expected one tensor, got {type(x).__name__}")
        if not -x.dim() <= self.dim < x.dim():
            raise ValueError(
                f"ReversibleSegment: dim={self.dim} is out of range for an input of shape {tuple(x.shape)}"
            )
        dim = self.dim % x.dim()
        if x.shape[dim] % 2:
            raise ValueError(
                f"ReversibleSegment: the input has odd size {x.shape[dim]} along dim {dim} (shape "
                f"{tuple(x.shape)}); couplings split it into two equal halves, so it must be even"
            )
        return dim

    def _plain(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim)
        for coupling in self.couplings:
            x1, x2 = coupling(x1, x2)
        return join_halves(x1, x2, dim, x)

    def _wants_reversible(self, x: torch.Tensor, dim: int) -> bool:
        if not self.use_reversible_backward or _ORDINARY.get() or not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.plan(dim).params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the couplings on the halves of ``x`` and return one tensor of the same shape."""
        dim = self._split_dim(x)
        if self._wants_reversible(x, dim):
            y = _apply_reversible(self, self.plan(dim), x)
            act = self.exit_activation if self.apply_exit_activation else None
            if act is None:
                return y
            # The output is saved for backward; an in-place activation must not overwrite it.
            return act(y.clone()) if getattr(act, "inplace", False) else act(y)
        y = self._plain(x, dim)
        return y if self.exit_activation is None or not self.apply_exit_activation else self.exit_activation(y)

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> list[ReconstructionError]:
        """Measure how exactly each coupling's input is reconstructed, in ``x``'s dtype.

        Runs the segment forward on ``x``, then walks back from the output exactly as the backward
        pass does (each input reconstructed from the previous reconstruction, same dropout masks,
        current train/eval mode and autocast state) and compares with the true inputs. Errors grow
        towards the first coupling; look at ``errors[0]`` before trusting a long segment in low
        precision. The global RNG state and norm running statistics are left as they were.

        Args:
            x: an example input, in the dtype and device to check (float32, bfloat16, float16...).

        Returns:
            One :class:`ReconstructionError` per coupling, first to last.

        Example:
            >>> errs = seg.reconstruction_errors(torch.randn(8, 64, 56, 56).bfloat16())
            >>> max(e.max_rel for e in errs)
        """
        dim = self._split_dim(x)
        devices = cuda_devices_of((x, *self.parameters()))
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=list(devices)))
            stack.enter_context(frozen_running_stats(recompute_needs(self).norms))
            x1, x2 = x.chunk(2, dim)
            inputs, states = [], []
            for coupling in self.couplings:
                inputs.append((x1, x2))
                rng_f = capture_rng(devices)
                y1 = x1 + coupling.F(x2)
                rng_g = capture_rng(devices)
                y2 = x2 if coupling.G is None else x2 + coupling.G(y1)
                states.append((rng_f, rng_g))
                x1, x2 = y1, y2
            errors = []
            for k in reversed(range(len(self.couplings))):
                coupling, (rng_f, rng_g) = self.couplings[k], states[k]
                if coupling.G is not None:
                    with replay_rng(rng_g):
                        x2 = x2 - coupling.G(x1)
                with replay_rng(rng_f):
                    x1 = x1 - coupling.F(x2)
                true1, true2 = inputs[k]
                max_abs = max(_max_abs(x1 - true1), _max_abs(x2 - true2))
                scale = max(_max_abs(true1), _max_abs(true2))
                rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
                errors.append(ReconstructionError(index=k, max_abs=max_abs, max_rel=rel))
        return errors[::-1]


def _compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:  # noqa: A002
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        check_compile_options(dict(compile))
        return dict(compile)
    raise TypeError(f"ReversibleSegment: compile must be a bool or a dict of torch.compile options, got {compile!r}")


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# torch.compile cannot trace the Function (module calls and RNG stashing inside forward); dynamo runs
# it eagerly instead, breaking the graph at each segment. Gradients are unchanged.
@torch.compiler.disable
def _apply_reversible(segment: ReversibleSegment, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    if getattr(segment, "cuda_graphs", False):  # absent in segments pickled by older versions
        graphs = segment.__dict__.get("_graphs")
        if graphs is None:
            graphs = segment.__dict__["_graphs"] = SegmentGraphs()
        step = graphs.step_for(segment, plan, x)
        if step is not None:
            return GraphedFunction.apply(step, x, *plan.params)
    return ReversibleFunction.apply(plan, x, *plan.params)
