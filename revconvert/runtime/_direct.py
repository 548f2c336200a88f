"""Direct calls of standard layers: F and G without ``nn.Module``'s per-call work.

A reversible segment calls each F and G twice per training step (forward, then recomputation in the
backward), and most are an ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d`` and ``ReLU`` (timm's
ResNets add ``Identity`` placeholders). Through
``nn.Module.__call__`` each layer costs Python work beside its kernel (hook checks, the norm's
bookkeeping, ``F.batch_norm``'s argument checks): where kernels are short, as on a GPU at moderate
batch sizes, that decides the step time. :class:`DirectSequential` runs the same layers by calling
``torch.conv2d``, ``torch.batch_norm`` and ``torch.relu`` with the same arguments the modules would
pass, read from the modules at each call: the same aten ops with the same values, so outputs,
running statistics and gradients are those of the module call, bit for bit. One op differs: the
training norms' batch counters go up together at the end of the call, in one ``_foreach_add_``
(one kernel on a GPU instead of one per norm); only a norm with ``momentum=None`` reads its counter,
and such a norm is called as a module.

It calls the modules instead whenever anything could observe or change the difference:

- for the whole function: a module hook (global, or on the Sequential or any layer), JIT tracing, a
  ``TorchFunctionMode``, an input, parameter or buffer of a tensor subclass that overrides
  ``__torch_function__``, a ``forward`` replaced on an instance, a module compiled with
  ``Module.compile()``;
- per layer: a convolution whose ``padding_mode`` is not ``"zeros"``, a norm with ``momentum=None``,
  without running statistics, with ``eps <= 0`` or on an input that is not 4-D, a training norm
  whose batch has one value per channel (the module raises its own error), a layer whose
  parameters are missing from ``_parameters``.

The backward's recomputation goes one step further (:meth:`DirectSequential.vjp`): it recomputes
without recording an autograd graph and back-propagates by calling the backward ops autograd would
call (``convolution_backward``, the batch norm's own backward, ``threshold_backward``) on the same
saved tensors, in the same order, releasing each layer's tensors once its backward has run. Recording
a graph and walking it through the autograd engine costs more host time than a short kernel; the
values, the kernels and the memory are those of ``torch.autograd.grad`` over the module call. Under
autocast it makes autocast's casts itself: a convolution's input, weight and bias cast to the
autocast dtype (every floating tensor but float64, as autocast's ``cached_cast`` does; norms and
ReLUs run in their input's dtype, as autocast leaves them), and the gradients cast back to each
tensor's dtype, as autograd's ``ToCopyBackward`` does. The weights' and biases' casts are made
together, in one ``_foreach_copy_`` per call (:func:`cast_all`; the segment's backward makes them
for a coupling's F and G at once and hands them in), and so are their gradients' casts back; the
forward does the same for its casts outside autograd (:class:`ForwardBatch`, once per segment). Autocast would launch one cast
kernel per tensor: with three convolutions, that was a fifth of a bfloat16 step's kernels. It declines (and the caller uses autograd)
for a norm in eval mode, a convolution whose padding is a string or whose input is not 4-D, an
in-place ReLU that would overwrite a tensor the backward needs (autograd raises there), and wherever
the forward would call a module.

Kept outputs (``keep="spatial-convs"``, see ``_keep``) take the same path: :meth:`DirectSequential.keeping`
keeps the chosen convolutions' outputs as the forward computes them, making the record that
``_keep``'s module-level replay reads, and :meth:`DirectSequential.vjp` hands them back instead of
recomputing those convolutions. Without that, a kept call would need the module calls and an
autograd graph, and on a GPU their host time costs more than the convolutions it saves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.modules.module as module_state
from torch import nn
from torch.overrides import has_torch_function_unary

from ._keep import Kept, keep_mismatch, worth_keeping

__all__ = ["Casts", "DirectSequential", "ForwardBatch", "cast_all", "cast_params", "direct_call"]

_aten = torch.ops.aten

_CONV, _NORM, _RELU, _IDENTITY = 0, 1, 2, 3
_KINDS = {nn.Conv2d: _CONV, nn.BatchNorm2d: _NORM, nn.ReLU: _RELU, nn.Identity: _IDENTITY}


def direct_call(module: nn.Module) -> DirectSequential | None:
    """A :class:`DirectSequential` for ``module`` if it is exactly an ``nn.Sequential`` of
    ``Conv2d`` / ``BatchNorm2d`` / ``ReLU`` / ``Identity`` (no subclasses), else None."""
    if type(module) is not nn.Sequential:
        return None
    layers = tuple(module._modules.values())
    if not layers or any(type(m) not in _KINDS for m in layers):
        return None
    if any(has_torch_function_unary(t) for t in (*module.parameters(), *module.buffers())):
        return None  # tensor subclasses that override torch functions see the module's calls
    return DirectSequential(module, layers)


def call_replaced(attrs: dict) -> bool:
    """Whether a module (given its ``__dict__``) has its call replaced: an instance ``forward`` or
    ``Module.compile()``."""
    return "forward" in attrs or attrs.get("_compiled_call_impl") is not None


def hook_dicts(modules: Iterable[nn.Module]) -> tuple[dict, ...]:
    """The hook dicts of ``modules`` themselves (registering a hook inserts into them), so that checking
    them per call is one pass over a tuple instead of four attribute reads per module."""
    return tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                              m._backward_pre_hooks))


def global_module_hooks() -> bool:
    """Whether a global module hook is registered (``register_module_forward_hook``, ...)."""
    return bool(module_state._global_forward_hooks or module_state._global_forward_pre_hooks
                or module_state._global_backward_hooks or module_state._global_backward_pre_hooks)


class DirectSequential:
    """Calls an ``nn.Sequential`` of standard layers like the module would, without its per-layer
    Python work (see the module docstring for when it calls the modules instead).

    Attributes:
        module: the Sequential; ``layers``: its layers, as they were when this was made (the
            segment's plan, which holds it, is remade when a submodule is replaced).
    """

    __slots__ = ("module", "layers", "params", "_kinds", "_hook_dicts", "_attrs", "_slots")

    def __init__(self, module: nn.Sequential, layers: tuple[nn.Module, ...]) -> None:
        self.module = module
        self.layers = layers
        #: ``module.parameters()``, the order of :meth:`vjp`'s parameter gradients
        self.params = tuple(module.parameters())
        self._kinds = tuple(_KINDS[type(m)] for m in layers)
        every = (module, *layers)
        self._hook_dicts = hook_dicts(every)
        self._attrs = tuple(m.__dict__ for m in every)
        position = {id(p): i for i, p in enumerate(self.params)}
        # per layer: where its weight and bias go among the parameter gradients (-1: none)
        self._slots = tuple((position.get(id(m._parameters.get("weight")), -1),
                             position.get(id(m._parameters.get("bias")), -1)) for m in layers)

    def observed(self) -> bool:
        """Whether a hook, tracer or torch-function mode could see the module calls."""
        return bool(global_module_hooks() or torch._C._get_tracing_state() or torch._C._len_torch_function_stack()
                    or any(self._hook_dicts) or any(map(call_replaced, self._attrs)))

    def __call__(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """``module(x)``; ``batch``: the segment forward's shared casts and counters (:class:`ForwardBatch`)."""
        if self.observed() or has_torch_function_unary(x):
            return self.module(x)
        return self._forward(x, (), None, [], [], batch)

    def keeping(self, x: torch.Tensor, modules: Sequence[nn.Module], thresholds: dict[str, float] | None,
                batch: ForwardBatch | None = None) -> tuple[torch.Tensor, Kept] | None:
        """:meth:`__call__`, keeping the outputs of the convolutions among ``modules`` that are worth
        keeping under ``thresholds`` (``_keep.MIN_KEPT_FLOPS``; None: every one).

        Returns the output and the record ``_keep``'s module-level recording would have made (per
        call of one of ``modules``, in call order: its output or None, and its version counter), or
        None where the modules must be called.
        """
        if self.observed() or has_torch_function_unary(x):
            return None
        tensors: list[torch.Tensor | None] = []
        versions: list[int | None] = []
        x = self._forward(x, modules, thresholds, tensors, versions, batch)
        return x, Kept(tensors, versions)

    def _forward(self, x: torch.Tensor, modules: Sequence[nn.Module], thresholds: dict[str, float] | None,
                 tensors: list[torch.Tensor | None], versions: list[int | None],
                 batch: ForwardBatch | None) -> torch.Tensor:
        """The layers' calls; each convolution among ``modules`` appends its output (or None, if not
        worth keeping) to ``tensors`` and its version counter to ``versions``. With ``batch``, the
        casts come from it and the norms' counters go to it."""
        counters: list[torch.Tensor] = [] if batch is None else batch.counters
        # Under autocast, outside autograd (the segment's forward), the convolutions' weights and biases
        # are cast here, together (see cast_all); autocast then finds them cast and casts only inputs.
        casts = None if batch is None else batch.casts.get(id(self))
        if casts is None and not torch.is_grad_enabled() and (amp := autocast_dtype(x.device.type)) is not None:
            casts = cast_params((self,), amp)[0]
        for i, (m, kind) in enumerate(zip(self.layers, self._kinds)):
            if kind == _RELU:
                x = torch.relu_(x) if m.__dict__["inplace"] else torch.relu(x)
            elif kind == _CONV:
                x = _conv(m, x, None if casts is None else casts[i])
                if modules and any(m is chosen for chosen in modules):
                    keep = worth_keeping(thresholds, m, x)
                    tensors.append(x if keep else None)
                    versions.append(x._version if keep else None)
            elif kind == _NORM:
                x = _norm(m, x, counters)
        if batch is None:
            _count_all(counters)
        return x

    def vjp_supported(self) -> bool:
        """Whether the layers allow :meth:`vjp` whatever the input: what it checks per call that
        does not depend on the input, the hooks and the modes (no in-place ReLU overwriting what the
        backward needs, convolutions with zero padding given as numbers)."""
        previous = None
        for m, kind in zip(self.layers, self._kinds):
            if kind == _IDENTITY:
                continue
            if _overwrites_needed(m, kind, previous) or (kind == _CONV and not _conv_backward_ok(m)):
                return False
            previous = kind
        return True

    def vjp(self, x: torch.Tensor, grad: torch.Tensor, need_input: bool, kept: Kept | None = None,
            modules: Sequence[nn.Module] = (), casts: Casts | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]] | None:
        """Recompute on ``x`` and back-propagate ``grad`` (the output's gradient) without autograd.

        Returns the output, the gradient of ``x`` (None unless ``need_input``) and the gradients of
        :attr:`params`, as ``torch.autograd.grad(module(x), [x, *params], grad)`` would, with the same
        kernels; or None where this call cannot be made directly (see the module docstring).
        Call it with grad mode on or off: nothing is recorded either way.

        ``kept``: the forward's record of the outputs of the convolutions among ``modules`` (module-level
        keeping, :meth:`keeping` or ``_keep.recording``); each one kept and unchanged since is used
        instead of recomputing that convolution, as ``_keep``'s replay does. ``casts``: under
        autocast, the weights already cast (:func:`cast_params`, made for F and G together by the
        segment's backward); without them this call casts its own.
        """
        if self.observed() or has_torch_function_unary(x) or has_torch_function_unary(grad):
            return None
        amp = autocast_dtype(x.device.type)
        saved: list = []
        used = 0  # kept records read
        with torch.no_grad():
            # autocast's casts, made here so that the backward has the cast tensors (see cast_all)
            if amp is None:
                casts = None
            elif casts is None:
                casts = cast_params((self,), amp)[0]
            h = x
            previous = None  # the last layer that computes anything
            for i, (m, kind) in enumerate(zip(self.layers, self._kinds)):
                if kind != _IDENTITY:
                    if _overwrites_needed(m, kind, previous):
                        return None  # autograd refuses that backward, so it must be the one to raise
                    previous = kind
                if kind == _CONV:
                    if not _conv_backward_ok(m) or h.dim() != 4:
                        return None
                    d, p = m.__dict__, m._parameters
                    weight, bias = p["weight"], p["bias"]
                    if casts is None:
                        saved.append((h.dtype, h, weight))
                    else:  # the uncast input's dtype only: autograd's ToCopyBackward keeps no tensor
                        cast = amp_cast(h, amp)
                        weight, bias = casts[i]
                        saved.append((h.dtype, cast, weight))
                        h = cast
                    out = None
                    if kept is not None and any(m is chosen for chosen in modules):
                        if used >= len(kept.tensors):
                            raise keep_mismatch("a directly called F or G", used + 1, len(kept.tensors))
                        out, version = kept.tensors[used], kept.check[used]
                        used += 1
                        if out is not None and out._version != version:
                            out = None  # changed in place after it was kept: recomputed, as the replay does
                    if out is None:
                        out = torch.conv2d(h, weight, bias, d["stride"], d["padding"], d["dilation"], d["groups"])
                    h = out
                    del out
                elif kind == _NORM:
                    args = _norm_args(m, h)
                    if args is None or not args[5]:  # eval-mode norms: autograd's formula differs by backend
                        return None
                    _count(m)
                    out, save_mean, save_invstd, reserve, index = _aten._batch_norm_impl_index(*args)
                    saved.append((h, save_mean, save_invstd, reserve, index))
                    h = out
                elif kind == _RELU:
                    h = torch.relu_(h) if m.__dict__["inplace"] else torch.relu(h)
                    saved.append(h)
                else:
                    saved.append(None)
            if kept is not None and used != len(kept.tensors):
                raise keep_mismatch("a directly called F or G", used, len(kept.tensors))
            out = h
            g = grad if grad.dtype == out.dtype else grad.to(out.dtype)  # as autograd casts it
            # (parameter slot, its gradient, the dtype autograd's ToCopyBackward casts it back to),
            # in the order autograd accumulates them; the casts are made together at the end
            pending: list[tuple[int, torch.Tensor, torch.dtype | None]] = []
            first = next((i for i, kind in enumerate(self._kinds) if kind != _IDENTITY), len(self._kinds))
            for i in reversed(range(first, len(self.layers))):
                kind, m, item = self._kinds[i], self.layers[i], saved[i]
                saved[i] = None  # released once its backward has run, as autograd's nodes release theirs
                want_input = need_input or i > first
                if kind == _RELU:
                    if want_input:
                        g = _aten.threshold_backward(g, item, 0)
                    continue
                if kind == _IDENTITY:
                    continue
                p = m._parameters
                weight, bias = p.get("weight"), p.get("bias")
                if kind == _CONV:
                    d = m.__dict__
                    input_dtype, cast, cast_weight = item
                    gi, gw, gb = _aten.convolution_backward(
                        g, cast, cast_weight, None if bias is None else [bias.shape[0]], d["stride"], d["padding"],
                        d["dilation"], False, [0] * len(d["stride"]), d["groups"],
                        [want_input, weight.requires_grad, bias is not None and bias.requires_grad])
                    if amp is not None and gi is not None:  # ToCopyBackward: back in the input's dtype
                        gi = gi.to(input_dtype)
                    del cast, cast_weight
                else:
                    h_in, save_mean, save_invstd, reserve, index = item
                    d, b = m.__dict__, m._buffers
                    if index == 1:  # cuDNN's backward, as autograd's formula calls it
                        g = g.contiguous(memory_format=_suggested_format(h_in))
                    gi, gw, gb = _aten._batch_norm_impl_index_backward(
                        index, h_in, g, weight, b["running_mean"], b["running_var"], save_mean, save_invstd, True,
                        d["eps"], [want_input, weight is not None and weight.requires_grad,
                                   bias is not None and bias.requires_grad], reserve)
                del item
                w_slot, b_slot = self._slots[i]
                if w_slot >= 0 and weight.requires_grad:
                    pending.append((w_slot, gw, weight.dtype))
                if b_slot >= 0 and bias.requires_grad:
                    pending.append((b_slot, gb, bias.dtype))
                g = gi
            # ToCopyBackward under autocast: each gradient back in its parameter's dtype
            back = cast_all([t for _, t, _ in pending], [dtype for _, _, dtype in pending])
            grads: list[torch.Tensor | None] = [None] * len(self.params)
            for (slot, _, _), t in zip(pending, back):
                grads[slot] = t if grads[slot] is None else grads[slot] + t
        return out, (g if need_input else None), grads


