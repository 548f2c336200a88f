"""Tracing: torch.fx graph of a model plus a tensor shape for every node.

Shapes come from running the graph on *meta* tensors over a meta copy of the model's parameters, so
the shape analysis of a batch of 1024 224x224 images allocates no activation memory and never
touches the caller's parameters, buffers (BatchNorm running statistics) or train/eval mode. No hook
of the caller runs (see :mod:`revconvert.analysis.hooks`): modules are traced through by calling their
``forward``, the meta copy has no hooks, and the global module hooks are set aside.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError
from ..runtime import ReversibleSegment
from ..runtime.checkpoint import CheckpointedRun, attach_checkpointed_modules
from .hooks import no_global_hooks, strip_hooks

__all__ = ["RevTracer", "trace", "tensor_shape", "module_of", "example_from", "meta_copy", "model_name",
           "unwrap_compiled", "is_default_leaf"]

# Library modules kept as single nodes by default, so the surgery can copy them whole:
# - subclasses of torch's norm layers defined elsewhere (timm's BatchNormAct2d, GroupNormAct,
#   LayerNorm2d, ...). Traced through, their Python code runs eagerly on the module's own buffers
#   (``num_batches_tracked.add_(1)``), reads ``x.shape`` and hard-codes momentum and train/eval
#   mode into the graph; as leaves they keep every setting and buffer.
# - stochastic depth: traced through, the graph would freeze ``self.training`` (drop paths in
#   eval mode, or never) and draw its mask from shape reads of the block's tensors.
_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_STOCHASTIC_DEPTH = frozenset({"torchvision.ops.stochastic_depth.StochasticDepth", "timm.layers.drop.DropPath",
                               "timm.models.layers.drop.DropPath"})


def is_default_leaf(m: nn.Module) -> bool:
    """Whether revconvert keeps ``m`` as one graph node although fx would trace through it."""
    cls = type(m)
    if f"{cls.__module__}.{cls.__qualname__}" in _STOCHASTIC_DEPTH:
        return True
    return isinstance(m, _NORM_BASES) and not cls.__module__.startswith("torch.nn")


class RevTracer(fx.Tracer):
    """An ``fx.Tracer`` that knows extra leaf modules and reports where tracing failed.

    Args:
        leaf_modules: module types or qualified names that are kept as single ``call_module``
            nodes instead of being traced through (for code fx cannot trace).
        autowrap_functions: free functions recorded as single ``call_function`` nodes.
    """

    def __init__(self, *, leaf_modules: Iterable[type | str] = (),
                 autowrap_functions: Iterable[Callable[..., Any]] = ()) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        leaf_modules = tuple(leaf_modules)
        for item in leaf_modules:
            if not isinstance(item, (type, str)):
                raise TypeError(f"leaf_modules entries must be nn.Module types or qualified names, "
                                f"got {item!r}")
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = frozenset(n for n in leaf_modules if isinstance(n, str))
        self.current_module: list[str] = []
        self.traced_through: set[str] = set()  # modules whose forward was traced (not leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A converted model's segments and runs are opaque.
        if isinstance(m, (ReversibleSegment, CheckpointedRun)) or isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names or is_default_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # Remember which module is being traced so a failure can name it.
        # On an exception the stack is left as it is: its top names the innermost failing module.
        path = self.path_of_module(m)
        self.current_module.append(path)
        if not self.is_leaf_module(m, path):
            # m.forward, not m(...): a hook on a traced-through module must not run on proxies
            # (it would be baked into the graph, or record proxies in the caller's objects).
            self.traced_through.add(path)
            forward = m.forward
        out = super().call_module(m, forward, args, kwargs)
        self.current_module.pop()
        return out


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model._orig_mod``), or ``model`` itself.

    fx cannot trace an ``OptimizedModule`` (its forward is dynamo's); the module it compiles is the
    model. Without ``torch._dynamo`` imported there can be no such wrapper, so it is not imported.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    while wrapper is not None and isinstance(model, wrapper):
        model = model._orig_mod
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (no data copied).

    The caller's model keeps its tensors, gradients, hooks and train/eval mode; the copy's
    parameters carry no ``.grad`` and its modules no hooks (the analysis runs it on meta tensors);
    tensors shared between modules stay shared.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            meta = t.detach().to("meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                else meta
    return strip_hooks(copy.deepcopy(model, memo))


def example_from(example_input: Any, dtype: torch.dtype | None = None) -> tuple[Any, ...]:
    """Normalise an example input (tensor, tuple of tensors, or shape tuple) into positional args.

    A shape becomes a meta tensor of ``dtype`` (default: the default dtype)."""
    if example_input is None:
        example_input = (1, 3, 224, 224)
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, torch.Size) or (
            isinstance(example_input, (tuple, list)) and example_input
            and all(isinstance(d, int) for d in example_input)):
        return (torch.empty(*example_input, device="meta", dtype=dtype),)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(f"example_input must be a tensor, a tuple of tensors or a shape such as "
                    f"(1, 3, 224, 224); got {type(example_input).__name__}")


_SHAPE_PRESERVING = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6,
                     nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Dropout,
                     nn.Dropout2d, nn.Identity)


_CONV_MODULES = ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3))  # and subclasses (timm's Conv2dSame)
_CONV_FUNCTIONS = {torch.nn.functional.conv1d: 1, torch.nn.functional.conv2d: 2, torch.nn.functional.conv3d: 3}


class _Unbatched(ValueError):
    """Raised inside the interpreter, re-raised by :func:`trace` without fx's node notes."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_batched(interp: fx.Interpreter, n: fx.Node) -> None:
    """Refuse an example that reaches a convolution without a batch dimension.

    PyTorch convolutions also accept one unbatched sample (``(C, H, W)`` for Conv2d); read as a
    batch, its H would pass for the channels, and every width the analysis derives would be wrong.
    """
    if n.op == "call_module":
        module = interp.fetch_attr(n.target)
        spatial = next((d for kind, d in _CONV_MODULES if isinstance(module, kind)), None)
        name = f"'{n.target}' ({type(module).__name__})"
    elif n.op == "call_function":
        spatial = _CONV_FUNCTIONS.get(n.target)
        name = f"{getattr(n.target, '__name__', n.target)} ({n.name})"
    else:
        return
    first = n.args[0] if n.args else None
    val = interp.env.get(first) if isinstance(first, fx.Node) else None
    if spatial is None or not isinstance(val, torch.Tensor) or val.dim() != spatial + 1:
        return
    shape = tuple(val.shape)
    raise _Unbatched(
        f"the example input reaches {name} as shape {shape}, one sample without a batch dimension "
        f"(PyTorch reads it as unbatched); revconvert needs a batch with channels on dimension 1. "
        f"Hint: add a batch dimension, e.g. example_input={(1, *shape)}")


