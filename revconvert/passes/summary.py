"""ConversionSummary: what a conversion did, kept on the converted model as ``revconvert_summary``."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch.fx as fx

from .._format import format_count, render_table

__all__ = ["ConversionSummary", "keep_summary", "combine_summaries"]


@dataclass
class ConversionSummary:
    """What :func:`convert` did; available as ``converted.revconvert_summary``."""

    model: str
    blocks: int
    converted_blocks: list[str]
    segments: dict[str, list[str]]
    stored_reasons: dict[str, str]
    params_before: int
    params_after: int
    not_selected: list[str] = field(default_factory=list)
    kept_couplings: list[str] = field(default_factory=list)
    recompute_overhead: float | None = None
    checkpointed: dict[str, list[str]] = field(default_factory=dict)
    conversions: int = 1
    # block -> its coupling's (paired: its function's) parameters / the block's, where more than 10% off (a branch of one
    # convolution has no inner width to scale: its coupling has about half the parameters)
    param_mismatch: dict[str, float] = field(default_factory=dict)
    # segment -> its number of couplings (fewer than its blocks with ConvertConfig(pair_blocks=True))
    couplings: dict[str, int] = field(default_factory=dict)
    # segment -> how many of its couplings are half couplings, F only (a paired run of odd length ends with one)
    half_couplings: dict[str, int] = field(default_factory=dict)

    def __setstate__(self, state: dict) -> None:
        # summaries pickled by older versions (inside a saved model) lack the fields added since
        for f in fields(self):
            if f.name not in state and f.default_factory is not MISSING:
                state[f.name] = f.default_factory()
        self.__dict__.update(state)

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def __str__(self) -> str:
        lines = [f"{self.model}: converted {len(self.converted_blocks)} of {self.blocks} residual blocks "
                 f"into {len(self.segments)} reversible segment(s)"
                 f"{f' in {self.conversions} conversions' if self.conversions > 1 else ''}; parameters "
                 f"{format_count(self.params_before)} -> {format_count(self.params_after)} "
                 f"({self.param_ratio:.3f}x)"]
        if self.segments:
            rows = [(name, f"{self.couplings.get(name, len(blocks))}"
                           f"{f' ({self.half_couplings[name]} half)' if self.half_couplings.get(name) else ''}",
                     blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]}")
                    for name, blocks in self.segments.items()]
            lines += ["", render_table(("segment", "couplings", "replaces"), rows, align="lrl")]
        if self.not_selected:
            lines += ["", f"Eligible but not selected by the config ({len(self.not_selected)}): "
                          f"{', '.join(self.not_selected)}"]
        if self.recompute_overhead is not None:
            lines += ["", f"Recomputation: {len(self.kept_couplings)} coupling(s) keep their spatial conv "
                          f"outputs; estimated extra FLOPs per step {self.recompute_overhead:.1%} of ordinary "
                          "autograd"]
        elif self.kept_couplings:
            lines += ["", f"{len(self.kept_couplings)} coupling(s) keep outputs for the recomputation"]
        if self.param_mismatch:
            lines += ["", "Blocks rebuilt more than 10% off their parameters (no inner width, or too narrow "
                          "a one, to scale):"]
            lines += [f"  {name}: {ratio:.2f}x" for name, ratio in self.param_mismatch.items()]
        if self.stored_reasons:
            lines += ["", "Kept as stored blocks:"]
            lines += [f"  {name}: {reason}" for name, reason in self.stored_reasons.items()]
        if self.checkpointed:
            lines += ["", "Stored parts under activation checkpointing (recomputed in backward):"]
            lines += [f"  {name}: {', '.join(parts)}" for name, parts in self.checkpointed.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "param_ratio": self.param_ratio}


def keep_summary(gm: fx.GraphModule, summary: ConversionSummary) -> None:
    """Set ``gm.revconvert_summary`` so that it survives ``copy.deepcopy``."""
    gm.revconvert_summary = summary
    # GraphModule.__deepcopy__ rebuilds the module and keeps only attributes listed here.
    preserved = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
    gm.meta.setdefault(preserved, {})["revconvert_summary"] = summary


def combine_summaries(previous: ConversionSummary, new: ConversionSummary,
                      segment_order: list[str]) -> ConversionSummary:
    """The summary of converting an already converted model: ``previous`` (what its conversion did)
    and ``new`` (what this one did), as one conversion of the original model would report them.

    ``segment_order`` lists the converted model's segments in graph order.
    """
    segments = {**previous.segments, **new.segments}
    rank = {name: i for i, name in enumerate(segment_order)}
    segments = {name: segments[name] for name in sorted(segments, key=lambda n: rank.get(n, len(rank)))}
    return ConversionSummary(
        model=previous.model, blocks=previous.blocks,
        converted_blocks=[block for blocks in segments.values() for block in blocks],
        segments=segments,
        stored_reasons=new.stored_reasons, params_before=previous.params_before, params_after=new.params_after,
        not_selected=new.not_selected,
        # keep / recompute_budget of the new conversion set (or reset) every coupling's keep
        kept_couplings=new.kept_couplings if new.kept_couplings or new.recompute_overhead is not None
        else previous.kept_couplings,
        recompute_overhead=new.recompute_overhead if new.recompute_overhead is not None
        else previous.recompute_overhead,
        checkpointed={**previous.checkpointed, **new.checkpointed},
        param_mismatch={**previous.param_mismatch, **new.param_mismatch},
        couplings={**previous.couplings, **new.couplings},
        half_couplings={**previous.half_couplings, **new.half_couplings},
        conversions=previous.conversions + new.conversions)
