"""Does this torch's inductor CPU code compute the compiled couplings' backward step right in bfloat16?

With torch 2.14.1 it does not: the graph below (the shape of ``runtime/_fused.step_back`` for a
1x1 conv, batch norm, ReLU and 3x3 conv, in bfloat16 with the norm in float32) gives gradients 30-100%
off eager's and different from one call to the next. The same graph is right with
``torch._inductor.config.layout_optimization = False``, with ``cpp.simdlen = 0`` (no vectorisation),
and without the second ``convolution_backward``. That is why ``FusedCoupling.usable`` sends inductor on
a CPU under autocast to the per-call path. Run it after a torch upgrade: once it prints ``right``,
that exclusion can go.

    python benchmarks/inductor_cpu_check.py
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def step(w0, src, bw, bb, w3, grad):  # noqa: ANN001, ANN201 - a graph to compile, positional tensors
    cast, weight = src.to(torch.bfloat16), w0.to(torch.bfloat16)
    h = torch.conv2d(cast, weight)
    out, mean, invstd = aten.native_batch_norm(h.float(), bw, bb, None, None, True, 0.0, 1e-05)
    r = torch.relu(out.to(torch.bfloat16))
    w3b = w3.to(torch.bfloat16)
    gi, gw3, _ = aten.convolution_backward(grad.to(torch.bfloat16), r, w3b, None, (1, 1), (1, 1), (1, 1), False,
                                           [0, 0], 1, [True, True, False])
    g = aten.threshold_backward(gi, r, 0)
    gn, gbw, gbb = aten.native_batch_norm_backward(g.float(), h.float(), bw, None, None, mean, invstd, True, 1e-05,
                                                   [True, True, True])
    gx, gw0, _ = aten.convolution_backward(gn.to(torch.bfloat16), cast, weight, None, (1, 1), (0, 0), (1, 1), False,
                                           [0, 0], 1, [True, True, False])
    return gx.float(), gw0.float(), gbw, gbb, gw3.float()


def main() -> None:
    torch.manual_seed(0)
    c, w, s = 256, 96, 8
    args = (torch.randn(w, c, 1, 1) * 0.06, torch.randn(2, c, s, s), torch.rand(w) + 0.5, torch.randn(w),
            torch.randn(w, w, 3, 3) * 0.03, torch.randn(2, w, s, s))
    with torch.no_grad():
        eager = step(*args)
        compiled = torch.compile(step, backend="inductor")
        first, second = compiled(*args), compiled(*args)

    def worst(got: tuple, want: tuple) -> float:
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    off, drift = worst(first, eager), worst(second, first)
    print(f"torch {torch.__version__}: compiled vs eager {off:.2e}, compiled call to call {drift:.2e}: "
          f"{'right' if off < 1e-2 and drift < 1e-2 else 'WRONG'}")


if __name__ == "__main__":
    main()
