"""The instruments of benchmarks/speed.py: what the op counter counts, and the narrow ResNet-152."""

from __future__ import annotations

import contextlib
import pathlib
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from speedlib import GraphedSegments, Method, NarrowResNet, OpCounter, backward_step, count_ops  # noqa: E402

import revconvert  # noqa: E402


def test_op_counter_skips_views_and_empty_and_sees_backward() -> None:
    x = torch.randn(4, 4, requires_grad=True)
    with OpCounter() as counter:
        y = x.t().unsqueeze(0)[0, :2] * 2  # t, unsqueeze, select, slice: aliases; mul: a kernel
        torch.empty(3)
        torch.empty_like(x)
        y.sum().backward()  # sum, ones_like (the seed), mul (MulBackward), then accumulation
    assert "aten.t.default" not in counter.counts
    assert "aten.unsqueeze.default" not in counter.counts
    assert "aten.slice.Tensor" not in counter.counts
    assert not any(op.startswith("aten.empty") for op in counter.counts)
    assert counter.counts["aten.mul.Tensor"] == 2  # forward and backward
    assert counter.counts["aten.sum.default"] == 1


def test_memory_saving_step_counts_its_recomputation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                *[_Block(8) for _ in range(2)])
    x = torch.randn(2, 3, 8, 8)
    converted = revconvert.convert(model, x.shape)
    null = contextlib.nullcontext
    ordinary = count_ops(Method("ordinary", converted, revconvert.ordinary_autograd), x)
    saving = count_ops(Method("memory-saving", converted, null), x, where=True)
    # one extra forward of F and G per coupling: 2 couplings x (F, G) x 2 convolutions each
    extra = saving.counts["aten.convolution.default"] - ordinary.counts["aten.convolution.default"]
    assert extra == 2 * 2 * 2
    assert any(frames.startswith("runtime/") for frames, _ in saving.where)


def test_narrow_resnet_divides_every_width() -> None:
    model = NarrowResNet([3, 8, 36, 3], divisor=8)
    assert model.conv1.out_channels == 8
    assert [layer[0].conv1.out_channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] \
        == [8, 16, 32, 64]
    assert model.layer4[-1].conv3.out_channels == 256 == model.fc.in_features
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_keep_through_modules_runs_kept_calls_through_the_modules_with_the_same_gradients() -> None:
    # the A/B switch of speed.py --keep-through-modules must keep up with DirectSequential's signatures
    import speed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), *[_Block(8) for _ in range(2)])
    x = torch.randn(2, 3, 8, 8)
    keep = speed.keep_every(revconvert.convert(model, x.shape, config=revconvert.ConvertConfig(keep="spatial-convs")),
                            True)
    direct = Method("keep", keep, contextlib.nullcontext)
    via_modules = speed.keep_through_modules_variant([direct])
    with mock.patch.object(revconvert.runtime._keep._ModuleReplay, "check_done", autospec=True,
                           side_effect=revconvert.runtime._keep._ModuleReplay.check_done) as replayed:
        backward_step(via_modules, x)
    assert replayed.call_count > 0  # the kept outputs went back through the module-level replay
    grads = [p.grad.clone() for p in keep.parameters()]
    keep.zero_grad(set_to_none=True)
    backward_step(direct, x)
    for g, p in zip(grads, keep.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


class _Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def test_the_prepared_gpu_session_uses_only_options_its_scripts_have() -> None:
    # GPU time is scarce: a misspelt option in benchmarks/gpu_session.sh would waste a lease.
    root = pathlib.Path(__file__).resolve().parents[1]
    script = (root / "benchmarks" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "benchmarks" / "gpu_session.sh")]).returncode == 0
    commands = re.findall(r'"\$py" (benchmarks/\w+\.py)((?:[^\n]|\\\n)*)', script)
    assert {c[0] for c in commands} >= {"benchmarks/speed.py", "benchmarks/plan.py", "benchmarks/cuda_check.py"}
    for path, args in commands:
        helptext = subprocess.run([sys.executable, str(root / path), "--help"], capture_output=True, text=True,
                                  cwd=root, check=True).stdout
        for option in re.findall(r"(--[a-z][a-z0-9-]*)", args):
            assert option in helptext, f"{path} has no {option}"
    # and only variant names speed.py makes (a "graphed X" row is X captured whole)
    source = (root / "benchmarks" / "speed.py").read_text()
    for listed in re.findall(r"--variants ((?:[^;]|\\\n)*);;", script):
        for name in re.findall(r'"([^"]+)"|(\S+)', listed.replace("\\\n", " ")):
            name = (name[0] or name[1]).removeprefix("graphed ")
            assert f'"{name}"' in source, f"speed.py makes no variant {name!r}"