Casts = list[tuple[torch.Tensor, torch.Tensor | None] | None]


def cast_params(calls: Sequence[DirectSequential], amp: torch.dtype) -> list[Casts]:
    """Per call, per layer: a directly called convolution's weight and bias as autocast to ``amp``
    casts them (:func:`amp_cast`), None for other layers; all the calls' casts made together
    (:func:`cast_all`). Call it outside autograd."""
    where: list[tuple[int, int]] = []  # (call, layer) of each convolution
    tensors: list[torch.Tensor | None] = []
    for c, call in enumerate(calls):
        for i, (m, kind) in enumerate(zip(call.layers, call._kinds)):
            if kind == _CONV and _conv_direct(m):
                p = m._parameters
                where.append((c, i))
                tensors += (p["weight"], p["bias"])
    cast = cast_all(tensors, [_amp_target(t, amp) for t in tensors])
    out: list[Casts] = [[None] * len(call.layers) for call in calls]
    for n, (c, i) in enumerate(where):
        out[c][i] = (cast[2 * n], cast[2 * n + 1])
    return out


class ForwardBatch:
    """What the direct calls of one segment forward share: their convolutions' casts under autocast,
    made for all of them at once (:func:`cast_params`: one op for the segment instead of one per
    call), and their training norms' batch counters, incremented together by :meth:`finish` (one op
    for the segment instead of one per call; nothing in the forward reads them, see
    :func:`_count_all`). The casts live until the segment's forward ends, as autocast's own weight
    cache keeps its casts until the autocast region ends; with that cache turned off
    (``cache_enabled=False``), each call casts its own, freed after it, as autocast would."""

    __slots__ = ("casts", "counters")

    def __init__(self, calls: Sequence[DirectSequential], amp: torch.dtype | None) -> None:
        self.counters: list[torch.Tensor] = []
        self.casts: dict[int, Casts] = {}
        if amp is not None and calls and not torch.is_grad_enabled() and torch.is_autocast_cache_enabled():
            self.casts = {id(call): casts for call, casts in zip(calls, cast_params(calls, amp))}

    def finish(self) -> None:
        """Increment the counters collected so far."""
        counters, self.counters = self.counters, []
        _count_all(counters)


