"""Shared pieces of the streaming integration tests: per-test topic names and tiny real detectors."""

from __future__ import annotations

import subprocess
from pathlib import Path


def topics(prefix: str) -> dict[str, str]:
    """Fresh frames/results/defects/dlq topic names, so tests sharing one broker never see each other."""
    return {"frames": f"{prefix}-frames", "results": f"{prefix}-results", "defects": f"{prefix}-defects",
            "dlq": f"{prefix}-dlq"}


def tiny_efficientad(work: Path, data_dir: Path) -> Path:
    """Train + export a tiny-schedule EfficientAD through the models CLI (a subprocess: stream has no
    torch); returns the exported Triton model directory. A real export, not an accurate model -- but one that
    flags the most obvious bottle defect (contamination/017), which tests/integration/test_stream_pipeline.py
    and test_console_browser.py rely on."""
    from devstack.demo import models_cli

    cli = models_cli()
    repo, art = work / "repo", work / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    good = data_dir / "mvtec" / "bottle" / "train" / "good"
    # 3 steps on 8 images with the frozen Lite0 features teacher, named (not the CLI's default): measured here,
    # contamination/017 scores ~0.105 against a threshold of ~0.072 after 3 steps; the lite0-early teacher's
    # 3-step model scores every image alike (its map's maximum is one constant), so it flags nothing
    subprocess.run([*cli, "efficientad", "train", "--train-dir", str(good), "--out", str(art / "s.pt"),
                    "--teacher-kind", "lite0-features", "--steps", "3", "--max-train-images", "8"],
                   check=True, timeout=600)
    subprocess.run([*cli, "efficientad", "export", "--checkpoint", str(art / "s.pt"), "--repository", str(repo),
                    "--product", "bottle"], check=True, timeout=600)
    return repo / "efficientad_bottle"


def tiny_moleflow(data_dir: Path, store: Path, repository: Path, name: str) -> str:
    """Train one "bottle" task of a tiny MoLE-Flow (8 images, 1 epoch) and export it into ``repository`` as
    ``name``; returns ``name``. A real export, not an accurate model."""
    import torch

    from models.data import list_images
    from models.moleflow.export import export_triton
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.store import save_model
    from models.moleflow.train import TrainConfig, train_task

    torch.set_num_threads(1)
    cfg = MoLEFlowConfig(grid=14, dim=32, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, coupling_layers=2,
                         dia_blocks=2)
    model = MoLEFlow(cfg, backbone_weights=data_dir / "weights" / "efficientnet-lite0-57934424.pth")
    train_task(model, "bottle", list_images(data_dir / "mvtec" / "bottle" / "train" / "good")[:8],
               TrainConfig(epochs=1, batch_size=4, progress=False))
    save_model(model, store)
    export_triton(store, repository, name)
    return name
