"""The artifact contract: model store, manifest, verification and config.pbtxt (torch- and faust-free).

The store is addressed by a URI: ``file:///abs/dir`` or a plain directory path (the default,
``LINEWATCH_MODEL_STORE``; in Kubernetes a shared volume). Its layout is the Triton model-repository
layout the exports write (docs/CONTRACTS.md), so ``linewatch-models ... export --repo STORE`` writes
straight into it::

    <store>/<model>/config.pbtxt                 (or <store>/<model>/<version>/config.pbtxt)
    <store>/<model>/<version>/metadata.json      the manifest: linewatch_spec + {"artifacts": {relpath: sha256}}
    <store>/<model>/<version>/model.py + artifacts

An *artifact* is one version directory. Its identity on ``model-events`` is (artifact_uri, sha256 of
metadata.json); the manifest pins the sha256 of every other file, so one digest covers the whole
artifact. Exports write the manifest with :func:`write_manifest` and their config.pbtxt with
:func:`render_config`; the rollout controller and every detector's Triton ``initialize`` check an
artifact with :func:`verify_artifact` (both levels, plus: no missing, modified or unlisted file) before
anything is loaded. :func:`check_compatibility` checks a new spec against the one serving now.
Putting artifacts into a Triton repository is the lifecycle's job (stream/lifecycle/repository.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from contracts.names import CANDIDATE_SUFFIX as CANDIDATE_SUFFIX
from contracts.names import BadNameError, check_name, check_version
from contracts.pbtxt import ConfigError as ConfigError
from contracts.pbtxt import TensorConfig as TensorConfig
from contracts.pbtxt import config_pinned as config_pinned
from contracts.pbtxt import config_sha256 as config_sha256
from contracts.pbtxt import render_config as render_config
from contracts.pbtxt import rewrite_config as rewrite_config
from contracts.spec import parse_spec

METADATA = "metadata.json"
CONFIG = "config.pbtxt"
MODEL_FILE = "model.py"
# files a version dir may hold without a manifest entry (model.py is pinned too when the export lists it)
_UNLISTED_OK = frozenset({METADATA, CONFIG, MODEL_FILE})
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class ArtifactError(RuntimeError):
    """A missing / corrupt / mismatched artifact (CLIs: a one-line error)."""


class StoreError(ArtifactError):
    """Unreachable store / unsupported URI / a directory that is not an artifact at all."""


class ArtifactIntegrityError(ArtifactError):
    """A file failed sha256 verification (or has no digest where one is required)."""


class MissingArtifactError(ArtifactIntegrityError, FileNotFoundError):
    """A file that must be verified does not exist."""


# ----------------------------------------------------------------------------- digests


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str) -> str:
    """The file's sha256 if it equals ``expected`` (or starts with it, for an 8+ hex torch-hub name
    prefix); else :class:`ArtifactIntegrityError`. Reads bytes only, never deserialises."""
    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(f"missing {p}")
    actual = sha256_file(p)
    exp = str(expected).strip().lower()
    if not (actual == exp if len(exp) == 64 else len(exp) >= 8 and actual.startswith(exp)):
        raise ArtifactIntegrityError(f"sha256 mismatch for {p}: {actual} != {expected} (file tampered or corrupt; "
                                     "refusing to load it)")
    return actual


# ----------------------------------------------------------------------------- store addressing


def uri_to_path(uri: str | os.PathLike) -> Path:
    """``file:///x`` or a plain path -> Path. Other schemes are not supported (yet)."""
    s = str(uri)
    if "://" in s:
        u = urlparse(s)
        if u.scheme != "file":
            raise StoreError(f"model store URI scheme {u.scheme!r} is not supported (file:// or a directory)")
        if u.netloc not in ("", "localhost"):
            raise StoreError(f"file URI with a remote host is not supported: {s}")
        return Path(unquote(u.path))
    return Path(s)


def path_to_uri(path: str | os.PathLike) -> str:
    return Path(path).resolve().as_uri()


# ----------------------------------------------------------------------------- manifest


