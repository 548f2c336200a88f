"""Every example runs as a user would run it (``python examples/NAME.py``), in its tiny mode."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# example -> text its output must contain (a sign it did its job, not just that it exited)
EXPECTED = {
    "convert_resnet.py": ["converted 5 of 8 residual blocks", "layer1.rev_0_1", "output shape (2, 1000)"],
    "audit_model.py": ["reversible", "projection-shortcut", "stage1.0"],
    "estimate_memory.py": ["original", "converted", "largest batch", "batch    1: peak"],
    "train_converted.py": ["converted 3 of 4 residual blocks", "] 1/1 loss", "epoch 1:", "  original  loss",
                           "  converted loss", "test acc"],
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    env = {**os.environ, "REVCONVERT_EXAMPLE_TINY": "1",
           # one thread, as conftest.py does: OpenMP spinning is slow on a shared machine
           "OMP_NUM_THREADS": os.environ.get("REVCONVERT_TEST_THREADS", "1"),
           # the checkout's package, whether or not it is installed
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    for text in EXPECTED[name]:
        assert text in proc.stdout, f"{name}: {text!r} missing from its output:\n{proc.stdout}"
