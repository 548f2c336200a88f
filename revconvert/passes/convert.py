"""One-call conversion: rewrite runs of eligible residual blocks into reversible segments.

The pass is visibly trace -> find -> decide -> rewrite -> lint / dead-code elimination ->
recompile, on a deep copy: the caller's model is never modified. Everything that is not converted
(stem, projection/strided blocks, pooling, head) keeps its module names and weights, so
``converted.load_state_dict(original.state_dict(), strict=False)`` restores every stored part.
"""

from __future__ import annotations

import difflib
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from ..analysis.audit import Analysis, analyze
from ..analysis.channels import ChannelPlan, resolve_attr
from ..analysis.graph import ResidualBlock
from ..analysis.hooks import copy_sharing_hooks, module_hooks, no_global_hooks
from ..analysis.ops import mutated_inputs
from ..analysis.propagation import plan_channels
from ..analysis.tracing import example_from, unwrap_compiled
from .._format import format_bytes
from ..errors import ConversionError
from ..runtime import ReversibleCoupling, ReversibleSegment
from ..runtime._function import check_compile_options
from ..runtime._keep import KEEP_POLICIES
from ..runtime.checkpoint import attach_checkpointed_modules
from .checkpoint_stored import _checkpoint_stored_parts
from .hooks import carry_root_hooks, check_hooks
from .recompute import plan_recompute
from .summary import ConversionSummary, combine_summaries, keep_summary
from .surgery import Widths, alignments, build_residual_function, choose_widths, out_of_place_copy

__all__ = ["ConvertConfig", "ConversionSummary", "convert", "coupling_groups", "half_coupling"]

T = TypeVar("T")

_WIDTHS = ("match-params", "keep")
# recompute_budget warns when the planned model saves at least this share of ordinary autograd's bytes
_LITTLE_SAVING = 0.9
_POST = ("move", "drop")


