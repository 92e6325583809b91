"""Artifact helpers shared by every detector's export/serving (torch-free)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_version(model_dir: Path, version: int | None) -> int:
    """The requested Triton version, or the highest existing numeric version dir + 1."""
    if version is not None:
        return version
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(existing, default=0) + 1
