"""The command line as a user meets it (issue 14).

Every test works from a user's folder holding a small model file. Where the process itself is what
is tested (help without torch, the current folder on the import path, how warnings print, exit
status) the tool runs in a subprocess (``python -m revconvert``, or a launcher script that behaves
like the installed console script) with PYTHONPATH pointing at this checkout. Elsewhere ``main()``
runs in-process, in that folder: a subprocess costs seconds of torch import, an in-process call
none. Mistakes must end in one line ``revconvert: error: ...`` with exit status 2 before any model
is built or traced: the model file leaves marker files when it is built and when it is traced.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from revconvert.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODELS = textwrap.dedent('''
    import pathlib

    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c, conv=nn.Conv2d, bn=nn.BatchNorm2d):
            super().__init__()
            self.conv1, self.bn1 = conv(c, c, 3, padding=1, bias=False), bn(c)
            self.conv2, self.bn2 = conv(c, c, 3, padding=1, bias=False), bn(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.branch = nn.Sequential(nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                        nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(c // 2), nn.ReLU(),
                                        nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.branch(x))


    class TinyNet(nn.Module):
        def __init__(self, block=Block, n=2):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.blocks = nn.Sequential(*[block(16) for _ in range(n)])
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))


    class Marked(TinyNet):
        """Leaves built.txt when built and traced.txt when its forward runs (tracing runs it)."""

        def __init__(self):
            super().__init__()
            pathlib.Path("built.txt").write_text("built")

        def forward(self, x):
            pathlib.Path("traced.txt").write_text("traced")
            return super().forward(x)


    def bottlenecks():
        return TinyNet(Bottleneck)


    def one_block():
        return TinyNet(n=1)


    def plain():
        """No residual block at all (like vgg11)."""
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


    class Tiny1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(4, 16, 3, padding=1)
            self.blocks = nn.Sequential(Block(16, nn.Conv1d, nn.BatchNorm1d), Block(16, nn.Conv1d, nn.BatchNorm1d))

        def forward(self, x):
            return self.blocks(self.stem(x)).mean(2)


    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it


    class Untraceable(TinyNet):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(16), Gate(), Block(16))
''')

# What the console script does: a script outside the current folder calls main(), so sys.path[0] is
# the script's folder, not the current one (unlike python -m, which puts the current folder first).
LAUNCHER = "import sys\nfrom revconvert.cli import main\nsys.exit(main())\n"


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A user's folder: mymodels.py, and a copy as nets/zoo.py."""
    (tmp_path / "mymodels.py").write_text(MODELS)
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "zoo.py").write_text(MODELS)
    return tmp_path