@dataclass(frozen=True)
class ConvertConfig:
    """Options of :func:`convert` (all keyword-only in spirit; the defaults are the documented ones).

    Attributes:
        only: block names or name prefixes to convert (``("layer3",)`` converts the eligible blocks
            of ``layer3`` only); None converts every eligible block.
        select: a predicate on block names, applied after ``only``.
        width: inner width of F and G: ``"match-params"`` (scaled so the coupling has about the
            parameters of the block it replaces), ``"keep"`` (original inner widths, on half the
            outer channels), or a float factor applied to the inner widths.
        width_multiple: inner widths of F and G are rounded to multiples of this (default 32: the
            channel counts convolution kernels run fastest on, on GPUs and on vectorised CPU
            kernels; 1 turns rounding off). A block whose parameter match would then miss by more
            than 10% is rounded to half of it instead (16, then 8, ...), down to unrounded widths.
        pair_blocks: build each coupling from two consecutive blocks of a run, F from the first and G
            from the second (as RevNet's couplings are built), instead of F and G both from one block.
            Each function then matches its own block's parameters (wider inner layers on half the
            channels), and the converted model runs half the layers of the default conversion: a
            step launches about half the kernels, which decides its time wherever the host that
            launches them sets the pace (a GPU at small or moderate batches). A run of odd length (three
            or more) ends with a half coupling, ``y1 = x1 + F(x2)``, ``y2 = x2``, F from its last
            block; a run of one block is converted as by default, so that both halves of the
            channels pass through a function. The same parameter count as the default
            conversion, within ``width``'s matching; a different network (half as many couplings,
            each wider), so a checkpoint of one does not load into the other.
        post_activation: ``"move"`` puts the activation that followed the residual addition at the
            front of F and G and applies it once at the segment exit; ``"drop"`` removes it.
        zero_init: start the last norm of F and G at zero so every coupling starts as the identity.
        memory_saving: False makes the segments use ordinary autograd (for debugging).
        keep: which outputs of F and G a coupling keeps from the forward, so the backward's
            recomputation skips those ops (``ReversibleCoupling(keep=...)``): None, or
            ``"spatial-convs"`` (convolutions larger than 1x1). Alone, it applies to every coupling.
        recompute_budget: the most extra FLOPs per training step the memory-saving backward may
            cost, as a fraction of the same model's step under ordinary autograd (0.2: at most 20%
            more). Couplings keep outputs (``keep``, default ``"spatial-convs"``) in increasing order
            of bytes per saved FLOP until the step fits, planned on meta tensors at the example input
            (see :func:`revconvert.recompute.plan_recompute`). None: recompute everything (least memory).
        checkpoint_stored: also run the stored parts (stem, strided/projection blocks, code between
            blocks; not the head) under activation checkpointing, one ``CheckpointedRun`` per part
            (``ckpt_stem``, ``ckpt_layer2_0``, ...): autograd keeps only each part's inputs and runs
            its forward again in the backward pass, so a training step costs their forward FLOPs
            once more. Parameter names and ``state_dict`` keys are unchanged. A collection of part
            names (``("stem", "layer2.0")``; the segment names of ``memory_profile``'s rows, and the
            block names of eligible blocks left unconverted) checkpoints only those parts.
        keep_blocks: names of converted blocks whose couplings keep their outputs (policy ``keep``,
            default ``"spatial-convs"``); the other couplings recompute everything. None: ``keep``
            and ``recompute_budget`` decide, as described above. ``revconvert.plan_memory`` sets it.
        checkpoint_split: checkpointed parts (names as for ``checkpoint_stored``) run as two
            ``CheckpointedRun`` regions instead of one, cut inside the part where the larger half's
            recomputation plus what crosses the cut is least: the backward recomputes one half at a
            time, so the part's recomputation transient is about halved, for keeping the values that
            cross the cut. Each name must be checkpointed. ``revconvert.plan_memory`` sets it.
        compile: run the couplings through ``torch.compile`` (True, or a dict of its options) in the
            forward and in the backward (``ReversibleSegment(compile=...)``): a coupling whose F and G
            are Sequentials of convolutions, batch norms and ReLUs as three compiled calls per step,
            other F and G call by call. ``torch.compile(converted)`` alone compiles the stored parts
            and leaves each reversible segment as an eager graph break; this compiles inside them
            too. Not yet faster than eager where measured (call by call 4.2x the compiled original
            on an H100; as couplings about eager's time on CPUs, not yet measured on a GPU); see the
            README's Speed section.
        cuda_graphs: on CUDA, each reversible segment captures its training forward and backward as
            two CUDA graphs and replays them at later steps (``ReversibleSegment(cuda_graphs=True)``):
            the same arithmetic, without the host launching each kernel, which sets the pace of a
            converted step on a GPU at small and moderate batches. Runs eagerly, with a warning
            naming why, where a graph cannot reproduce the eager step (not on CUDA, dropout in F
            or G, ``keep``, ``recompute_budget``, ``compile``, hooks). Costs memory that
            ``memory_profile`` does not include (the graphs' pool and static tensors, see the
            README's "CUDA graphs"). With ``compile``, or ``keep`` alone, every segment would run
            eagerly: refused.
        leaf_modules, autowrap_functions, concrete_args: tracing options (see ``revconvert.audit``).

    Example:
        >>> cfg = ConvertConfig(only=("layer3",), width="keep")
        >>> converted = revconvert.convert(torchvision.models.resnet50(), config=cfg)
    """

    only: tuple[str, ...] | None = None
    select: Callable[[str], bool] | None = None
    width: str | float = "match-params"
    width_multiple: int = 32
    pair_blocks: bool = False
    post_activation: str = "move"
    zero_init: bool = True
    memory_saving: bool = True
    keep: str | None = None
    recompute_budget: float | None = None
    checkpoint_stored: bool | tuple[str, ...] = False
    keep_blocks: tuple[str, ...] | None = None
    checkpoint_split: tuple[str, ...] = ()
    compile: bool | dict = field(default=False, hash=False)
    cuda_graphs: bool = False
    leaf_modules: tuple[type | str, ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.only, str):
            object.__setattr__(self, "only", (self.only,))
        if isinstance(self.width, str) and self.width not in _WIDTHS:
            raise ValueError(f"ConvertConfig.width must be one of {_WIDTHS} or a positive number, "
                             f"got {self.width!r}")
        if not isinstance(self.width, str) and not (isinstance(self.width, (int, float)) and self.width > 0):
            raise ValueError(f"ConvertConfig.width must be positive, got {self.width!r}")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"ConvertConfig.compile must be a bool or a dict of torch.compile options, "
                             f"got {self.compile!r}")
        if isinstance(self.compile, dict):
            check_compile_options(self.compile)
        multiple = self.width_multiple
        if isinstance(multiple, bool) or not isinstance(multiple, int) or not 1 <= multiple <= 128:
            raise ValueError(f"ConvertConfig.width_multiple must be an integer from 1 to 128, got {multiple!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"ConvertConfig.cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if not isinstance(self.pair_blocks, bool):
            raise TypeError(f"ConvertConfig.pair_blocks must be True or False, got {self.pair_blocks!r}")
        if self.post_activation not in _POST:
            raise ValueError(f"ConvertConfig.post_activation must be one of {_POST}, got {self.post_activation!r}")
        if self.keep is not None and self.keep not in KEEP_POLICIES:
            raise ValueError(f"ConvertConfig.keep must be None or one of {sorted(KEEP_POLICIES)}, got {self.keep!r}")
        budget = self.recompute_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
            raise ValueError(f"ConvertConfig.recompute_budget must be a number >= 0 (extra FLOPs per step as a "
                             f"fraction of ordinary autograd, e.g. 0.2) or None, got {budget!r}")
        object.__setattr__(self, "checkpoint_stored", _names_or_bool(self.checkpoint_stored))
        if self.keep_blocks is not None:
            blocks = _names_or_bool(self.keep_blocks, what="keep_blocks")
            if isinstance(blocks, bool):
                raise TypeError(f"ConvertConfig.keep_blocks must be a collection of block names or None, "
                                f"got {self.keep_blocks!r}")
            if self.recompute_budget is not None:
                raise ValueError("ConvertConfig: give keep_blocks or recompute_budget, not both (both choose "
                                 "which couplings keep their outputs)")
            object.__setattr__(self, "keep_blocks", blocks)
        split = _names_or_bool(self.checkpoint_split, what="checkpoint_split")
        if isinstance(split, bool):
            raise TypeError(f"ConvertConfig.checkpoint_split must be a collection of part names, "
                            f"got {self.checkpoint_split!r}")
        if split and self.checkpoint_stored is not True:
            missing = [p for p in split if p not in (self.checkpoint_stored or ())]
            if missing:
                raise ValueError(f"ConvertConfig.checkpoint_split names {missing[0]!r}, which is not "
                                 f"checkpointed; add it to checkpoint_stored (or set checkpoint_stored=True)")
        object.__setattr__(self, "checkpoint_split", split)
        if self.select is not None and not callable(self.select):
            raise TypeError("ConvertConfig.select must be a callable taking a block name")
        if self.cuda_graphs and (self.compile is not False or (self.keep is not None and self.recompute_budget is None
                                                                and self.keep_blocks is None)):
            option = "compile" if self.compile is not False else "keep"
            raise ValueError(f"ConvertConfig: cuda_graphs=True with {option}={getattr(self, option)!r}: every segment "
                             f"would run eagerly (a segment that compiles its couplings or keeps outputs is not "
                             f"captured). Choose one of them")


def _names_or_bool(value: Any, what: str = "checkpoint_stored") -> bool | tuple[str, ...]:
    """True/False, or a collection of names normalised to a tuple. A lone string is refused: "yes"
    would otherwise silently name a part."""
    if isinstance(value, bool):
        return value
    try:
        names = None if isinstance(value, str) else tuple(value)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"ConvertConfig.{what} must be True or False, or a collection of names such "
                        f"as ('stem', 'layer2.0'), got {value!r}")
    return names


