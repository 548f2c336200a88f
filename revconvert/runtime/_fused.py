"""Compiled couplings: a coupling's forward, and each step of its backward, as one compiled graph.

With ``ReversibleSegment(compile=...)`` the simple way to compile is per call of F or G
(:func:`~._function.compiled_call`): three compiled calls per function per step (the forward, the
recomputation recording a graph, and that graph's compiled backward run by the autograd engine), six
per coupling, each paying the compiled function's guards and wrappers on the host. Where F and G are
Sequentials of standard layers (:func:`~._direct.direct_call`), this module compiles larger units
instead, three calls per coupling (two for a half coupling, ``ReversibleCoupling(F)``):

- the forward ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` under no_grad, the modules called as they are
  (running statistics updated by the norms' own code);
- one step of the backward per function, ``x = y - fn(source)`` together with the gradients of
  ``source`` and of ``fn``'s parameters (:func:`step_back`), as an inference graph of the same aten
  ops :class:`~._direct.DirectSequential` calls (convolution, batch norm with batch statistics and
  without running statistics, ReLU, and their backward ops), so that no autograd graph is recorded
  or walked and the compiler fuses the recomputation's elementwise work with the backward's.

The recomputation runs the compiler's kernels, not the forward's, so the reconstruction is exact to
rounding, as it is in eager mode, and gradients match ordinary autograd to rounding (compiled code
is not bitwise eager code). A coupling runs this way only when nothing could tell the difference:
F and G are :class:`~._direct.DirectSequential` calls (no hooks, modes or subclasses), draw no random
numbers, keep no outputs, every norm is in training mode, no in-place ReLU overwrites the function's
input or another ReLU's output (the eager path raises there, and so must this), each function's parameters are its layers' weights
and biases, once each, and the code is not inductor's for a CPU under autocast (see
:meth:`FusedCoupling.usable`). Elsewhere the per-call compiled path runs. Under autocast the
recomputed norms run on a float32 copy of their lower-precision input, as eager kernels accumulate.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from ._direct import DirectSequential, amp_cast, autocast_dtype

__all__ = ["FusedCoupling", "fused_coupling", "step_back"]

_aten = torch.ops.aten


def _fusable(call: object) -> bool:
    """Whether ``call`` (what a plan runs for F or G) can run inside a compiled coupling: a direct call
    whose backward could be made directly (no in-place ReLU overwriting what the backward needs,
    as eagerly, where autograd raises), norms with running statistics and a momentum, and each
    parameter a layer's weight or bias, once."""
    if type(call) is not DirectSequential or not call.vjp_supported():
        return False
    listed: list[nn.Parameter] = []
    for m in call.layers:
        if isinstance(m, nn.BatchNorm2d) and (m.momentum is None or not m.track_running_stats
                                             or m.running_mean is None):
            return False
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            listed += [p for p in (m._parameters.get("weight"), m._parameters.get("bias")) if p is not None]
        if len(m._parameters) > 2:
            return False
    return tuple(listed) == call.params and len({id(p) for p in listed}) == len(listed)