def _conv(m: nn.Module, x: torch.Tensor, cast: tuple[torch.Tensor, torch.Tensor | None] | None = None
          ) -> torch.Tensor:
    """``m(x)``; ``cast``: ``m``'s weight and bias already cast for autocast (:func:`cast_params`)."""
    d, p = m.__dict__, m._parameters
    if not _conv_direct(m):
        return m(x)
    weight, bias = cast if cast is not None else (p["weight"], p["bias"])
    return torch.conv2d(x, weight, bias, d["stride"], d["padding"], d["dilation"], d["groups"])


def _conv_direct(m: nn.Module) -> bool:
    """Whether convolution ``m`` is called directly (zero padding, a weight, a bias entry)."""
    p = m._parameters
    return m.__dict__["padding_mode"] == "zeros" and p.get("weight") is not None and "bias" in p


def _overwrites_needed(m: nn.Module, kind: int, previous: int | None) -> bool:
    """Whether layer ``m`` (of ``kind``, after a computing layer of kind ``previous``, None for the
    input) is an in-place ReLU overwriting what the backward needs: the input, or a ReLU's result."""
    return kind == _RELU and m.__dict__["inplace"] and previous in (None, _RELU)


def _conv_backward_ok(m: nn.Module) -> bool:
    """Whether convolution ``m`` can be back-propagated by ``convolution_backward`` as it is called
    here: zero padding given as numbers, a weight, and a bias entry (None or a parameter)."""
    return _conv_direct(m) and not isinstance(m.__dict__["padding"], str)


