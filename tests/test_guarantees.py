"""Behaviour guarantees: a conversion behaves like the original or refuses clearly (issue 12)."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import revconvert
from revconvert import ConversionError
from revconvert.analysis.hooks import no_global_hooks
from revconvert.passes.recompute import plan_recompute
from revconvert.runtime import keep_spatial_convolutions
from conftest import assert_unchanged, snapshot, tv_model
from toy_models import CifarResNet, FunctionalBlock


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- frozen parameters and frozen norms (item 3) --------------------------------------------------

def test_frozen_model_stays_frozen_except_what_was_trainable():
    model = tv_model("resnet18")
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    before = snapshot(model)
    converted = revconvert.convert(model, (1, 3, 32, 32))
    assert _trainable(converted) == _trainable(model) == 513_000
    assert [n for n, p in converted.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert_unchanged(model, before)
    converted(torch.randn(2, 3, 32, 32)).sum().backward()  # frozen couplings, trainable head
    assert converted.fc.weight.grad is not None
    assert all(p.grad is None for n, p in converted.named_parameters() if not n.startswith("fc."))


def test_partly_frozen_block_maps_layer_by_layer():
    model = tv_model("resnet18").train()
    block = model.layer1[1]
    block.bn1.requires_grad_(False)       # frozen affine norm, trainable convs
    block.conv2.requires_grad_(False)
    block.bn2.eval()                      # frozen statistics
    converted = revconvert.convert(model, (1, 3, 32, 32))
    (seg_name, seg), = [(n, m) for n, m in converted.named_modules()
                        if isinstance(m, revconvert.ReversibleSegment) and "layer1.1" in m.source_blocks]
    coupling = seg.couplings[list(seg.source_blocks).index("layer1.1")]
    for fn in (coupling.F, coupling.G):
        pre, conv1, bn1, relu, conv2, bn2 = fn  # ReLU moved to the front, then the branch layer by layer
        assert conv1.weight.requires_grad
        assert not bn1.weight.requires_grad and not bn1.bias.requires_grad
        assert not conv2.weight.requires_grad
        assert bn2.weight.requires_grad
        assert bn2.training is False and bn1.training is True
    assert model.layer1[1].bn2.training is False and model.layer1[1].bn1.training  # caller's untouched
    # the other coupling of the segment is fully trainable, like its block
    other = seg.couplings[list(seg.source_blocks).index("layer1.0")] if "layer1.0" in seg.source_blocks \
        else None
    if other is not None:
        assert all(p.requires_grad for p in other.parameters())
    x = torch.randn(2, 3, 32, 32)
    converted(x).sum().backward()
    assert coupling.F[2].weight.grad is None and coupling.F[1].weight.grad is not None


class _LayerScaleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 1e-6))

    def forward(self, x):
        h = self.stem(x)
        return h + self.gamma * self.conv(h)


def test_every_rebuilt_parameter_keeps_the_flag_of_the_one_it_resizes():
    """The surgery copies each layer and resizes its tensors: a parameter used directly (layer scale)
    and a partly frozen layer keep their flags parameter by parameter; no rebuilt parameter lacks a
    counterpart, so there is nothing to refuse."""
    model = _LayerScaleBlock()
    model.gamma.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    converted = revconvert.convert(model, (1, 3, 8, 8))
    (segment,) = [m for m in converted.modules() if isinstance(m, revconvert.ReversibleSegment)]
    flags = {n: p.requires_grad for n, p in segment.named_parameters()}
    assert flags and all(flag == (n.endswith("conv.weight")) for n, flag in flags.items()), flags


# -- hooks (item 4) ------------------------------------------------------------------------------

class _Recorder:
    """A hook that is a bound method: a plain deep copy would record into a copy of it."""

    def __init__(self):
        self.shapes, self.modules = [], []

    def hook(self, module, args, output):
        self.shapes.append(tuple(output.shape))

    def load_hook(self, module, state_dict, prefix, *rest):
        self.modules.append(module)


def test_hooks_on_the_model_itself_are_carried_over():
    model = tv_model("resnet18").eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: out + 100)
    model.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    converted = revconvert.convert(model, (1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    torch.testing.assert_close(converted(x), converted.forward(2 * x) + 100)
    converted(x).sum().backward()
    assert calls == ["backward"]
    import copy
    torch.testing.assert_close(copy.deepcopy(converted)(x), converted(x))  # a deep copy keeps them



def test_state_dict_hooks_on_the_model_itself_are_carried_over():
    model, calls = CifarResNet(n=1), []
    model.register_state_dict_pre_hook(lambda m, prefix, keep_vars: calls.append(("pre", m)))
    model.register_state_dict_post_hook(lambda m, sd, prefix, meta: calls.append(("post", m)))
    # the older private hook may return a new state dict, which the root's state_dict() returns
    model._register_state_dict_hook(lambda m, sd, prefix, meta: {k: v for k, v in sd.items()
                                                                 if not k.endswith("num_batches_tracked")})
    model.register_load_state_dict_pre_hook(lambda m, sd, *rest: calls.append(("load-pre", m)))
    model.register_load_state_dict_post_hook(lambda m, keys: calls.append(("load-post", m)))
    converted = revconvert.convert(model, (2, 3, 16, 16))
    assert calls == []
    for target in (converted, copy.deepcopy(converted)):  # a deep copy keeps them, calling itself
        calls.clear()
        state = target.state_dict()
        assert state and not any(k.endswith("num_batches_tracked") for k in state)
        target.load_state_dict(state, strict=False)
        assert calls == [("pre", target), ("post", target), ("load-pre", target), ("load-post", target)]


def test_a_backward_hook_registered_after_conversion_survives_a_deep_copy():
    converted = revconvert.convert(CifarResNet(n=1), (2, 3, 16, 16))
    calls = []
    converted.register_full_backward_hook(lambda m, gin, gout: calls.append(m))
    duplicate = copy.deepcopy(converted)
    for target in (duplicate, copy.deepcopy(duplicate)):
        calls.clear()
        target(torch.randn(2, 3, 16, 16)).sum().backward()
        assert calls == [target]

def test_hooks_on_stored_leaf_modules_keep_calling_the_callers_hook():
    model = tv_model("resnet18").eval()
    recorder = _Recorder()
    model.layer2[0].conv1.register_forward_hook(recorder.hook)    # a stored (projection) block
    converted = revconvert.convert(model, (1, 3, 32, 32))
    assert recorder.shapes == []                                   # conversion ran no hook
    converted(torch.randn(1, 3, 32, 32))
    assert recorder.shapes == [(1, 128, 4, 4)]                     # the caller's recorder, once


@pytest.mark.parametrize("where,match", [
    ("layer1", r"forward hook .* on 'layer1' \(Sequential\).*leaf_modules=\('layer1',\)"),
    ("layer1.1", r"on 'layer1.1' \(BasicBlock\).*traces through"),
    ("layer1.1.conv2", r"on 'layer1.1.conv2' \(Conv2d\), a layer of block 'layer1.1'.*select="),
    ("layer1.1.relu", r"'layer1.1.relu' \(ReLU\), a layer of block 'layer1.1'"),
])
def test_hooks_that_cannot_be_carried_are_refused(where, match):
    model = tv_model("resnet18")
    model.get_submodule(where).register_forward_hook(lambda m, args, out: None)
    before = snapshot(model)
    with pytest.raises(ConversionError, match=match):
        revconvert.convert(model, (1, 3, 32, 32))
    assert_unchanged(model, before)



@pytest.mark.parametrize("where,match", [
    ("layer1", r"state-dict hook .* on 'layer1' \(Sequential\).*traces through"),
    ("layer1.1.bn2", r"state-dict hook .* on 'layer1.1.bn2' \(BatchNorm2d\), a layer of block 'layer1.1'"),
])
def test_state_dict_hooks_that_would_be_lost_are_refused(where, match):
    # The converted model has no such module (a bare container stands for 'layer1'; bn2 is rebuilt):
    # the hook would silently never run.
    model = tv_model("resnet18")
    model.get_submodule(where).register_state_dict_post_hook(lambda m, sd, prefix, meta: None)
    with pytest.raises(ConversionError, match=match):
        revconvert.convert(model, (1, 3, 32, 32))


def test_state_dict_hooks_on_stored_leaf_modules_keep_calling_the_callers_hook():
    model = tv_model("resnet18")
    recorder = _Recorder()
    model.layer2[0].conv1.register_load_state_dict_pre_hook(recorder.load_hook)
    converted = revconvert.convert(model, (1, 3, 32, 32))
    converted.load_state_dict(converted.state_dict())
    assert recorder.modules == [converted.get_submodule("layer2.0.conv1")]  # the caller's recorder, given the copy

def test_the_remedies_the_refusal_names_work():
    model = tv_model("resnet18").eval()
    recorder = _Recorder()
    model.layer1[1].register_forward_hook(recorder.hook)
    converted = revconvert.convert(model, (1, 3, 32, 32),
                                   config=revconvert.ConvertConfig(leaf_modules=("layer1.1",)))
    assert "layer1.1" not in converted.revconvert_summary.converted_blocks
    converted(torch.randn(1, 3, 32, 32))
    assert recorder.shapes == [(1, 64, 8, 8)]


def test_audit_and_memory_profile_call_no_hook():
    model = tv_model("resnet18")
    calls = []
    model.conv1.register_forward_hook(lambda m, a, o: calls.append("leaf"))
    model.layer1.register_forward_hook(lambda m, a, o: calls.append("non-leaf"))
    model.register_forward_hook(lambda m, a, o: calls.append("root"))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append("global"))
    try:
        revconvert.audit(model, (1, 3, 32, 32))
        revconvert.memory_profile(model, (3, 32, 32), 2)
    finally:
        handle.remove()
    assert calls == []



def test_memory_and_recompute_planners_call_no_global_hook():
    converted = revconvert.convert(CifarResNet(n=2), (2, 3, 16, 16))
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        revconvert.plan_memory(CifarResNet(n=1), "1GiB", input_size=16, batch_size=2)
        plan_recompute(converted, (torch.randn(2, 3, 16, 16),), 0.5, keep_spatial_convolutions)
    finally:
        handle.remove()
    assert calls == []


class _Gates:
    """Two events that every copy of a model shares (the analysis runs copies of the model)."""

    def __init__(self, entered, proceed):
        self.entered, self.proceed = entered, proceed

    def __deepcopy__(self, memo):
        return self


class _Gate(nn.Module):
    """Passes its input on after opening ``entered`` and waiting up to two seconds for ``proceed``.
    Kept as a leaf, it runs inside the analysis (shape propagation), where another thread's analysis
    gets the chance to start."""

    def __init__(self, entered, proceed):
        super().__init__()
        self.gates = _Gates(entered, proceed)

    def forward(self, x):
        self.gates.entered.set()
        self.gates.proceed.wait(timeout=2)
        return x


def _gated(entered, proceed):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Gate(entered, proceed), FunctionalBlock(8))


def test_global_hooks_survive_analyses_in_two_threads():
    # B's analysis starts while A's runs. Unserialised, A's end put the hooks back while B's ran
    # (which then called them), and B's end set them aside for good (it had saved A's empty dicts).
    a_in, b_in, a_done = (threading.Event() for _ in range(3))
    model_a, model_b = _gated(a_in, b_in), _gated(b_in, a_done)
    calls, errors = [], []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))

    def audit(model, done=None):
        try:
            revconvert.audit(model, (1, 3, 8, 8), leaf_modules=(_Gate,))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            if done is not None:
                done.set()

    try:
        _overlapping(threading.Thread(target=audit, args=(model_a, a_done)),
                     threading.Thread(target=audit, args=(model_b,)), a_in)
        assert not errors, errors
        assert calls == []  # neither analysis ran the hook
        nn.Identity()(torch.zeros(1))
        assert calls == ["Identity"]  # still registered, and it fires
    finally:
        handle.remove()
    nn.Identity()(torch.zeros(1))
    assert calls == ["Identity"]  # and its handle still removes it


class _TracedGate(nn.Module):
    """Opens ``entered`` while fx traces its forward, then gives another thread two seconds to start
    a trace of its own."""

    def __init__(self, entered, proceed):
        super().__init__()
        self.gates = _Gates(entered, proceed)
        self.block = FunctionalBlock(8)

    def forward(self, x):
        self.gates.entered.set()
        self.gates.proceed.wait(timeout=2)
        return self.block(x)


def test_traces_in_two_threads_take_turns():
    # torch.fx patches nn.Module.__call__ while it traces: interleaved traces undo each other's
    # patches and fail ("module is not installed as a submodule") or leave one in place.
    a_in, b_in = threading.Event(), threading.Event()
    original_call, errors = nn.Module.__call__, []

    def audit(model):
        try:
            revconvert.audit(model, (1, 8, 8, 8))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    _overlapping(threading.Thread(target=audit, args=(_TracedGate(a_in, b_in),)),
                 threading.Thread(target=audit, args=(_TracedGate(b_in, threading.Event()),)), a_in)
    assert not errors, errors
    assert nn.Module.__call__ is original_call


def _overlapping(a: threading.Thread, b: threading.Thread, a_in: threading.Event) -> None:
    """Start ``b`` once ``a`` is inside its analysis (``a_in``), then wait for both."""
    a.start()
    assert a_in.wait(timeout=60)
    b.start()
    a.join(timeout=120)
    b.join(timeout=120)


def test_a_global_hook_registered_during_an_analysis_is_kept_after_the_older_ones():
    order = []
    first = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: order.append("first"))
    try:
        with no_global_hooks():
            second = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: order.append("second"))
            with no_global_hooks():  # nested: still set aside afterwards
                pass
            nn.Identity()(torch.zeros(1))
            assert order == ["second"]
        nn.Identity()(torch.zeros(1))
        assert order == ["second", "first", "second"]
        second.remove()
    finally:
        first.remove()
    nn.Identity()(torch.zeros(1))
    assert order == ["second", "first", "second"]

# -- example inputs without a batch dimension (item 7) -------------------------------------------

class _FullyConvolutional(nn.Module):
    """16 channels in, so an unbatched (16, 16, 16) sample fits every conv as if it were a batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x):
        x = self.conv(x)
        return x + self.block(x)


