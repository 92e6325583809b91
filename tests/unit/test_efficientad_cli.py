"""linewatch-models CLI: one-line errors with exit code 2, export from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from models.cli import main
from models.efficientad.model import EfficientAD, save_checkpoint


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["efficientad"],
        ["efficientad", "bogus"],
        ["efficientad", "train", "--train-dir", "/nonexistent/good", "--out", "x.pt"],
        ["efficientad", "train", "--train-dir", "/tmp", "--out", "x.pt", "--steps", "-1"],
        ["efficientad", "train", "--train-dir", "/tmp", "--out", "x.pt", "--teacher", "/nonexistent.pth"],
        ["efficientad", "evaluate", "--checkpoint", "/nonexistent.pt", "--mvtec-dir", "/tmp", "--out", "r.json"],
        ["efficientad", "export", "--checkpoint", "/nonexistent.pt", "--repository", "r", "--product", "p"],
        ["efficientad", "distill-teacher", "--image-dir", "/nonexistent", "--out", "t.pth"],
    ],
)
def test_one_line_errors_exit_2(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "error" in err


def test_empty_train_dir_is_a_usage_error(tmp_path, capsys):
    assert main(["efficientad", "train", "--train-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    assert "need at least 2 images" in capsys.readouterr().err


def test_export_verb(tmp_path, capsys):
    ck = save_checkpoint(EfficientAD().eval(), tmp_path / "m.pt", {"threshold": 0.3, "map_threshold": 0.4})
    rc = main(["efficientad", "export", "--checkpoint", str(ck), "--repository", str(tmp_path / "repo"),
               "--product", "bottle", "--version", "3"])
    assert rc == 0
    meta = json.loads((tmp_path / "repo" / "efficientad_bottle" / "3" / "metadata.json").read_text())
    assert meta["threshold"] == 0.3 and meta["version"] == 3
    assert torch.jit.load(str(tmp_path / "repo" / "efficientad_bottle" / "3" / "model.pt")) is not None