def _norm_args(m: nn.Module, x: torch.Tensor) -> tuple | None:
    """``torch.batch_norm``'s arguments for ``m`` on ``x`` as ``_BatchNorm.forward`` and
    ``F.batch_norm`` would pass them, for a norm with running statistics and a momentum; else None."""
    d, b, p = m.__dict__, m._buffers, m._parameters
    momentum, eps, training = d["momentum"], d["eps"], d["training"]
    mean, var = b.get("running_mean"), b.get("running_var")
    if momentum is None or eps <= 0 or not d["track_running_stats"] or mean is None or var is None \
            or "weight" not in p or "bias" not in p or x.dim() != 4 or (training and x.shape[0] * x.shape[2] * x.shape[3] == 1):
        return None
    return (x, p.get("weight"), p.get("bias"), mean, var, training, momentum, eps, torch.backends.cudnn.enabled)


def _counter(m: nn.Module) -> torch.Tensor | None:
    """The batch counter ``_BatchNorm.forward`` increments for norm ``m`` (None in eval mode or without one)."""
    return m._buffers.get("num_batches_tracked") if m.__dict__["training"] else None


def _count(m: nn.Module) -> None:
    """A training norm's batch counter, incremented as ``_BatchNorm.forward`` does."""
    counter = _counter(m)
    if counter is not None:
        counter.add_(1)


