"""Triton model-repository operations of the rollout lifecycle (no torch).

An artifact (a verified version dir of the model store, :mod:`contracts.artifact`) is hard-linked (or
copied) into ``<repository>/<name>/<version>``; ``<name>/config.pbtxt`` is rewritten with an explicit
version policy, so a rollback is a config rewrite + load (stream/lifecycle/controller.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from contracts.artifact import CONFIG, Artifact, StoreError, rewrite_config


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (artifacts are immutable) or copy ``src`` into ``dst``."""
    for root, _dirs, files in os.walk(src):
        r = Path(root)
        if r.name == "__pycache__":
            continue
        out = dst / r.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f == CONFIG:
                continue
            s, d = r / f, out / f
            if d.exists():
                d.unlink()
            try:
                d.hardlink_to(s)
            except OSError:
                shutil.copy2(s, d)


def materialize(artifact: Artifact, repository: str | os.PathLike, name: str, versions: list[int]) -> Path:
    """Put ``artifact`` into ``<repository>/<name>/<artifact.version>`` and write ``<name>/config.pbtxt``
    serving exactly ``versions`` (explicit policy, so a rollback is a config rewrite + load)."""
    if artifact.config_path is None:
        raise StoreError(f"no {CONFIG} for artifact {artifact.path}")
    mdir = Path(repository) / name
    vdir = mdir / str(artifact.version)
    if vdir.resolve() != artifact.path.resolve():
        if vdir.exists():
            shutil.rmtree(vdir)
        _link_tree(artifact.path, vdir)
    write_config(mdir, artifact.config_path.read_text(), name, versions, artifact.metadata)
    return vdir


def write_config(model_dir: Path, template: str, name: str, versions: list[int], spec: dict | None = None) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{CONFIG}.tmp"
    tmp.write_text(rewrite_config(template, name, versions, spec))
    tmp.replace(model_dir / CONFIG)  # atomic: Triton never reads half a config


def repository_versions(repository: str | os.PathLike, name: str) -> list[int]:
    d = Path(repository) / name
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def remove_model_dir(repository: str | os.PathLike, name: str) -> None:
    d = Path(repository) / name
    if d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