def _selector(analysis: Analysis, config: ConvertConfig) -> Callable[[str], bool] | None:
    if config.only is None and config.select is None:
        return None
    names = list(analysis.blocks)
    wanted: set[str] = set(names)
    if config.only is not None:
        wanted = set()
        for item in config.only:
            hits = [n for n in names if n == item or n.startswith(item + ".")]
            if not hits:
                close = difflib.get_close_matches(item, names + sorted({n.rsplit('.', 1)[0] for n in names}), n=3)
                raise ConversionError(f"ConvertConfig.only names {item!r}, which is not a residual block "
                                      f"of {analysis.report.model}" +
                                      (f"; did you mean {', '.join(map(repr, close))}?" if close else
                                       f"; blocks are {names[:6]}{' ...' if len(names) > 6 else ''}"))
            bad = [n for n in hits if analysis.violations[n]]
            if item in names and bad:
                v = analysis.violations[item][0]
                raise ConversionError(f"block {item!r} cannot become reversible ({v.code}: {v.message}); "
                                      f"run revconvert.audit(model) to see the eligible blocks")
            if len(bad) == len(hits):
                raise ConversionError(f"no block under {item!r} can become reversible "
                                      f"(reasons: {sorted({analysis.violations[n][0].code for n in bad})})")
            wanted.update(hits)
    sel = config.select
    return lambda name: name in wanted and (sel is None or bool(sel(name)))


