"""Triton model-repository operations of the rollout lifecycle (no torch).

The model store (where exports and the training Job write) is not Triton's repository: only the
rollout controller puts versions into the repository, by **copying** a verified artifact's pinned files
(never linking: a later change in the store cannot change what Triton serves) into a temporary
directory, checking the copy against the manifest (every file's sha256, metadata.json's own digest,
the config template's ``config_sha256``), and only then renaming it to ``<repository>/<name>/<version>``
and writing ``<name>/config.pbtxt`` with an explicit version policy, so a rollback is a config rewrite +
load (stream/lifecycle/controller.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from contracts.artifact import (
    CONFIG,
    METADATA,
    MODEL_FILE,
    Artifact,
    ArtifactIntegrityError,
    StoreError,
    config_pinned,
    read_manifest,
    rewrite_config,
    sha256_file,
)
from contracts.config import ServingSettings
from contracts.names import check_name, check_version
from contracts.pbtxt import ONNX_FILE, ConfigError, apply_deployment, parse_config


def model_dir(repository: str | os.PathLike, name: str) -> Path:
    """``<repository>/<name>`` for a strict ``name`` (ValueError otherwise: it could escape the repository)."""
    return Path(repository) / check_name(name)


def _pinned_files(artifact: Artifact) -> dict[str, str | None]:
    """relpath -> sha256 of every file the rollout copies (None: checked otherwise, config and metadata)."""
    arts = artifact.metadata.get("artifacts") or {}
    files: dict[str, str | None] = {str(k): str(v) for k, v in arts.items()} if isinstance(arts, dict) else {}
    files[METADATA] = None
    if artifact.config_path is not None and artifact.config_path.parent == artifact.path:
        files[CONFIG] = None
    if MODEL_FILE not in files:
        raise ArtifactIntegrityError(f"{artifact.path}: {MODEL_FILE} is not pinned in {METADATA}")
    return files


def _copy_verified(artifact: Artifact, dst: Path) -> None:
    """Copy the pinned files of ``artifact`` into ``dst`` (a fresh dir) and check the copy."""
    src = artifact.path
    files = _pinned_files(artifact)
    for rel in files:
        s, d = src / rel, dst / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ArtifactIntegrityError(f"bad artifact path {rel!r} in {src / METADATA}")
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d, follow_symlinks=True)  # a copy: own inode, own bytes
    bad = [rel for rel, digest in files.items() if digest is not None and sha256_file(dst / rel) != digest]
    if hashlib.sha256((dst / METADATA).read_bytes()).hexdigest() != artifact.sha256:
        bad.append(METADATA)
    if CONFIG in files and not config_pinned((dst / CONFIG).read_text(), artifact.metadata.get("config_sha256")):
        bad.append(CONFIG)
    if bad:
        raise ArtifactIntegrityError(f"copy of {src} does not match its verified manifest ({', '.join(bad)}): "
                                     "the store changed after verification; nothing was written")


def deployed_config(text: str, serving: ServingSettings | None, vdir: Path) -> str:
    """``text`` with the deployment block for ``serving`` (None: leave as is): the instance group (GPU count
    per model, or CPU), the warmup batch, and for EfficientAD with ``efficientad_backend=onnxruntime`` the
    TensorRT-accelerated onnxruntime backend on the version's pinned model.onnx."""
    if serving is None:
        return text
    onnx = serving.efficientad_backend == "onnxruntime" and (vdir / METADATA).is_file() \
        and read_manifest(vdir)[0].get("detector") == "efficientad"
    if onnx and not (vdir / ONNX_FILE).is_file():
        raise StoreError(f"serving.efficientad_backend=onnxruntime but {vdir} has no {ONNX_FILE} (export it again)")
    return apply_deployment(text, device=serving.device, instances=serving.instances, gpus=serving.gpus,
                            fp16=serving.fp16, onnxruntime=onnx, trt_cache_dir=serving.trt_cache_dir)


def materialize(artifact: Artifact, repository: str | os.PathLike, name: str, versions: list[int],
                serving: ServingSettings | None = None) -> Path:
    """Copy ``artifact`` into ``<repository>/<name>/<artifact.version>`` (checked copy) and write
    ``<name>/config.pbtxt`` serving exactly ``versions`` from the artifact's pinned config template, with
    the deployment block of ``serving`` (:func:`deployed_config`)."""
    mdir = model_dir(repository, name)
    version = check_version(artifact.version)
    if artifact.config_path is None:
        raise StoreError(f"no {CONFIG} for artifact {artifact.path}")
    repo = Path(repository).resolve()
    if repo == artifact.path.resolve() or repo in artifact.path.resolve().parents:
        raise StoreError(f"artifact {artifact.path} is inside Triton's repository {repo}: release it from the "
                         "model store")
    template = artifact.config_path.read_text()  # what is written below is exactly what was checked
    pinned = artifact.metadata.get("config_sha256")
    if not config_pinned(template, pinned):
        raise ArtifactIntegrityError(f"{artifact.config_path}: config template does not match {METADATA} "
                                     f"config_sha256 ({str(pinned)[:12]}..); nothing was written")
    mdir.mkdir(parents=True, exist_ok=True)
    tmp = mdir / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _copy_verified(artifact, tmp)
        vdir = mdir / str(version)
        if vdir.exists():
            shutil.rmtree(vdir)
        tmp.rename(vdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_config(mdir, template, name, versions, artifact.metadata, serving)
    return vdir


def write_config(model_dir: Path, template: str, name: str, versions: list[int], spec: dict | None = None,
                 serving: ServingSettings | None = None) -> None:
    """Atomically write ``<model_dir>/config.pbtxt``: ``template`` named ``name`` with the explicit policy
    ``specific: versions`` (never Triton's default), ``linewatch_spec`` = ``spec`` and the deployment block
    of ``serving`` for the newest of ``versions``."""
    check_name(name)
    if not versions:
        raise ValueError(f"{name}: the rollout writes an explicit version policy; no versions given")
    versions = [check_version(v) for v in versions]
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{CONFIG}.tmp"
    text = deployed_config(rewrite_config(template, name, versions, spec), serving, model_dir / str(max(versions)))
    tmp.write_text(text)
    tmp.replace(model_dir / CONFIG)  # atomic: Triton never reads half a config


def repository_versions(repository: str | os.PathLike, name: str) -> list[int]:
    d = model_dir(repository, name)
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def repository_models(repository: str | os.PathLike) -> list[str]:
    """Models the rollout wrote (a config.pbtxt and a version); candidates excluded."""
    root = Path(repository)
    if not root.is_dir():
        return []
    from contracts.names import is_candidate, is_safe_name

    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_safe_name(p.name) and not is_candidate(p.name)
                  and (p / CONFIG).is_file() and repository_versions(root, p.name))


def pinned_version(repository: str | os.PathLike, name: str) -> int | None:
    """The one version ``name``'s config.pbtxt pins (``version_policy { specific { versions: N } }``), else None
    (no config, one Triton cannot parse, another policy, or several versions)."""
    cfg = model_dir(repository, name) / CONFIG
    if not cfg.is_file():
        return None
    try:
        policy = parse_config(cfg.read_text()).version_policy
    except ConfigError:
        return None
    versions = list(policy.specific.versions) if policy.WhichOneof("policy_choice") == "specific" else []
    return int(versions[0]) if len(versions) == 1 else None


def remove_model_dir(repository: str | os.PathLike, name: str) -> None:
    d = model_dir(repository, name)
    if d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