def write_manifest(version_dir: str | os.PathLike, spec: Mapping[str, Any], files: Iterable[str],
                   config: str | None = None) -> dict[str, Any]:
    """Write ``<version_dir>/metadata.json`` = ``spec`` + ``{"artifacts": {relpath: sha256}}`` for ``files``
    (relative to the version dir; any ``spec["artifacts"]`` is replaced: every digest is computed here).
    ``config``: the version's config.pbtxt template, written to ``<version_dir>/config.pbtxt`` and pinned
    as ``config_sha256`` (:func:`contracts.pbtxt.config_sha256`; an existing ``spec["config_sha256"]`` is
    kept when not given). Atomic; returns the manifest written (what config.pbtxt's ``linewatch_spec``
    should carry)."""
    vdir = Path(version_dir)
    if spec.get("model") is not None:
        check_name(spec["model"])
    arts: dict[str, str] = {}
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ArtifactError(f"manifest paths are relative to the version dir: {rel}")
        arts[rel] = sha256_file(vdir / rel)
    if not arts:
        raise ArtifactError(f"manifest for {vdir} lists no artifact")
    meta = {**spec, "artifacts": arts}
    if config is not None:
        (vdir / CONFIG).write_text(config)
        meta["config_sha256"] = config_sha256(config)
    tmp = vdir / f".{METADATA}.tmp"
    tmp.write_bytes(orjson.dumps(meta, option=_JSON_OPTS | orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(vdir / METADATA)
    return meta


def read_manifest(version_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(metadata.json as a dict, sha256 of its bytes). :class:`StoreError` if there is none / it is corrupt."""
    mp = Path(version_dir) / METADATA
    if not mp.is_file():
        raise StoreError(f"not an artifact (no {METADATA}): {mp.parent}")
    raw = mp.read_bytes()
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"corrupt {mp}: {e}") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{mp} is not a JSON object")
    return meta, hashlib.sha256(raw).hexdigest()


@dataclass
class Artifact:
    path: Path
    model: str
    version: int
    metadata: dict[str, Any]
    sha256: str  # of metadata.json
    config_path: Path | None

    @property
    def uri(self) -> str:
        return path_to_uri(self.path)

    @property
    def detector(self) -> str:
        return str(self.metadata.get("detector", ""))

    @property
    def product(self) -> str | None:
        return self.metadata.get("product")

    @property
    def tasks(self) -> list[str]:
        t = self.metadata.get("tasks") or {}
        return list(t) if isinstance(t, dict | list) else []


@dataclass
class Verification:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    artifact: Artifact | None = None

    def raise_for_reasons(self, what: str | os.PathLike = "artifact") -> Artifact:
        """The artifact if verification passed, else :class:`ArtifactIntegrityError` naming every reason."""
        if not self.ok or self.artifact is None:
            raise ArtifactIntegrityError(f"{what} fails verification: {'; '.join(self.reasons)}")
        return self.artifact


def read_artifact(uri: str | os.PathLike) -> Artifact:
    """Read the manifest of one artifact (version dir). StoreError if it is not one."""
    p = uri_to_path(uri)
    if not p.is_dir():
        raise StoreError(f"artifact directory not found: {p}")
    meta, digest = read_manifest(p)
    try:
        version = check_version(meta.get("version", p.name))
        model = check_name(meta.get("model") or p.parent.name)
    except BadNameError as e:
        raise StoreError(f"{p / METADATA}: {e}") from None
    cfg = p / CONFIG if (p / CONFIG).is_file() else (p.parent / CONFIG if (p.parent / CONFIG).is_file() else None)
    return Artifact(p, model, version, meta, digest, cfg)


def _unlisted_files(root: Path, listed: set[str]) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # written by Triton's Python backend
        for f in sorted(files):
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            if rel not in listed and rel not in _UNLISTED_OK:
                out.append(rel)
    return out


def verify_artifact(uri: str | os.PathLike, expected_sha256: str | None = None,
                    expected_model: str | None = None, expected_version: int | None = None, *,
                    strict: bool = False) -> Verification:
    """Integrity: metadata.json digest == ``expected_sha256`` (when given), every listed file present with
    its sha256, no unlisted file (beside metadata.json, model.py, config.pbtxt), model.py + config present,
    the config template's digest == ``config_sha256`` (when the manifest has one), spec parseable.
    ``strict`` (a release into Triton): the manifest must also pin the config and model.py. Returns every
    problem found (never raises for content; see :meth:`Verification.raise_for_reasons`)."""
    try:
        a = read_artifact(uri)
    except StoreError as e:
        return Verification(False, [f"unreadable_artifact: {e}"])
    reasons: list[str] = []
    if expected_sha256 is not None and a.sha256 != expected_sha256:
        reasons.append(f"sha256_mismatch: {METADATA} is {a.sha256[:12]}.., event says {expected_sha256[:12]}..")
    if expected_model is not None and a.model != expected_model:
        reasons.append(f"model_mismatch: artifact is {a.model!r}, event says {expected_model!r}")
    if expected_version is not None and a.version != expected_version:
        reasons.append(f"version_mismatch: artifact is {a.version}, event says {expected_version}")
    arts = a.metadata.get("artifacts")
    if not isinstance(arts, dict) or not arts:
        reasons.append(f"no_artifacts: {METADATA} lists no artifact sha256")
        arts = {}
    root = a.path.resolve()
    for rel, digest in arts.items():
        f = (a.path / rel).resolve()
        if root not in f.parents:
            reasons.append(f"bad_artifact_path: {rel}")
            continue
        if not f.is_file():
            reasons.append(f"missing_artifact: {rel}")
            continue
        actual = sha256_file(f)
        if actual != digest:
            reasons.append(f"sha256_mismatch: {rel} is {actual[:12]}.., metadata says {str(digest)[:12]}..")
    reasons += [f"extra_file: {rel} is not listed in {METADATA}" for rel in _unlisted_files(a.path, set(arts))]
    if not (a.path / MODEL_FILE).is_file():
        reasons.append(f"missing_model_py: the version dir has no {MODEL_FILE}")
    if a.config_path is None:
        reasons.append(f"missing_config: no {CONFIG} beside the artifact")
    reasons += config_reasons(a, strict=strict)
    if strict and MODEL_FILE not in arts:
        reasons.append(f"unpinned_model_py: {METADATA} lists no sha256 for {MODEL_FILE}")
    try:
        parse_spec(a.metadata)
    except (ValueError, TypeError) as e:
        reasons.append(f"bad_spec: {e}")
    return Verification(not reasons, reasons, a)


def config_reasons(a: Artifact, *, strict: bool = False) -> list[str]:
    """Why the artifact's config.pbtxt template does not match the manifest's ``config_sha256``."""
    pinned = a.metadata.get("config_sha256")
    if pinned is None:
        return [f"missing_config_digest: {METADATA} pins no config_sha256"] if strict else []
    if a.config_path is None:
        return []
    text = a.config_path.read_text()
    if config_pinned(text, pinned):
        return []
    try:
        actual = config_sha256(text)
    except ConfigError as e:
        return [f"bad_config: {a.config_path.name}: {e}"[:500]]
    return [f"config_sha256_mismatch: {a.config_path.name} is {actual[:12]}.., metadata says {str(pinned)[:12]}.."]


def check_compatibility(new: dict[str, Any], current: dict[str, Any] | None) -> list[str]:
    """Reasons the new spec may not replace ``current`` (None: a new model, only self-consistency)."""
    reasons: list[str] = []
    outs = new.get("outputs") or {}
    for k in ("anomaly_map", "score"):
        if k not in outs:
            reasons.append(f"input_spec: outputs lack {k!r}")
    det = new.get("detector")
    if det == "moleflow":
        if not new.get("base_sha256"):
            reasons.append("base_version: MoLE-Flow spec has no base_sha256")
        tasks = new.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            reasons.append("tasks: MoLE-Flow spec lists no task adapters")
    if current is None:
        return reasons
    if det != current.get("detector"):
        reasons.append(f"detector: {det!r} cannot replace {current.get('detector')!r}")
    ni, ci = new.get("input") or {}, current.get("input") or {}
    for k in ("name", "height", "width", "color", "layout", "dtype"):
        if ni.get(k) != ci.get(k):
            reasons.append(f"input_spec: input.{k} {ni.get(k)!r} != serving {ci.get(k)!r}")
    if det == "moleflow" and current.get("detector") == "moleflow":
        if new.get("base_sha256") != current.get("base_sha256"):
            reasons.append(f"base_version: adapters were trained on base {str(new.get('base_sha256'))[:12]}.., "
                           f"serving base is {str(current.get('base_sha256'))[:12]}..")
        ct, nt = current.get("tasks") or {}, new.get("tasks") or {}
        for t, info in (ct.items() if isinstance(ct, dict) else []):
            if t not in nt:
                reasons.append(f"tasks: serving task {t!r} is missing from the new version")
            elif isinstance(info, dict) and isinstance(nt[t], dict) and \
                    info.get("adapter_sha256") != nt[t].get("adapter_sha256"):
                reasons.append(f"tasks: adapter of earlier task {t!r} changed (continual learning must not touch it)")
    try:
        if int(new.get("version", 0)) <= int(current.get("version", 0)):
            reasons.append(f"version: {new.get('version')} is not newer than serving {current.get('version')}")
    except (TypeError, ValueError):
        reasons.append("version: not an integer")
    return reasons


def list_artifacts(store: str | os.PathLike) -> list[Artifact]:
    """Every readable artifact in a store, sorted by (model, version)."""
    root = uri_to_path(store)
    out: list[Artifact] = []
    if not root.is_dir():
        return out
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for vdir in sorted((p for p in mdir.iterdir() if p.is_dir() and p.name.isdigit()),
                           key=lambda p: int(p.name)):
            try:
                out.append(read_artifact(vdir))
            except StoreError:
                continue
    return out


def latest_artifact(store: str | os.PathLike, model: str) -> Artifact | None:
    arts = [a for a in list_artifacts(store) if a.path.parent.name == model]
    return arts[-1] if arts else None