def run(folder: pathlib.Path, *args: str, launcher: bool = False, timeout: float = 300,
        python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("REVCONVERT_TEST_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if launcher:
        script = folder.parent / f"{folder.name}_bin" / "revconvert_script.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(LAUNCHER)
        cmd = [sys.executable, *python_args, str(script), *args]
    else:
        cmd = [sys.executable, *python_args, "-m", "revconvert", *args]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(folder, monkeypatch, capsys):
    """``cli(*args)`` runs ``main(args)`` in-process in ``folder``; returns code, stdout, stderr."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the tool puts the current folder on it
    before = set(sys.modules)

    def call(*args: str) -> Result:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors, --help, --version
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield call
    for name in set(sys.modules) - before:  # the user's model modules, not torch's lazy imports
        if name.split(".")[0] in ("mymodels", "zoo", "matplotlib"):
            del sys.modules[name]


def assert_one_line_error(proc: Result | subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revconvert: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------- #
# 5. help, version, python -m, lazy import
# --------------------------------------------------------------------------------------------- #
def test_help_and_usage_errors_do_not_import_torch(folder):
    proc = run(folder, "--help", python_args=("-X", "importtime"))
    assert proc.returncode == 0 and "MODEL is one of" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert "torch" not in imported and "revconvert.cli" in imported
    assert "``" not in proc.stdout
    proc = run(folder, "convert", "resnet18", "-o", "x.pt", "--width", "1e3", python_args=("-X", "importtime"))
    assert proc.returncode == 2 and "import time:" in proc.stderr
    assert not any(line.split("|")[-1].strip() == "torch" for line in proc.stderr.splitlines())


def test_package_imports_lazily_and_keeps_its_public_names(folder):
    code = ("import sys, revconvert\n"
            "assert 'torch' not in sys.modules\n"
            "print(revconvert.__file__)\n"
            "import revconvert.memory\n"  # imports the passes (convert) and the analysis (audit) first
            "from revconvert import ConvertConfig, audit, convert\n"
            "assert callable(audit) and callable(convert), (audit, convert)\n"
            "assert revconvert.audit is audit and revconvert.convert is convert\n"
            "assert ConvertConfig.__module__ == 'revconvert.passes.convert'\n"
            "assert set(revconvert.__all__) <= set(dir(revconvert))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "revconvert" / "__init__.py")


def test_version_and_help_defaults(folder):
    import revconvert

    proc = run(folder, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"revconvert {revconvert.__version__}"
    proc = run(folder, "memory", "--help")
    text = " ".join(proc.stdout.split())
    assert "--batch-size N samples per training step (default: 1)" in text
    assert "(default: float32)" in text and "(default: none" in text
    assert "``" not in proc.stdout


def test_parser_choices_match_the_library():
    from revconvert import cli
    from revconvert.memory.estimate import DTYPES
    from revconvert.memory.optim import OPTIMIZERS
    from revconvert.runtime import KEEP_POLICIES

    assert sorted(cli.KEEP_CHOICES) == sorted(KEEP_POLICIES)
    assert sorted(cli.OPTIMIZER_CHOICES) == sorted(OPTIMIZERS)
    assert sorted(cli.DTYPE_CHOICES) == sorted(DTYPES)


# --------------------------------------------------------------------------------------------- #
# 1. mistakes: one line, exit 2, before any work
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("args, needle", [
    (["--width", "1e3"], "<= 4"),
    (["--width", "0"], "> 0"),
    (["--width", "-1"], "> 0"),
    (["--width", "nan"], "'nan'"),
    (["--width", "inf"], "'inf'"),
    (["--width", "wide"], "match-params, keep"),
    (["-o", "no/such/dir/out.pt"], "folder 'no/such/dir' does not exist"),
    (["-o", "nets"], "is a folder"),
])
def test_convert_mistakes_are_refused_before_the_model_is_built(folder, args, needle):
    argv = ["convert", "mymodels:Marked", "--input-size", "32", *args]
    if "-o" not in args:
        argv += ["-o", "out.pt"]
    assert_one_line_error(run(folder, *argv), needle)
    assert not (folder / "built.txt").exists() and not (folder / "out.pt").exists()


def test_input_size_that_does_not_fit_is_refused_before_tracing(folder, cli):
    proc = run(folder, "audit", "mymodels:Marked", "--input-size", "3x224x224x2")
    assert_one_line_error(proc, "--input-size 3x224x224x2 does not fit", "CxHxW")
    assert not (folder / "traced.txt").exists() and "Traceback" not in proc.stderr
    for command, extra in (("convert", ["-o", "out.pt"]), ("memory", []), ("report", [])):
        assert_one_line_error(cli(command, "mymodels:Marked", "--input-size", "3x224x224x2", *extra),
                              "--input-size 3x224x224x2 does not fit")
    assert not (folder / "traced.txt").exists() and not (folder / "out.pt").exists()


def test_input_size_syntax_and_batch_size_are_usage_errors(folder):
    assert_one_line_error(run(folder, "audit", "resnet18", "--input-size", "big"), "--input-size")
    assert_one_line_error(run(folder, "audit", "resnet18", "--input-size", "1x2x3x4x5"), "at most 4")
    assert_one_line_error(run(folder, "memory", "resnet18", "--batch-size", "0"), "--batch-size")
    assert_one_line_error(run(folder, "memory", "mymodels:Marked", "--plot", "no/dir/m.png"),
                          "--plot no/dir/m.png: folder 'no/dir' does not exist")
    assert not (folder / "built.txt").exists()


def test_untraceable_model_gets_cli_advice_and_leaf_module_fixes_it(cli):
    err = assert_one_line_error(cli("audit", "mymodels:Untraceable", "--input-size", "16"),
                                "could not trace module 'blocks.1'", "--leaf-module blocks.1")
    assert "leaf_modules=" not in err
    for leaf in ("blocks.1", "Gate"):  # a submodule's name or a module class
        proc = cli("audit", "mymodels:Untraceable", "--input-size", "16", "--leaf-module", leaf, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["num_reversible"] == 2
    proc = cli("convert", "mymodels:Untraceable", "-o", "c.pt", "--input-size", "16", "--leaf-module", "Gate")
    assert proc.returncode == 0 and "converted 2 of 2" in proc.stdout, proc.stderr
    assert_one_line_error(cli("audit", "mymodels:Untraceable", "--leaf-module", "blocks.9"),
                          "--leaf-module blocks.9", "did you mean")


def test_ineligible_only_block_advises_the_cli_audit(tmp_path, capsys):
    out = tmp_path / "unused.pt"
    assert main(["convert", "resnet18", "-o", str(out), "--only", "layer2.0", "--input-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "run revconvert audit resnet18" in err and "revconvert.audit(" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------- #
# 2. own models: module:factory from the current folder, file.py:factory, saved files
# --------------------------------------------------------------------------------------------- #
def test_module_factory_from_the_current_folder_like_the_console_script(folder):
    # the launcher behaves like the console script: the current folder is not on sys.path by itself
    proc = run(folder, "audit", "mymodels:TinyNet", "--input-size", "16", "--json", launcher=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_reversible"] == 2


@pytest.mark.parametrize("spec, reversible", [("mymodels.py:TinyNet", 2), ("nets/zoo.py:one_block", 1),
                                              ("mymodels:TinyNet", 2)])
def test_own_model_specs(cli, spec, reversible):
    proc = cli("audit", spec, "--input-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_reversible"] == reversible


def test_saved_model_file_from_convert(folder, cli):
    proc = cli("convert", "nets/zoo.py:TinyNet", "-o", "converted.pt", "--input-size", "16")
    assert proc.returncode == 0 and (folder / "converted.pt").is_file(), proc.stderr
    proc = cli("memory", "converted.pt", "--input-size", "16", "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["input_size"] == [3, 16, 16] and data["original"]["peak_bytes"] > 0
    assert data["converted"] is None  # already converted: profiled as it is
    torch.save(torch.nn.Linear(2, 2).state_dict(), folder / "weights.pt")
    assert_one_line_error(cli("memory", "weights.pt"), "holds a state dict")
    assert_one_line_error(cli("memory", "missing.pt"), "no such model file 'missing.pt'")
    assert_one_line_error(cli("audit", "mymodels.py"), "name the factory too")


# --------------------------------------------------------------------------------------------- #
# 3. input sizes
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("size, shape", [("20x12", [1, 3, 20, 12]), ("3x16x16", [1, 3, 16, 16]),
                                         ("16", [1, 3, 16, 16])])
def test_input_size_forms(cli, size, shape):
    proc = cli("audit", "mymodels:TinyNet", "--input-size", size, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input_shape"] == shape


def test_memory_of_a_conv1d_model(cli):
    proc = cli("memory", "mymodels:Tiny1d", "--input-size", "4x32", "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["input_size"] == [4, 32]
    assert data["converted"]["activation_bytes"] < data["original"]["activation_bytes"]


# --------------------------------------------------------------------------------------------- #
# 4. output that reads like a tool
# --------------------------------------------------------------------------------------------- #
def test_report_warns_once_in_one_line_without_stored_parts(folder):
    proc = run(folder, "report", "mymodels:bottlenecks", "--input-size", "16", "--batch-size", "2",
               "--recompute-budget", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("revconvert: warning: recompute_budget=0.0 cannot be met")
    assert "stored parts" not in lines[0] and "UserWarning" not in proc.stderr


def test_unmet_budget_names_stored_parts_only_when_they_are_recomputed():
    import importlib.util

    spec = importlib.util.spec_from_loader("cli_test_models", loader=None)
    models = importlib.util.module_from_spec(spec)
    exec(MODELS, models.__dict__)
    import revconvert

    for checkpoint_stored in (False, True):
        config = revconvert.ConvertConfig(recompute_budget=0.0, checkpoint_stored=checkpoint_stored)
        with pytest.warns(UserWarning, match="cannot be met") as record:
            revconvert.convert(models.bottlenecks(), (2, 3, 16, 16), config=config)
        assert ("stored parts" in str(record[0].message)) == checkpoint_stored


def test_plot_without_matplotlib_prints_the_table_then_a_hint(folder, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    proc = cli("memory", "mymodels:TinyNet", "--input-size", "16", "--batch-size", "2", "--plot", "m.png")
    assert proc.returncode == 1
    assert "peak" in proc.stdout and "activations" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'revconvert[plot]'" in lines[0], proc.stderr
    assert not (folder / "m.png").exists()


def test_one_block_segment_names_its_block(cli):
    proc = cli("convert", "mymodels:one_block", "-o", "c.pt", "--input-size", "16")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("blocks.rev_0"))
    assert row.split()[-1] == "blocks.0" and ".." not in row


def test_model_without_residual_blocks_is_not_copied_unless_asked(folder, cli):
    proc = cli("convert", "mymodels:plain", "-o", "c.pt", "--input-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "no residual blocks" in proc.stderr and "not written" in proc.stdout
    assert not (folder / "c.pt").exists()
    proc = cli("convert", "mymodels:plain", "-o", "c.pt", "--input-size", "16", "--always-save")
    assert proc.returncode == 0 and (folder / "c.pt").exists(), proc.stderr


# --------------------------------------------------------------------------------------------- #
# the commands themselves (in-process: the library's answers, not the process around them)
# --------------------------------------------------------------------------------------------- #
def test_audit_json(capsys):
    assert main(["audit", "resnet18", "--input-size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_blocks"] == 8 and data["num_reversible"] == 5
    assert data["input_shape"] == [1, 3, 64, 64]


def test_audit_table(capsys):
    assert main(["audit", "resnet50", "--input-size", "3x64x64"]) == 0
    out = capsys.readouterr().out
    assert "16 residual blocks, 12 reversible" in out and "projection-shortcut" in out


def test_unknown_model_lists_closest(capsys):
    assert main(["audit", "resnet5O"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown model 'resnet5O'" in err and "resnet50" in err


def test_timm_models_by_their_registered_names(capsys):
    pytest.importorskip("timm")
    assert main(["audit", "timm:convnextv2_atto", "--input-size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_blocks"] == 12 and data["num_reversible"] == 12
    assert main(["audit", "timm:convnextv2_atoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "timm has no model 'convnextv2_atoo'" in err and "convnextv2_atto" in err


def test_import_path_failure_says_what_failed(capsys):
    assert main(["audit", "no_such_pkg.models:net"]) == 2
    assert "No module named 'no_such_pkg'" in capsys.readouterr().err
    assert main(["audit", "toy_models:NoSuchNet"]) == 2
    assert "has no attribute 'NoSuchNet'" in capsys.readouterr().err


def test_import_path_factory(capsys):
    assert main(["audit", "toy_models:CifarResNet", "--input-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_blocks"] == 9


def test_convert_writes_model(tmp_path, capsys):
    out = tmp_path / "c.pt"
    assert main(["convert", "resnet18", "-o", str(out), "--only", "layer1", "--input-size", "64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["converted_blocks"] == ["layer1.0", "layer1.1"]
    assert summary["params_before"] > 0 and summary["params_after"] > 0
    model = torch.load(out, weights_only=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_convert_only_unknown_block(tmp_path, capsys):
    assert main(["convert", "resnet18", "-o", str(tmp_path / "c.pt"), "--only", "layer9"]) == 2
    assert "layer9" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


def test_width_multiple_compile_and_cuda_graphs_flags(folder):
    proc = run(folder, "convert", "resnet18", "-o", "out.pt", "--width-multiple", "0")
    assert proc.returncode == 2 and "--width-multiple" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(folder, "convert", "resnet50", "-o", "out.pt", "--input-size", "32", "--width-multiple", "16",
               "--compile")
    assert proc.returncode == 0, proc.stderr
    import torch

    model = torch.load(folder / "out.pt", weights_only=False)
    segments = [m for m in model.modules() if type(m).__name__ == "ReversibleSegment"]
    assert segments and all(m.compile_options == {} and not m.cuda_graphs for m in segments)
    widths = {m.out_channels for s in segments for m in s.modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(w % 16 == 0 for w in widths), widths
    proc = run(folder, "convert", "resnet18", "-o", "graphs.pt", "--input-size", "32", "--cuda-graphs")
    assert proc.returncode == 0, proc.stderr
    segments = [m for m in torch.load(folder / "graphs.pt", weights_only=False).modules()
                if type(m).__name__ == "ReversibleSegment"]
    assert segments and all(m.cuda_graphs and m.compile_options is None for m in segments)
    proc = run(folder, "convert", "resnet18", "-o", "both.pt", "--compile", "--cuda-graphs")
    assert proc.returncode == 2 and "cuda_graphs=True with compile" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_mistakes_are_checked_before_any_work(folder):
    proc = run(folder, "plan", "resnet18", "--memory", "24 potatoes", "--batch-size", "2")
    assert proc.returncode == 2 and "--memory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(folder, "plan", "resnet18", "--memory", "1GiB")
    assert proc.returncode == 2 and "--max-flops-ratio" in proc.stderr
    (folder / "bad.json").write_text("{not json")
    proc = run(folder, "convert", "resnet18", "-o", "out.pt", "--plan", "bad.json")
    assert proc.returncode == 2 and "--plan bad.json" in proc.stderr and not (folder / "out.pt").exists()
    proc = run(folder, "convert", "resnet18", "-o", "out.pt", "--plan", "missing.json")
    assert proc.returncode == 2 and "--plan missing.json" in proc.stderr


def test_convert_pair_blocks(tmp_path, capsys):
    out = tmp_path / "c.pt"
    assert main(["convert", "resnet18", "-o", str(out), "--input-size", "64", "--pair-blocks", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # resnet18's layer1 run has two blocks: one coupling, F from layer1.0 and G from layer1.1
    assert summary["couplings"]["layer1.rev_0_1"] == 1
    model = torch.load(out, weights_only=False)
    assert model.get_submodule("layer1.rev_0_1").coupling_blocks == (("layer1.0", "layer1.1"),)
    (tmp_path / "plan.json").write_text("{}")
    assert main(["convert", "resnet18", "-o", str(out), "--plan", str(tmp_path / "plan.json"), "--pair-blocks"]) == 2
    assert "--pair-blocks" in capsys.readouterr().err


def test_report_hints_at_pair_blocks_only_where_pairing_changes_the_conversion(cli):
    # TinyNet's run of two blocks: two couplings by default, one paired
    out = cli("report", "mymodels:TinyNet", "--input-size", "16", "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    hints = [line for line in out.stdout.splitlines() if line.startswith("hint: --pair-blocks")]
    assert len(hints) == 1 and "1 coupling instead of 2" in hints[0], out.stdout
    # already paired, or a run of one block (which stays a full coupling either way): no hint
    for argv in (("mymodels:TinyNet", "--pair-blocks"), ("mymodels:one_block",)):
        out = cli("report", *argv, "--input-size", "16", "--batch-size", "2")
        assert out.returncode == 0, out.stderr
        assert "--pair-blocks" not in out.stdout.replace("(pair_blocks)", ""), (argv, out.stdout)
    # JSON stays data only
    out = cli("report", "mymodels:TinyNet", "--input-size", "16", "--batch-size", "2", "--json")
    assert "hint" not in json.loads(out.stdout)