class _MetaShapeProp(fx.Interpreter):
    """Runs the graph on meta tensors, storing each node's output in ``node.meta["val"]``."""

    def __init__(self, gm: fx.GraphModule, meta_root: nn.Module, real_root: nn.Module) -> None:
        super().__init__(gm)
        self.meta_root = meta_root
        self.real_root = real_root

    def _real_fallback(self, n: fx.Node) -> Any:
        """Leaf modules with data-dependent code cannot run on meta tensors: run a copy of the
        module on zeros of the right shape instead (the caller's module is not touched)."""
        module = strip_hooks(copy.deepcopy(self.real_root.get_submodule(n.target)))
        def real(a: Any) -> Any:
            return torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) and a.is_meta else a
        meta_args, meta_kwargs = self.fetch_args_kwargs_from_env(n)
        args = [real(a) for a in meta_args]
        kwargs = {k: real(v) for k, v in meta_kwargs.items()}
        with torch.no_grad():
            out = module(*args, **kwargs)
        return torch.utils._pytree.tree_map(
            lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, out)

    def fetch_attr(self, target: str) -> Any:
        obj: Any = self.meta_root
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        # ReversibleSegment too: a coupling keeps the shape, and its batch norms would refuse a
        # batch of one at 1x1 in train mode, which only shape propagation ever runs.
        if isinstance(module, _SHAPE_PRESERVING + (ReversibleSegment,)) and len(args) == 1 and not kwargs \
                and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])  # same shape and dtype; skips slow meta decompositions
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        _check_batched(self, n)
        try:
            try:
                result = super().run_node(n)
            except (RuntimeError, NotImplementedError):
                if n.op != "call_module":
                    raise
                result = self._real_fallback(n)
        except Exception as e:  # name the node and its module, keep the cause
            where = f"module '{n.target}'" if n.op == "call_module" else f"operation {n.format_node()}"
            shapes = [tuple(a.meta["val"].shape) for a in n.all_input_nodes
                      if isinstance(a.meta.get("val"), torch.Tensor)]
            raise TraceError(
                f"shape propagation failed at {where} (inputs of shape {shapes}): {e}. "
                f"Hint: check that example_input has the shape the model expects "
                f"(e.g. (1, 3, 224, 224) for an image model).") from e
        n.meta["val"] = result
        return result