@pytest.mark.parametrize("call", [
    lambda m, s: revconvert.convert(m, s),
    lambda m, s: revconvert.audit(m, s),
    lambda m, s: revconvert.audit(m, torch.randn(s)),
    lambda m, s: revconvert.measure_memory(m, torch.randn(s)),
], ids=["convert", "audit", "audit-tensor", "measure_memory"])
@pytest.mark.parametrize("factory,shape", [(lambda: tv_model("resnet18"), (3, 16, 16)),
                                           (_FullyConvolutional, (16, 16, 16))], ids=["resnet18", "fully-conv"])
def test_an_unbatched_example_is_refused_with_the_fix(call, factory, shape):
    model = factory()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"as shape \({shape[0]}, 16, 16\), one sample without a batch dimension.*\(1, {shape[0]}, 16, 16\)"):
        call(model, shape)
    assert_unchanged(model, before)


# -- torch.compile wrappers (item 8) -------------------------------------------------------------

def test_a_torch_compile_wrapper_is_seen_through():
    model = tv_model("resnet18")
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called
    before = snapshot(model)
    assert revconvert.audit(compiled, (1, 3, 32, 32)).to_dict() == revconvert.audit(model, (1, 3, 32, 32)).to_dict()
    with pytest.warns(UserWarning, match=r"torch.compile wrapper.*model._orig_mod.*not compiled.*torch.compile\(converted\)"):
        converted = revconvert.convert(compiled, (1, 3, 32, 32))
    assert converted.revconvert_summary.converted_blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert revconvert.memory_profile(compiled, (3, 32, 32), 2).model_name == "ResNet"
    assert_unchanged(model, before)


