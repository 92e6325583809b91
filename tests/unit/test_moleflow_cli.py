"""``linewatch-models moleflow {train-task,evaluate,export}`` end to end on a few real images
(random backbone, tiny flow), plus one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    """Run the real CLI in a subprocess (structlog binds stderr at configure time, so in-process runs
    would write to another test's closed capture stream)."""
    r = subprocess.run([sys.executable, "-m", "models.cli", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    main.out, main.err = r.stdout, r.stderr
    if r.returncode not in (0, 2):
        raise AssertionError(r.stderr[-3000:])
    return r.returncode


def _folder(tmp_path, src, n, name):
    d = tmp_path / name
    d.mkdir()
    for p in sorted(src.iterdir())[:n]:
        (d / p.name).symlink_to(p)  # read in place, never copied
    return d


def test_cli_errors_are_one_line(tmp_path):
    assert main(["moleflow", "train-task", "--data-dir", str(tmp_path / "nope"), "--task", "x",
                 "--out", str(tmp_path / "s")]) == 2
    err = main.err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and err[0].startswith("linewatch-models: error:")
    assert main(["moleflow", "export", "--checkpoint", str(tmp_path), "--repo", str(tmp_path / "r")]) == 2
    assert len(main.err.strip().splitlines()) == 1 and "Traceback" not in main.err
    assert main(["moleflow", "train-task", "--data-dir", str(tmp_path), "--task", "bad name", "--out",
                 str(tmp_path / "s")]) == 2


@pytest.mark.slow
def test_cli_train_two_tasks_evaluate_export(shared_data, tmp_path):
    bottle = shared_data / "mvtec" / "bottle"
    a = _folder(tmp_path, bottle / "train" / "good", 6, "a")
    b = _folder(tmp_path, bottle / "test" / "good", 6, "b")
    store = tmp_path / "store"
    common = ["--random-backbone", "--dim", "16", "--rank", "4", "--epochs", "1", "--threads", "1"]
    assert main(["moleflow", "train-task", "--data-dir", str(a), "--task", "bottle", "--out", str(store), *common]) == 0
    base_sha = json.loads((store / "base.json").read_text())["sha256"]
    assert main(["moleflow", "train-task", "--data-dir", str(b), "--task", "other", "--out", str(store), *common]) == 0
    assert json.loads((store / "base.json").read_text())["sha256"] == base_sha  # base stored once, unchanged
    before = (store / "adapters" / "other" / "adapter.json").read_text()
    assert main(["moleflow", "train-task", "--data-dir", str(b), "--task", "other", "--out", str(store), *common]) == 0
    assert "already in" in main.out and (store / "adapters" / "other" / "adapter.json").read_text() == before
    out = tmp_path / "eval.json"
    assert main(["moleflow", "evaluate", "--checkpoint", str(store), "--eval", f"bottle={bottle}",
                 "--out", str(out), "--stride", "12"]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"] == ["bottle", "other"] and len(res["accuracy_matrix_image_auroc"]) == 2
    assert "pixel_auroc" in res["per_task"]["bottle"]["routed"]["overall"]
    repo = tmp_path / "repo"
    assert main(["moleflow", "export", "--checkpoint", str(store), "--repo", str(repo), "--name", "moleflow"]) == 0
    vdir = main.out.strip().splitlines()[-1]
    spec = json.loads((repo / "moleflow" / "1" / "metadata.json").read_text())
    assert vdir.endswith("moleflow/1") and list(spec["tasks"]) == ["bottle", "other"]
    assert spec["input"]["height"] == 224 and spec["outputs"]["route_distance"] == "route_distance"
    assert (repo / "moleflow" / "1" / "model.py").read_text().count("MoLEFlowServing") == 2


def test_cli_help_lists_verbs():
    from models.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["moleflow"].format_help()
    for verb in ("train-task", "evaluate", "export"):
        assert verb in help_text