def test_widths_benchmark_measures_the_widths_each_multiple_gives_resnet50() -> None:
    """benchmarks/widths.py times convolutions at the widths resnet50's couplings have with
    width_multiple=8 and 32; if the width choice changes, its table must follow."""
    import torchvision
    from torch import nn
    from widths import CONVS

    model = torchvision.models.resnet50(weights=None)
    for multiple, column in ((8, 0), (32, 1)):
        converted = revconvert.convert(model, (1, 3, 64, 64),
                                       config=revconvert.ConvertConfig(width_multiple=multiple))
        inner = {m.out_channels for seg in converted.modules() if isinstance(seg, revconvert.ReversibleSegment)
                 for m in seg.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
        benched = {widths[column] for _, k, _, widths in CONVS if k == 3}
        assert inner == {48, 96} | benched, (multiple, inner, benched)  # layer1, layer2 the same either way


def test_graphed_segments_captures_every_segment_once_per_input_on_its_own_copy() -> None:
    # the plumbing of speed.py --graph-segments, which only a GPU can run: every reversible segment
    # handed to make_graphed_callables together, with samples of its real input's shape that require
    # grad, hooks gone, once per input shape; the caller's model keeps its eager segments
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    converted = revconvert.convert(model, (2, 3, 64, 64)).train()
    captures = []

    def capture(callables, samples):  # noqa: ANN001, ANN202 - stands in for torch.cuda.make_graphed_callables
        assert all(not seg._forward_pre_hooks and "forward" not in seg.__dict__ for seg in callables)
        captures.append([(tuple(s.shape), s.requires_grad) for (s,) in samples])
        for seg in callables:
            seg.forward = seg.forward  # as make_graphed_callables does: an instance attribute
        return callables

    graphed = GraphedSegments(converted)
    with mock.patch.object(torch.cuda, "make_graphed_callables", capture):
        for size in (64, 64, 32):
            out = graphed(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1000)
    assert captures == [[((2, 64, 16, 16), True), ((2, 128, 8, 8), True), ((2, 256, 4, 4), True),
                         ((2, 512, 2, 2), True)],
                        [((2, 64, 8, 8), True), ((2, 128, 4, 4), True), ((2, 256, 2, 2), True),
                         ((2, 512, 1, 1), True)]]
    assert not any("forward" in m.__dict__ for m in converted.modules())


def test_gpu_table_reports_launches_against_the_original() -> None:
    from speedlib import Row, gpu_table

    rows = [Row("gpu float32", "original", time_s=0.01, launches=1000),
            Row("gpu float32", "memory-saving", time_s=0.02, launches=2500)]
    line = next(row for row in gpu_table(rows, "CUDA events").splitlines() if "memory-saving" in row)
    assert "| 2500 | 2.50x |" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_count_launches_counts_kernels_and_a_cuda_graph_replay_as_one() -> None:
    from speedlib import count_launches

    x = torch.randn(1024, device="cuda")
    (x + 1).relu_()  # lazy initialisation out of the way
    assert count_launches(lambda: (x + 1).relu_()) == 2
    static = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.copy_((x * 2).relu_())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_((x * 2).relu_())
    assert count_launches(graph.replay) == 1


def _unbound_globals(path: pathlib.Path) -> set[str]:
    """Names that a function of ``path`` reads as globals but the module never binds (nor builtins)."""
    import builtins
    import symtable

    source = path.read_text()
    top = symtable.symtable(source, str(path), "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    bound |= {t.get_name() for t in top.get_children()}  # module-level def and class
    bound |= set(dir(builtins)) | {"__file__", "__name__"}
    missing: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            if s.is_referenced() and (s.is_global() or table is top) and not s.is_assigned() \
                    and s.get_name() not in bound:
                missing.add(f"{table.get_name()}: {s.get_name()}")
        for child in table.get_children():
            walk(child)

    walk(top)
    return missing


@pytest.mark.parametrize("script", sorted(p.name for p in (pathlib.Path(__file__).resolve().parents[1]
                                                             / "benchmarks").glob("*.py")))
def test_benchmark_script_reads_no_unbound_global(script: str) -> None:
    # A benchmark's GPU-only paths run nowhere in this suite: a name lost in a refactor (speed.py
    # --graph-segments calling grad_difference after it moved to speedlib) shows only on a device
    # machine, at the cost of its lease. Every global a function reads must be bound in the module.
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / script
    assert _unbound_globals(path) == set()