def _check_example(example_input: Any) -> None:
    if isinstance(example_input, torch.Tensor) and example_input.dim() < 2:
        raise ConversionError(f"example_input has shape {tuple(example_input.shape)}; expected a batch "
                              f"such as (1, 3, 224, 224) with channels on dimension 1")


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles, with a warning: the result is not compiled."""
    inner = unwrap_compiled(model)
    if inner is model:
        return model
    if module_hooks(model):
        raise ConversionError(f"the torch.compile wrapper has hooks of its own ({', '.join(module_hooks(model))}); "
                              f"convert the module it wraps (model._orig_mod) and register them on the result")
    warnings.warn(f"revconvert.convert: the model is a torch.compile wrapper; converting the module it wraps "
                  f"({type(inner).__name__}, model._orig_mod). The result is not compiled: call "
                  f"torch.compile(converted) on it", stacklevel=3)
    return inner


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Drop nodes whose value nothing uses, except side effects: fx's own pass would also drop an
    in-place call whose result is unused (``h.mul_(2)`` as a statement), changing what the model
    computes."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users or node.is_impure() or mutated_inputs(gm, node):
            continue
        gm.graph.erase_node(node)


def coupling_groups(blocks: Sequence[T], pair: bool) -> list[tuple[T, ...]]:
    """The blocks each coupling of a run is built from, in order: one block each (F and G both
    from it), or with ``pair`` two consecutive blocks (F from the first, G from the second), a run
    of odd length ending with one block on its own (see :func:`half_coupling`)."""
    if not pair:
        return [(b,) for b in blocks]
    return [tuple(blocks[i:i + 2]) for i in range(0, len(blocks), 2)]


def half_coupling(group: Sequence[T], run: Sequence[T], pair: bool) -> bool:
    """Whether the coupling built from ``group`` (one of :func:`coupling_groups` of ``run``) is a half
    coupling, F only (``ReversibleCoupling(F)``): the last block of a paired run of odd length three
    or more, so that each block becomes one function. A paired run of one block keeps a full
    coupling (F and G both from it), so that both halves of the channels pass through a function."""
    return pair and len(group) == 1 and len(run) >= 3


def _choose_widths(plans: dict[str, ChannelPlan], functions: dict[str, int], config: ConvertConfig,
                   params_before: int) -> dict[str, Widths]:
    """Every block's widths (:func:`choose_widths`; ``functions``: how many residual functions each
    block becomes). Each block's functions are within 10% of its parameters where they can be; if
    the rounding to ``width_multiple`` moves the whole model more than 5% from its parameter count,
    the finer multiples (half, a quarter...) are tried, as for one block."""
    multiple = config.width_multiple
    while True:
        chosen = {name: choose_widths(plan, config.width, multiple, functions[name]) for name, plan in plans.items()}
        drift = sum(w.params - w.target for name, w in chosen.items() if plans[name].inner_groups)
        if config.width != "match-params" or multiple == 1 or abs(drift) <= 0.05 * max(params_before, 1):
            return chosen
        multiple = alignments(multiple)[1]


def _rewrite(analysis: Analysis, config: ConvertConfig,
             params_before: int) -> tuple[list[str], dict[str, float]]:
    """Replace each planned run by a ReversibleSegment; returns the converted block names and the
    parameter ratio (coupling / block) of every coupling off by more than 10%."""
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    mismatched: dict[str, float] = {}
    plans = {b.name: plan_channels(gm, b, nodes) for blocks in analysis.runs.values() for b in blocks}
    # per run, per coupling: the blocks its F and its G are rebuilt from (G None: a half coupling)
    sources = {seg: [(group[0], None if half_coupling(group, blocks, config.pair_blocks) else group[-1])
                     for group in coupling_groups(blocks, config.pair_blocks)]
               for seg, blocks in analysis.runs.items()}
    functions = Counter(b.name for run in sources.values() for fg in run for b in fg if b is not None)
    chosen = _choose_widths(plans, functions, config, params_before)

    # parameters and buffers the graph reads directly (layer scale): those only the replaced blocks
    # read are dropped at the end
    read_directly = {n.target for n in gm.graph.nodes if n.op == "get_attr"}

    def function(block: ResidualBlock) -> nn.Module:
        plan, widths = plans[block.name], chosen[block.name]
        if config.width == "match-params" and abs(widths.ratio - 1) > 0.1:
            mismatched[block.name] = widths.ratio
        pre = None
        if block.post_op and config.post_activation == "move":
            pre = out_of_place_copy(gm, nodes[block.post_op])
        return build_residual_function(gm, block, plan, widths, pre_activation=pre, zero_init=config.zero_init)

    # Every coupling is built from the untouched graph first: a segment may start where an earlier
    # one ends (a tree whose first block's output feeds the next block and an aggregation, as in
    # DLA), and rewriting the earlier one replaces the node the later one's branch reads.
    built = {seg: [ReversibleCoupling(function(f), None if g is None else function(g)) for f, g in sources[seg]]
             for seg in analysis.runs}
    exits = {seg: out_of_place_copy(gm, nodes[blocks[-1].post_op])
             if blocks[-1].post_op and config.post_activation == "move" else None
             for seg, blocks in analysis.runs.items()}
    replaced: dict[str, fx.Node] = {}  # a block output an earlier segment replaced -> that segment's node
    for seg_name, blocks in analysis.runs.items():
        couplings, exit_act, last = built[seg_name], exits[seg_name], blocks[-1]
        segment = ReversibleSegment(couplings, dim=analysis.axes.get(blocks[0].name, 1), exit_activation=exit_act,
                                    compile=config.compile,
                                    cuda_graphs=config.cuda_graphs)
        segment.use_reversible_backward = config.memory_saving
        segment.source_blocks = tuple(b.name for b in blocks)
        segment.coupling_blocks = tuple(tuple(dict.fromkeys(b.name for b in fg if b is not None))
                                        for fg in sources[seg_name])
        # The rebuilt layers are copies of the originals: they carry their requires_grad and their
        # train/eval mode (a norm kept in eval mode to freeze its statistics stays so); train() on the
        # segment must not reset those modes.
        modes = {m: m.training for c in couplings for m in c.modules() if m is not c}
        segment.train(gm.get_submodule(nodes[blocks[0].branch[0]].target).training
                      if nodes[blocks[0].branch[0]].op == "call_module" else gm.training)
        for m, mode in modes.items():
            m.training = mode
        gm.add_submodule(seg_name, segment)

        entry, exit_node = replaced.get(blocks[0].fork, nodes[blocks[0].fork]), nodes[last.output]
        with gm.graph.inserting_before(exit_node):
            new = gm.graph.call_module(seg_name, (entry,))
        new.meta["val"] = exit_node.meta.get("val")
        exit_node.replace_all_uses_with(new)
        replaced[exit_node.name] = new
        order = {n: i for i, n in enumerate(nodes)}
        owned = {n for b in blocks for n in b.nodes}
        dead = {u.name for n in owned for u in nodes[n].users if u.name not in owned and not u.users}
        for name in sorted(owned | dead, key=order.__getitem__, reverse=True):
            gm.graph.erase_node(nodes[name])
        analysis.node_segment[new.name] = seg_name
    gm.graph.lint()
    _eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    attach_checkpointed_modules(gm)  # re-converting: runs of the model name their modules only inside
    _drop_orphaned_tensors(gm, read_directly)
    gm.recompile()
    for n in gm.graph.nodes:
        n.meta["revconvert"] = {"segment": analysis.node_segment.get(n.name, "head")}
    return [b.name for blocks in analysis.runs.values() for b in blocks], mismatched


def _drop_orphaned_tensors(gm: fx.GraphModule, targets: set[str]) -> None:
    """Remove the parameters and buffers in ``targets`` that nothing reads any more.

    A block may read a tensor its module does not own (``h + self.gamma * self.body(h)`` at the
    root): its couplings got resized copies, and the original would stay behind unused, which an
    optimizer would carry and DDP would refuse as a parameter without a gradient. A tensor stays if
    a graph of the model still reads it, or if a module that owns it still runs (it may read it
    in its own code)."""
    graphs = [m for m in gm.modules() if isinstance(m, fx.GraphModule)]
    # by identity: the couplings' functions and checkpointed runs name tensors relative to themselves
    read = set()
    for g in graphs:
        for n in g.graph.nodes:
            if n.op == "get_attr":
                try:
                    read.add(id(resolve_attr(g, n.target)))
                except AttributeError:
                    pass
    # modules still called, by any graph (checkpointed runs name theirs as the model does; a
    # coupling's local names can only keep a tensor that could have gone)
    called = {n.target for g in graphs for n in g.graph.nodes if n.op == "call_module"}
    for target in sorted(targets - {n.target for n in gm.graph.nodes if n.op == "get_attr"}):
        path, _, name = target.rpartition(".")
        atoms = path.split(".") if path else []
        if any(".".join(atoms[:i]) in called for i in range(1, len(atoms) + 1)):
            continue
        try:
            owner = gm.get_submodule(path)
        except AttributeError:
            continue  # gone with its module
        if id(getattr(owner, name, None)) in read:
            continue
        if name in owner._parameters:
            del owner._parameters[name]
        elif name in owner._buffers:
            del owner._buffers[name]


def _apply_keep(gm: fx.GraphModule, analysis: Analysis, example_input: Any,
                config: ConvertConfig) -> tuple[list[str], float | None]:
    """Set ``keep`` on the couplings config asks for; returns their names and the planned overhead."""
    if config.keep is None and config.recompute_budget is None and config.keep_blocks is None:
        return [], None
    policy = KEEP_POLICIES[config.keep or "spatial-convs"]
    # Every coupling of the model, those of an earlier conversion too: the plan is of the whole model.
    couplings = {f"{name}.couplings.{k}": c for name, seg in gm.named_modules()
                 if isinstance(seg, ReversibleSegment) for k, c in enumerate(seg.couplings)}
    if config.keep_blocks is not None:
        by_block = {block: f"{seg}.couplings.{k}" for seg in analysis.runs
                    for k, group in enumerate(gm.get_submodule(seg).coupling_blocks) for block in group}
        missing = [b for b in config.keep_blocks if b not in by_block]
        if missing:
            raise ConversionError(f"ConvertConfig.keep_blocks names {missing[0]!r}, which is not a converted "
                                  f"block; converted blocks are {list(by_block)[:8]}"
                                  f"{' ...' if len(by_block) > 8 else ''}")
        names, overhead = list(dict.fromkeys(by_block[b] for b in config.keep_blocks)), None
    elif config.recompute_budget is None:
        names, overhead = list(couplings), None
    else:
        example = example_from(example_input, next(gm.parameters()).dtype)
        plan = plan_recompute(gm, example, float(config.recompute_budget), policy)
        names, overhead = plan.kept, plan.overhead
        if not plan.met:
            warnings.warn(f"revconvert.convert: recompute_budget={config.recompute_budget} cannot be met; with "
                          f"every coupling keeping its outputs the memory-saving backward still adds "
                          f"{plan.overhead:.1%} FLOPs per step ("
                          f"{'the stored parts and ' if config.checkpoint_stored else ''}the 1x1 convolutions "
                          f"are recomputed)", stacklevel=3)
        if plan.saved_bytes >= _LITTLE_SAVING * plan.ordinary_saved_bytes:
            warnings.warn(
                f"revconvert.convert: with recompute_budget={config.recompute_budget}, {len(plan.kept)} coupling(s) "
                f"keep their outputs and the converted model saves {format_bytes(plan.saved_bytes)} for backward "
                f"at the example input, {plan.saved_bytes / max(plan.ordinary_saved_bytes, 1):.0%} of the "
                f"{format_bytes(plan.ordinary_saved_bytes)} it saves under ordinary autograd (the default "
                f"conversion: {format_bytes(plan.recompute_saved_bytes)}): at this budget the conversion buys "
                f"little or no memory. Raise recompute_budget (at "
                f"{plan.recompute_flops / plan.ordinary_flops:.2f} nothing is kept), or train the original model",
                stacklevel=3)
    for coupling in couplings.values():
        coupling.keep = None
    for name in names:
        couplings[name].keep = policy
        # A plan (recompute_budget, or plan_memory's keep_blocks) must hold at every batch size: its
        # couplings keep every selected op, however small.
        couplings[name].keep_small = config.recompute_budget is not None or config.keep_blocks is not None
    return names, overhead


def convert(model: nn.Module, example_input: Any = None, *, config: ConvertConfig | None = None) -> fx.GraphModule:
    """Return a copy of ``model`` whose runs of stride-1 identity residual blocks are reversible.

    Each maximal run of consecutive eligible blocks becomes one :class:`ReversibleSegment`
    (channel split at its entry, concatenation at its exit); F and G of each coupling are rebuilt
    from the block's branch by channel surgery. Everything else stays as it was, with the same
    module names and weights. The caller's model is not modified.

    Args:
        model: the model to convert (any module torch.fx can trace).
        example_input: tensor, tuple of tensors, or shape; default ``(1, 3, 224, 224)``.
        config: a :class:`ConvertConfig`; default converts every eligible block.

    Returns:
        An ``fx.GraphModule``. ``converted.revconvert_summary`` says what was converted;
        ``revconvert.audit(converted)`` reports its reversible segments.

    Raises:
        TraceError: the model cannot be traced.
        ConversionError: the example input or the config does not fit the model.

    Example:
        >>> converted = revconvert.convert(torchvision.models.resnet18())
        >>> print(converted.revconvert_summary)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    config = config or ConvertConfig()
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a revconvert.ConvertConfig, got {type(config).__name__}")
    model = _unwrap_compiled(model)
    _check_example(example_input)
    trace_options = dict(leaf_modules=config.leaf_modules, autowrap_functions=config.autowrap_functions,
                         concrete_args=config.concrete_args)
    work = copy_sharing_hooks(model)  # every edit below happens on this copy
    analysis = analyze(work, example_input, share_modules=True, **trace_options)
    select = _selector(analysis, config)
    if select is not None:
        analysis = analyze(work, example_input, select=select, share_modules=True, **trace_options)
    check_hooks(work, analysis)
    analysis.graph_module.meta.pop("revconvert", None)  # the trace's notes, not the converted model's
    report = analysis.report
    params_before = sum(p.numel() for p in model.parameters())
    converted_blocks, mismatched = _rewrite(analysis, config, params_before)
    if mismatched:
        worst = min(mismatched.items(), key=lambda kv: -abs(kv[1] - 1))
        rebuilt = "residual function(s) rebuilt from" if config.pair_blocks else "coupling(s) replacing"
        warnings.warn(f"revconvert.convert: the {rebuilt} {len(mismatched)} block(s) of {report.model} are more than "
                      f"10% off the parameters of the block (e.g. {worst[0]}: {worst[1]:.2f}x): a branch without "
                      f"an inner width (a single convolution) or with very narrow inner layers cannot be "
                      f"matched by scaling its inner widths; see revconvert_summary.param_mismatch",
                      stacklevel=2)
    gm = analysis.graph_module
    gm.training = model.training
    parts = config.checkpoint_stored
    checkpointed = _checkpoint_stored_parts(gm, None if parts is True else parts,
                                            config.checkpoint_split) if parts else {}
    with no_global_hooks():  # the planner runs a meta copy
        kept, overhead = _apply_keep(gm, analysis, example_input, config)
    stored = {b.name: f"{b.reason}: {b.message}" for b in report.blocks if not b.reversible}
    summary = ConversionSummary(
        model=report.model, blocks=len(report.blocks), converted_blocks=converted_blocks,
        segments={name: [b.name for b in blocks] for name, blocks in analysis.runs.items()},
        couplings={name: len(gm.get_submodule(name).couplings) for name in analysis.runs},
        half_couplings={name: half for name in analysis.runs
                        if (half := sum(c.G is None for c in gm.get_submodule(name).couplings))},
        stored_reasons=stored, params_before=params_before,
        params_after=sum(p.numel() for p in gm.parameters()),
        not_selected=[b.name for b in report.blocks if b.reversible and not b.selected],
        kept_couplings=kept, recompute_overhead=overhead, checkpointed=checkpointed,
        param_mismatch=mismatched)
    previous = getattr(model, "revconvert_summary", None)
    if isinstance(previous, ConversionSummary):  # re-converting: report both conversions as one
        summary = combine_summaries(previous, summary, [s.name for s in report.segments])
    keep_summary(gm, summary)
    carry_root_hooks(model, gm)
    if not converted_blocks and report.converted_segments:
        warnings.warn(f"revconvert.convert: {report.model} is already converted "
                      f"({len(report.converted_segments)} reversible segments) and has no further eligible "
                      f"block; the returned model is equivalent to it", stacklevel=2)
    elif not converted_blocks and config.only != ():  # only=(): the caller asked for no conversion
        why = ", ".join(f"{k}: {v}" for k, v in sorted(report.reason_counts.items())) or "no residual blocks"
        warnings.warn(f"revconvert.convert: no block of {report.model} can become reversible ({why}); "
                      f"the returned model is equivalent to the original", stacklevel=2)
    return gm
