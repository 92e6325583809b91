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


def test_require_sha256_setting_reaches_the_export_verb(tmp_path, capsys, monkeypatch):
    """LINEWATCH_REQUIRE_SHA256=true: a checkpoint without its sha256 sidecar is refused (one line, exit 2)."""
    ck = save_checkpoint(EfficientAD().eval(), tmp_path / "m.pt", {"threshold": 0.3})
    (tmp_path / "m.pt.sha256").unlink()
    argv = ["efficientad", "export", "--checkpoint", str(ck), "--repository", str(tmp_path / "repo"),
            "--product", "bottle"]
    monkeypatch.setenv("LINEWATCH_REQUIRE_SHA256", "true")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "require_sha256" in err[0]
    monkeypatch.delenv("LINEWATCH_REQUIRE_SHA256")
    assert main(argv) == 0  # default: unverified weights load with a warning


@pytest.mark.slow
def test_lite0_features_teacher_train_checkpoint_export(shared_data, tmp_path):
    """--teacher-kind lite0-features: the frozen Lite0 target is the teacher (no PDN file); the
    checkpoint rebuilds it and the TorchScript export equals eager."""
    from models.backbones import LITE0_WEIGHTS
    from models.efficientad.export import export_triton
    from models.efficientad.feature_teacher import lite0_feature_teacher
    from models.efficientad.model import load_checkpoint

    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:4]:
        (good / p.name).symlink_to(p)
    ckpt = tmp_path / "m.pt"
    assert main(["efficientad", "train", "--train-dir", str(good), "--out", str(ckpt), "--teacher-kind",
                 "lite0-features", "--steps", "2"]) == 0
    model, meta = load_checkpoint(ckpt)
    assert model.teacher_kind == "lite0-features" and meta["teacher_provenance"]["backbone"] == "tf_efficientnet_lite0"
    assert model.input_mean == model.input_std == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.teacher(x), lite0_feature_teacher(shared_data / LITE0_WEIGHTS)(x))
        a1, s1 = model(x)
    vdir = export_triton(model, tmp_path / "repo", "bottle", threshold=meta["threshold"])
    px = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # model.pt takes UINT8 pixels (normalised in-graph), returns the native map
        _, s1 = model((px.float() / 255 - 0.5) / 0.5)
        a2, s2 = torch.jit.load(str(vdir / "model.pt"))(px)
    assert a2.shape == (2, 1, 64, 64) and a1.shape == (2, 1, 256, 256)
    torch.testing.assert_close(s2[:, 0], s1, atol=1e-4, rtol=1e-4)
    assert json.loads((vdir / "metadata.json").read_text())["input"]["mean"] == [0.5, 0.5, 0.5]


def test_lite0_features_rejects_a_pdn_teacher_file(tmp_path, capsys):
    assert main(["efficientad", "train", "--train-dir", str(tmp_path), "--out", "x.pt", "--teacher-kind",
                 "lite0-features", "--random-teacher"]) == 2
    assert "lite0-features" in capsys.readouterr().err