def _norm(m: nn.Module, x: torch.Tensor, counters: list[torch.Tensor]) -> torch.Tensor:
    """``m(x)``; a training norm's batch counter goes to ``counters`` for :func:`_count_all`."""
    args = _norm_args(m, x)
    if args is None:
        return m(x)
    counter = _counter(m)
    if counter is not None:
        counters.append(counter)
    return torch.batch_norm(*args)


def _count_all(counters: list[torch.Tensor]) -> None:
    """The batch counters of one call's training norms, incremented as ``_BatchNorm.forward`` does,
    in one op (one kernel on a GPU, instead of one per norm). The norms whose counter the forward
    reads (``momentum=None``) are called as modules and count themselves; for the others the
    counter is bookkeeping that nothing in the call reads, so incrementing it at the end is exact."""
    if len(counters) == 1:
        counters[0].add_(1)
    elif counters:
        torch._foreach_add_(counters, 1)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts lower-precision ops to on ``device_type``, or None when it is off
    (or has no autocast: ``meta``, on which the memory planner runs)."""
    if device_type == "meta":
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def amp_cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Autocast's cast of an argument of a lower-precision op to ``dtype``: floating tensors other
    than float64; ``t`` itself when ``dtype`` is None (autocast off)."""
    target = None if dtype is None else _amp_target(t, dtype)
    return t if target is None else t.to(target)


