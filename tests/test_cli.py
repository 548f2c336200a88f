from __future__ import annotations

import json

import pytest
import torch

from revconvert.cli import main


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


def test_import_path_failure_says_what_failed(capsys):
    assert main(["audit", "no_such_pkg.models:net"]) == 2
    assert "No module named 'no_such_pkg'" in capsys.readouterr().err
    assert main(["audit", "toy_models:NoSuchNet"]) == 2
    assert "has no attribute 'NoSuchNet'" in capsys.readouterr().err


def test_import_path_factory(capsys):
    assert main(["audit", "toy_models:CifarResNet", "--input-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_blocks"] == 9


def test_bad_input_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["audit", "resnet18", "--input-size", "big"])
    assert exc.value.code == 2


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