def trace(model: nn.Module, example_input: Any = None, *,
          leaf_modules: Iterable[type | str] = (),
          autowrap_functions: Iterable[Callable[..., Any]] = (),
          concrete_args: dict[str, Any] | None = None, share_modules: bool = False) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output on meta tensors.

    Args:
        model: the model; it is not modified: fx runs the Python code of every module it traces
            through, so eager statements there (``self.num_batches_tracked.add_(1)``) would change
            the caller's buffers; by default a meta copy is traced instead.
        example_input: a tensor, a tuple of tensors, or a shape; default ``(1, 3, 224, 224)``.
            Only shape and dtype matter: it is replaced by a meta tensor.
        leaf_modules: module types or qualified names not to trace through.
        autowrap_functions: functions recorded as single graph nodes.
        concrete_args: passed to ``fx.Tracer.trace`` to specialise non-tensor arguments.
        share_modules: trace ``model`` itself, so the GraphModule shares its submodules (for a pass
            that works on its own copy and rewrites it).

    Returns:
        An ``fx.GraphModule`` whose nodes carry ``node.meta["val"]`` (meta tensors).

    Raises:
        TraceError: fx could not trace the model, or shapes could not be propagated.

    Example:
        >>> gm = trace(torchvision.models.resnet18(), (8, 3, 224, 224))
        >>> [n.meta["val"].shape for n in gm.graph.nodes if n.op == "output"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)  # audit and memory reports of torch.compile(model) are of model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    args = example_from(example_input, dtype)
    with no_global_hooks():
        return _trace(model, args, leaf_modules, autowrap_functions, concrete_args, share_modules)


def _trace(model: nn.Module, args: tuple[Any, ...], leaf_modules: Iterable[type | str],
           autowrap_functions: Iterable[Callable[..., Any]], concrete_args: dict[str, Any] | None,
           share_modules: bool) -> fx.GraphModule:
    tracer = RevTracer(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    root = model if share_modules else meta_copy(model)
    try:
        try:
            with _no_proxies_left(root if share_modules else None):
                graph = tracer.trace(root, concrete_args=concrete_args)
        except Exception:
            if share_modules:
                raise
            # Code that reads parameter values while traced (``.item()``) cannot run on meta
            # tensors: trace a real copy instead, still never the caller's model.
            root = strip_hooks(copy.deepcopy(model))
            tracer = RevTracer(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
            graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:
        where = tracer.current_module[-1] if tracer.current_module else ""
        culprit = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else \
            f"the forward of {type(model).__name__}"
        raise TraceError(
            f"torch.fx could not trace {culprit}: {type(e).__name__}: {e}\n"
            f"Hint: pass leaf_modules=[{'%r' % where if where else 'SomeModuleType'}] so that module is "
            f"kept as one opaque node (it then stays stored, never reversible), or concrete_args=... "
            f"to fix non-tensor arguments that drive control flow.") from e
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.meta["revconvert"] = {"traced_through": frozenset(tracer.traced_through)}
    attach_checkpointed_modules(gm)  # the graph names a CheckpointedRun, not the modules it runs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise TraceError(f"example_input has {len(args)} tensors but {type(model).__name__}.forward "
                         f"takes {len(placeholders)} inputs")
    meta_args = [a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    try:
        _MetaShapeProp(gm, root if not share_modules else meta_copy(model), model).run(*meta_args)
    except _Unbatched as e:
        raise ValueError(e.message) from None
    return gm


@contextlib.contextmanager
def _no_proxies_left(model: nn.Module | None) -> Iterator[None]:
    """Trace ``model`` itself without leaving fx proxies in its modules: tracing runs their Python
    code, and a module that caches values (timm's EfficientFormer keeps its attention biases in a
    dict in eval mode) would keep a proxy, which a later trace or forward of the module trips on.
    Attributes set to a proxy get their old value back; proxies put in a dict attribute are removed."""
    if model is None:
        yield
        return
    saved = [(m.__dict__, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for attrs, before in saved:
            for key, value in list(attrs.items()):
                if isinstance(value, fx.Proxy):
                    if key in before:
                        attrs[key] = before[key]
                    else:
                        del attrs[key]
                elif type(value) is dict and value is before.get(key):
                    for k in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                        del value[k]


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape recorded for ``node`` by :func:`trace`, or None if it is not a tensor."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None



def model_name(model: nn.Module) -> str:
    """The name reports use: the class name, or the original's for a converted model."""
    model = unwrap_compiled(model)
    summary = getattr(model, "revconvert_summary", None)
    return getattr(summary, "model", None) or type(model).__name__
