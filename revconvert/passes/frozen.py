"""Frozen parts stay frozen: F and G take ``requires_grad`` and train/eval from the layers they rebuild.

The surgery rebuilds a block's branch layer by layer (one new layer per original layer, in both F
and G), so each new layer has exactly one original. Its parameters take ``requires_grad`` from the
original's parameter of the same name (``weight``, ``bias``); its train/eval mode from the original
layer (a batch norm kept in eval mode to freeze its statistics stays in eval mode). A frozen block
therefore becomes a frozen coupling, and a block with a frozen norm a coupling whose norms are frozen.
A new parameter without a same-named original takes the setting of all the original layer's
parameters; when those disagree there is no faithful rule and the conversion refuses.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConversionError

__all__ = ["carry_frozen_flags"]


def carry_frozen_flags(fn: nn.Sequential, originals: Sequence[nn.Module | None], *, block: str) -> None:
    """Give each rebuilt layer of ``fn`` the ``requires_grad`` and train/eval mode of its original.

    Args:
        fn: F or G as built by the surgery: an optional pre-activation, then one layer per branch op.
        originals: the module each branch op called, in order (None for a function or method).
        block: the block's name, for the error message.

    Raises:
        ConversionError: a new parameter has no same-named original and the original layer's
            parameters are partly frozen.
    """
    layers = list(fn)[len(fn) - len(originals):]  # the pre-activation is a deep copy: already faithful
    for layer, original in zip(layers, originals):
        if original is None:
            continue
        layer.train(original.training)
        own = dict(original.named_parameters())
        flags = {p.requires_grad for p in own.values()}
        for name, p in layer.named_parameters():
            if name in own:
                p.requires_grad_(own[name].requires_grad)
            elif len(flags) == 1:
                p.requires_grad_(next(iter(flags)))
            elif flags:
                frozen = sorted(n for n, q in own.items() if not q.requires_grad)
                raise ConversionError(
                    f"block {block!r}: its layer {type(original).__name__} has frozen parameters "
                    f"({', '.join(frozen)}) and trainable ones, and the rebuilt layer's parameter "
                    f"{name!r} has no counterpart to take its setting from. Hint: freeze or unfreeze "
                    f"that layer as a whole before converting, or leave the block out with "
                    f"ConvertConfig(select=lambda name: name != {block!r}).")