# -- converting a converted model (item 11) ------------------------------------------------------

def test_a_second_conversion_reports_both():
    model = tv_model("resnet18")
    first = revconvert.convert(model, (1, 3, 32, 32), config=revconvert.ConvertConfig(only=("layer3",)))
    second = revconvert.convert(first, (1, 3, 32, 32))   # the rest; layer4 runs at 1x1 with a batch of 1
    once = revconvert.convert(model, (1, 3, 32, 32)).revconvert_summary
    summary = second.revconvert_summary
    assert summary.converted_blocks == once.converted_blocks
    assert summary.segments == once.segments
    assert (summary.blocks, summary.params_before, summary.conversions) == (once.blocks, once.params_before, 2)
    assert "converted 5 of 8 residual blocks into 4 reversible segment(s) in 2 conversions" in str(summary)
    with pytest.warns(UserWarning, match="already converted"):
        third = revconvert.convert(second, (1, 3, 32, 32))
    assert third.revconvert_summary.converted_blocks == once.converted_blocks


# -- a recompute budget that buys no memory (item 11) --------------------------------------------

def test_a_budget_that_keeps_more_than_ordinary_autograd_warns_with_the_numbers():
    model = tv_model("resnet18")
    with pytest.warns(UserWarning, match=r"recompute_budget=0.0, 5 coupling\(s\) keep.*saves [\d.]+ MiB.*"
                                         r"11\d% of the [\d.]+ MiB it saves under ordinary autograd.*"
                                         r"default conversion: [\d.]+ MiB.*Raise recompute_budget \(at 0\.2\d"):
        revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(recompute_budget=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget that does buy memory: no warning
        revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(recompute_budget=0.1))


def test_a_second_conversion_can_plan_a_budget_over_every_coupling():
    model = tv_model("resnet18")
    first = revconvert.convert(model, (2, 3, 64, 64), config=revconvert.ConvertConfig(only=("layer4",)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget-buys-little warning
        second = revconvert.convert(first, (2, 3, 64, 64), config=revconvert.ConvertConfig(recompute_budget=0.0))
    kept = second.revconvert_summary.kept_couplings
    assert "layer4.rev_1.couplings.0" in kept and "layer1.rev_0_1.couplings.0" in kept
    assert all(second.get_submodule(name).keep is not None for name in kept)