class FusedCoupling:
    """What runs a coupling compiled (see the module docstring): ``forward(x1, x2)`` and
    ``step("F" or "G", source, other, grad, acc)``; ``usable(x)`` says whether a call may use it now.
    ``g_call`` is None for a half coupling (F only): its forward is ``(x1 + F(x2), x2)`` and its
    backward one step, F's."""

    __slots__ = ("f_call", "g_call", "norms", "forward_runner", "step_runner", "inductor")

    def __init__(self, f_call: DirectSequential, g_call: DirectSequential | None,
                 forward_runner: Callable, step_runner: Callable, inductor: bool = False) -> None:
        self.f_call, self.g_call = f_call, g_call
        calls = (f_call,) if g_call is None else (f_call, g_call)
        self.norms = tuple(m for call in calls for m in call.layers if isinstance(m, nn.BatchNorm2d))
        self.forward_runner, self.step_runner = forward_runner, step_runner
        self.inductor = inductor  # compiled by inductor (torch.compile's default backend)

    def usable(self, x: torch.Tensor) -> bool:
        """Whether a call now would behave like the eager one: no observer, training norms, a plain
        floating 4-D tensor; and not inductor's CPU code under autocast.

        Inductor's CPU code for :func:`step_back` under bfloat16 autocast (torch 2.14) gave wrong
        gradients, different from call to call (with ``layout_optimization=False`` or without
        vectorisation they are right, and so is the same graph run by ``aot_eager``; reproduced by
        ``benchmarks/inductor_cpu_check.py``): there the per-call path runs, which was checked. CUDA code comes from another code generator (Triton) and has not
        been checked on a GPU yet.
        """
        if self.inductor and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return False
        return x.dim() == 4 and x.is_floating_point() and type(x) is torch.Tensor \
            and all(m.training for m in self.norms) and not self.f_call.observed() \
            and (self.g_call is None or not self.g_call.observed())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.g_call is None:
            return self.forward_runner(self.f_call.module, x1, x2), x2
        return self.forward_runner(self.f_call.module, self.g_call.module, x1, x2)

    def step(self, name: str, source: torch.Tensor, other: torch.Tensor, grad: torch.Tensor,
             acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """:func:`step_back` for F or G under the current autocast state, without recording."""
        module = (self.f_call if name == "F" else self.g_call).module
        amp = autocast_dtype(source.device.type)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self.step_runner(module, source, other, grad, acc, amp)
        finally:
            torch._C._set_grad_enabled(enabled)


def _coupling_forward(F: nn.Module, G: nn.Module, x1: torch.Tensor,  # noqa: N803 - the paper's names
                      x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y1 = x1 + F(x2)
    return y1, x2 + G(y1)


def _half_forward(F: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return x1 + F(x2)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def step_back(fn: nn.Sequential, source: torch.Tensor, other: torch.Tensor, grad: torch.Tensor,
              acc: torch.Tensor, amp: torch.dtype | None
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One step of the reversible backward for ``fn`` (F or G), written for the compiler.

    Recomputes ``out = fn(source)`` with batch statistics and without touching running statistics,
    reconstructs ``other - out`` and back-propagates ``grad`` (``out``'s gradient) through ``fn``.
    Returns the reconstruction, ``acc`` plus ``source``'s gradient, and the gradients of ``fn``'s
    parameters in ``fn.parameters()`` order. ``amp``: the autocast dtype the forward ran with, or
    None; convolutions then run on cast tensors and gradients come back in each tensor's dtype, as
    :meth:`~._direct.DirectSequential.vjp` does it.
    """
    saved: list = []
    layers = list(fn)
    h = source
    for m in layers:
        if isinstance(m, nn.Conv2d):
            weight, bias = amp_cast(m.weight, amp), None if m.bias is None else amp_cast(m.bias, amp)
            cast = amp_cast(h, amp)
            saved.append((h.dtype, cast, weight))
            h = torch.conv2d(cast, weight, bias, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.BatchNorm2d):
            # in float32 for a lower-precision input, as eager kernels accumulate (a compiled norm on
            # bfloat16 would return its statistics in bfloat16, and its backward would be far off)
            out, mean, invstd = _aten.native_batch_norm(_wide(h), m.weight, m.bias, None, None, True, 0.0, m.eps)
            saved.append((h, mean, invstd))
            h = out.to(h.dtype)
        elif isinstance(m, nn.ReLU):
            h = torch.relu(h)
            saved.append(h)
        else:
            saved.append(None)
    out = h
    g = grad.to(out.dtype)
    grads: list[torch.Tensor] = []
    for i in range(len(layers) - 1, -1, -1):
        m, item = layers[i], saved[i]
        if isinstance(m, nn.ReLU):
            g = _aten.threshold_backward(g, item, 0)
        elif isinstance(m, nn.Conv2d):
            dtype, cast, weight = item
            has_bias = m.bias is not None
            gi, gw, gb = _aten.convolution_backward(
                g, cast, weight, [m.bias.shape[0]] if has_bias else None, m.stride, m.padding, m.dilation,
                False, [0] * len(m.stride), m.groups, [True, True, has_bias])
            if has_bias:
                grads.append(gb.to(m.bias.dtype))
            grads.append(gw.to(m.weight.dtype))
            g = gi.to(dtype)
        elif isinstance(m, nn.BatchNorm2d):
            h_in, mean, invstd = item
            gi, gw, gb = _aten.native_batch_norm_backward(
                _wide(g), _wide(h_in), m.weight, None, None, mean, invstd, True, m.eps,
                [True, m.weight is not None, m.bias is not None])
            gi = gi.to(h_in.dtype)
            if m.bias is not None:
                grads.append(gb)
            if m.weight is not None:
                grads.append(gw)
            g = gi
    grads.reverse()
    return other - out, acc + g.to(acc.dtype), grads


_RUNNERS: dict[tuple, tuple[Callable, Callable]] = {}


def _copy(fn: Callable, name: str) -> Callable:
    """A new function with ``fn``'s code under another name: torch.compile keeps one cache per code
    object, limited to a few entries (``torch._dynamo.config.recompile_limit``), so each structure
    of couplings gets its own."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__)


def fused_coupling(f_call: object, g_call: object, key: tuple, options: dict) -> FusedCoupling | None:
    """A :class:`FusedCoupling` for calls that allow it (see the module docstring), else None;
    ``g_call`` None: a half coupling. Couplings with the same ``key`` (their structure and the
    compile options) share compiled code."""
    if not _fusable(f_call) or (g_call is not None and not _fusable(g_call)):
        return None
    runners = _RUNNERS.get(key)
    if runners is None:
        index = len(_RUNNERS)
        forward = _half_forward if g_call is None else _coupling_forward
        runners = _RUNNERS[key] = (
            torch.compile(_copy(forward, f"revconvert_coupling_{index}"), **options),
            torch.compile(_copy(step_back, f"revconvert_step_back_{index}"), **options))
    return FusedCoupling(f_call, g_call, *runners, inductor=options.get("backend", "inductor") == "inductor")
