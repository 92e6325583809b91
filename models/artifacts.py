"""Torch-side weight loading shared by every detector (torch-free at import time).

Safe loading policy (weights, checkpoints, adapters):

* tensors are read only with ``safetensors`` or ``torch.load(..., weights_only=True)`` (the
  restricted unpickler: tensors and plain containers, no arbitrary callables), never ``pickle``;
* the sha256 of the file is verified *before* it is deserialised whenever a digest is known:
  an explicit ``sha256=`` argument, else a sidecar ``<file>.sha256`` (``sha256sum`` format; every
  file linewatch writes gets one), else the torch-hub file-name convention
  ``name-<first 8+ hex of sha256>.pth``; a mismatch raises :class:`ArtifactIntegrityError`;
* a file with no known digest (e.g. a user's own pretrained weights) is still read with
  ``weights_only=True`` and logged as ``weights_unverified``; ``require_sha256=True`` (callers pass
  ``Settings.require_sha256``, env ``LINEWATCH_REQUIRE_SHA256``) refuses such files instead;
* served artifacts (TorchScript ``model.pt``, MoLE-Flow safetensors) are always verified against
  their manifest (``contracts.artifact.verify_artifact``) before loading (``models.*.serving``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from contracts.artifact import ArtifactError, ArtifactIntegrityError, check_sha256, sha256_file
from contracts.logs import get_logger

_HEX = re.compile(r"[0-9a-f]{64}")  # fullmatch only
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin|ckpt|safetensors)$")

log = get_logger("models.artifacts")


def sidecar_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def write_sha256_sidecar(path: str | Path) -> str:
    """Write ``<path>.sha256`` (``sha256sum`` format) and return the digest."""
    p = Path(path)
    digest = sha256_file(p)
    sidecar_path(p).write_text(f"{digest}  {p.name}\n")
    return digest


def expected_sha256(path: str | Path, sha256: str | None = None) -> str | None:
    """The digest ``path`` must have: explicit > sidecar > torch-hub name prefix; None if unknown."""
    if sha256:
        d = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", d):
            raise ArtifactIntegrityError(f"expected sha256 {sha256!r} is not a hex digest")
        return d
    side = sidecar_path(path)
    if side.is_file():
        text = side.read_text().strip()
        d = text.split()[0].lower() if text else ""
        if not _HEX.fullmatch(d):
            raise ArtifactIntegrityError(f"{side} does not hold a sha256 digest")
        return d
    m = _HUB_NAME.search(Path(path).name)
    return m.group(1) if m else None


def check_before_load(path: str | Path, sha256: str | None = None, *, require: bool = False) -> str | None:
    """Verify ``path`` per the policy above; returns the digest checked (None: none was known).
    ``require``: refuse a file with no known digest (``Settings.require_sha256``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    exp = expected_sha256(p, sha256)
    if exp is not None:
        check_sha256(p, exp)
        return exp
    if require:
        raise ArtifactIntegrityError(f"no sha256 known for {p} and a digest is required (require_sha256): "
                                     f"write {sidecar_path(p).name} (sha256sum format) or pass the digest")
    log.warning("weights_unverified", path=str(p), hint=f"write {sidecar_path(p).name} to pin this file")
    return None


def safe_torch_load(path: str | Path, *, sha256: str | None = None, require_sha256: bool = False,
                    map_location: str = "cpu") -> Any:
    """sha256-verify (see module doc), then ``torch.load(weights_only=True)``. Never plain pickle."""
    check_before_load(path, sha256, require=require_sha256)
    import torch  # torch-free at import time

    return torch.load(str(path), map_location=map_location, weights_only=True)


def safe_load_safetensors(path: str | Path, *, sha256: str | None = None, require_sha256: bool = False):
    """sha256-verify, then ``safetensors.torch.load_file`` (no pickle at all)."""
    check_before_load(path, sha256, require=require_sha256)
    from safetensors.torch import load_file

    return load_file(str(path))


def next_version(model_dir: Path) -> int:
    """The highest existing numeric version dir + 1."""
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(existing, default=0) + 1


def claim_version_dir(model_dir: Path, version: int | None) -> Path:
    """Create and return the version dir an export writes into: ``version``, or the next free one (highest
    numeric + 1) claimed with an atomic ``mkdir``, so two exports of one model at once (two onboardings of one
    product) never write the same version. An explicit ``version`` whose dir already holds files is refused
    (a leftover file would fail verify_artifact at load)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is not None:
        vdir = model_dir / str(version)
        if vdir.exists() and any(vdir.iterdir()):
            raise ArtifactError(f"version dir exists and is not empty: {vdir}")
        vdir.mkdir(exist_ok=True)
        return vdir
    while True:
        vdir = model_dir / str(next_version(model_dir))
        try:
            vdir.mkdir()
            return vdir
        except FileExistsError:  # another export claimed it between the listing and the mkdir: the next one
            continue


def version_dir(path: Path) -> Path:
    """``path`` if it is an exported version dir (holds metadata.json), else a model dir's newest version."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    versions = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()),
                      reverse=True) if path.is_dir() else []
    if not versions:
        raise ValueError(f"{path} is neither a version dir (metadata.json) nor a model dir with versions")
    return path / str(versions[0])