def cast_all(tensors: Sequence[torch.Tensor | None], dtypes: Sequence[torch.dtype | None]
             ) -> list[torch.Tensor | None]:
    """``tensors[i].to(dtypes[i])`` for each (None, or a None dtype, leaves the tensor as it is), the
    casts from one dtype to another made in one ``_foreach_copy_`` into new tensors (one kernel on a
    GPU instead of one per tensor: CUDA's fast path wants one source and one target dtype), with the
    values and layout ``Tensor.to`` gives. Call it outside autograd."""
    out = list(tensors)
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (t, dtype) in enumerate(zip(tensors, dtypes)):
        if t is not None and dtype is not None and t.dtype != dtype:
            groups.setdefault((t.dtype, dtype), []).append(i)
    for (_, dtype), todo in groups.items():
        if len(todo) == 1:
            out[todo[0]] = tensors[todo[0]].to(dtype)
            continue
        src = [tensors[i] for i in todo]
        dst = [torch.empty_like(t, dtype=dtype) for t in src]
        torch._foreach_copy_(dst, src)
        for i, t in zip(todo, dst):
            out[i] = t
    return out


def _amp_target(t: torch.Tensor | None, dtype: torch.dtype) -> torch.dtype | None:
    """What :func:`amp_cast` casts ``t`` to under autocast to ``dtype`` (None: left as it is)."""
    return dtype if t is not None and t.is_floating_point() and t.dtype != torch.float64 else None


def _suggested_format(t: torch.Tensor) -> torch.memory_format:
    """``Tensor.suggest_memory_format()``, which Python does not expose, for a 4-D tensor."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
