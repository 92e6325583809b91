"""The training device (Settings.train_device / --device): resolution, one-line CLI failures for CUDA
without CUDA, and tiny CPU trainings with the device given explicitly (MoLE-Flow: same result as the default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.precision import autocast_args, train_device

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")


def _bottle(shared_data: Path, tmp_path: Path, n: int = 4) -> Path:
    d = tmp_path / "good"
    d.mkdir()
    for p in sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:n]:
        (d / p.name).symlink_to(p)  # read in place, never copied
    return d


def _cli(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """The real ``linewatch-models`` in a subprocess (its own logging config and stderr)."""
    return subprocess.run([sys.executable, "-m", "models.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_train_device_choices():
    assert train_device("cpu") == torch.device("cpu")
    assert train_device("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        train_device("gpu")


@no_cuda
def test_cuda_without_cuda_is_one_clear_line():
    from models.serving_device import cuda_problem

    with pytest.raises(RuntimeError) as exc:
        train_device("cuda")
    msg = str(exc.value)
    assert "\n" not in msg and "train_device=cuda" in msg and cuda_problem() in msg and "--device cpu" in msg


def test_autocast_args():
    bf16 = torch.bfloat16
    assert autocast_args("cpu", False) == {"device_type": "cpu", "dtype": bf16, "enabled": False}
    assert autocast_args(torch.device("cpu"), True) == {"device_type": "cpu", "dtype": bf16, "enabled": True}
    assert autocast_args(torch.device("cuda", 0), False) == {"device_type": "cuda", "dtype": bf16, "enabled": True}
    assert autocast_args("meta", True)["enabled"] is False


@no_cuda
def test_cli_device_cuda_fails_in_one_line(shared_data, tmp_path):
    good = _bottle(shared_data, tmp_path)
    runs = {
        "efficientad train --device cuda": _cli(["efficientad", "train", "--train-dir", str(good), "--out",
                                                 str(tmp_path / "m.pt"), "--steps", "2", "--device", "cuda"]),
        "moleflow train-task, LINEWATCH_TRAIN_DEVICE=cuda": _cli(
            ["moleflow", "train-task", "--data-dir", str(good), "--task", "bottle", "--out", str(tmp_path / "s"),
             "--random-backbone", "--epochs", "1"], LINEWATCH_TRAIN_DEVICE="cuda"),
    }
    for what, r in runs.items():
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1, (what, r.stderr[-2000:])
        assert len(err) == 1 and "Traceback" not in r.stderr, (what, r.stderr[-2000:])
        assert err[0].startswith("linewatch-models: error: linewatch: train_device=cuda"), (what, err)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "s").exists()


def test_cli_bad_device_value_is_one_line(tmp_path, capsys):
    from models.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["efficientad", "distill-teacher", "--image-dir", str(tmp_path), "--out", "t.safetensors",
              "--device", "gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "invalid choice" in err[0]


def test_tiny_efficientad_on_explicit_cpu(shared_data, tmp_path, capsys):
    """device="cpu" given explicitly: trains, logs the device once, returns a CPU model (the default
    path's determinism is test_efficientad.py's; one step costs seconds on a 2-core runner)."""
    import math

    from models.data import list_images
    from models.efficientad.train import TrainConfig, train_efficientad

    paths = list_images(_bottle(shared_data, tmp_path, 2))  # one fit, one held-out image
    model, meta = train_efficientad(paths, TrainConfig(steps=1, val_fraction=0.5, seed=3), teacher_weights=None,
                                    device="cpu")
    assert all(t.device.type == "cpu" for t in model.state_dict().values()) and not model.training
    assert meta["device"] == "cpu" and meta["steps_done"] == 1 and math.isfinite(meta["threshold"])
    logged = [json.loads(x) for x in capsys.readouterr().err.splitlines() if '"train_device"' in x]
    assert len(logged) == 1 and logged[0]["device"] == "cpu" and logged[0]["amp"] == "fp32"
    assert logged[0]["torch"] == torch.__version__ and "torch_cuda" in logged[0]


def test_tiny_moleflow_on_explicit_cpu_equals_default(shared_data, tmp_path):
    from models.data import list_images
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.train import TrainConfig, load_images, train_task

    tiny = dict(grid=14, dim=16, subnet_hidden=16, lora_rank=4, lora_alpha=4.0, coupling_layers=2, dia_blocks=2,
                image_size=64)
    x = load_images(list_images(_bottle(shared_data, tmp_path)), 64)
    cfg = TrainConfig(epochs=2, batch_size=2, progress=False)
    models, metas = [], []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        m = MoLEFlow(MoLEFlowConfig(**tiny))
        metas.append(train_task(m, "bottle", x, cfg, device=device))
        models.append(m)
    a, b = (m.state_dict() for m in models)
    assert list(a) == list(b) and all(b[k].device.type == "cpu" and torch.equal(a[k], b[k]) for k in a)
    assert metas[1]["device"] == "cpu" and metas[1]["threshold"] == metas[0]["threshold"]
    assert models[1].router["bottle"].mean.device.type == "cpu"
