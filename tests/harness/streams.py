"""Shared pieces of the streaming integration tests: per-test topic names and a tiny real detector."""

from __future__ import annotations

import subprocess
from pathlib import Path


def topics(prefix: str) -> dict[str, str]:
    """Fresh frames/results/defects/dlq topic names, so tests sharing one broker never see each other."""
    return {"frames": f"{prefix}-frames", "results": f"{prefix}-results", "defects": f"{prefix}-defects",
            "dlq": f"{prefix}-dlq"}


def tiny_efficientad(work: Path, data_dir: Path) -> Path:
    """Train + export a tiny-schedule EfficientAD through the models CLI (a subprocess: stream has no
    torch); returns the exported Triton model directory. A real export, not an accurate model."""
    from devstack.demo import models_cli

    cli = models_cli()
    repo, art = work / "repo", work / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    good = data_dir / "mvtec" / "bottle" / "train" / "good"
    # 3 steps on 8 images with the CLI's default teacher (the frozen Lite0 features)
    subprocess.run([*cli, "efficientad", "train", "--train-dir", str(good), "--out", str(art / "s.pt"),
                    "--steps", "3", "--max-train-images", "8"], check=True, timeout=600)
    subprocess.run([*cli, "efficientad", "export", "--checkpoint", str(art / "s.pt"), "--repository", str(repo),
                    "--product", "bottle"], check=True, timeout=600)
    return repo / "efficientad_bottle"
