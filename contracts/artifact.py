"""Model store: where training jobs put artifacts and the rollout controller reads them.

The store is addressed by a URI: ``file:///abs/dir`` or a plain directory path (the default,
``LINEWATCH_MODEL_STORE``; in Kubernetes a shared volume). Its layout is the Triton model-repository
layout the exports already write (docs/CONTRACTS.md), so ``linewatch-models ... export --repo STORE``
writes straight into it::

    <store>/<model>/config.pbtxt                 (or <store>/<model>/<version>/config.pbtxt)
    <store>/<model>/<version>/metadata.json      linewatch_spec + {"artifacts": {relpath: sha256}}
    <store>/<model>/<version>/model.py + artifacts

An *artifact* is one version directory. Its identity on ``model-events`` is
(artifact_uri, sha256 of metadata.json); metadata.json pins the sha256 of every other file, so one
digest covers the whole artifact. :func:`verify_artifact` checks both levels;
:func:`check_compatibility` checks a new spec against the one serving now (same detector and
input contract, MoLE-Flow adapters trained on the same frozen base, earlier tasks' adapters
unchanged). :func:`materialize` hard-links (or copies) an artifact into a Triton repository under
a given model name with an explicit version policy.

No torch here (package ``stream``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from contracts.spec import parse_spec

METADATA = "metadata.json"
CONFIG = "config.pbtxt"
CANDIDATE_SUFFIX = "__candidate"


class StoreError(Exception):
    """Unreachable store / unsupported URI / artifact that cannot be read at all."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_artifact(uri: str | os.PathLike) -> Artifact:
    """Read metadata.json of one artifact (version dir). StoreError if it is not one."""
    p = uri_to_path(uri)
    if not p.is_dir():
        raise StoreError(f"artifact directory not found: {p}")
    mp = p / METADATA
    if not mp.is_file():
        raise StoreError(f"not an artifact (no {METADATA}): {p}")
    raw = mp.read_bytes()
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"corrupt {mp}: {e}") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{mp} is not a JSON object")
    try:
        version = int(meta.get("version", p.name))
    except (TypeError, ValueError):
        raise StoreError(f"{mp}: version {meta.get('version')!r} is not an integer") from None
    model = str(meta.get("model") or p.parent.name)
    cfg = p / CONFIG if (p / CONFIG).is_file() else (p.parent / CONFIG if (p.parent / CONFIG).is_file() else None)
    return Artifact(p, model, version, meta, hashlib.sha256(raw).hexdigest(), cfg)


def verify_artifact(uri: str | os.PathLike, expected_sha256: str | None = None,
                    expected_model: str | None = None, expected_version: int | None = None) -> Verification:
    """Integrity: metadata.json digest == expected, every listed artifact file present with its sha256,
    model.py + config present, spec parseable. Returns every problem found (never raises for content)."""
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
        reasons.append("no_artifacts: metadata.json lists no artifact sha256")
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
    if not (a.path / "model.py").is_file():
        reasons.append("missing_model_py: the version dir has no model.py")
    if a.config_path is None:
        reasons.append(f"missing_config: no {CONFIG} beside the artifact")
    try:
        parse_spec(a.metadata)
    except (ValueError, TypeError) as e:
        reasons.append(f"bad_spec: {e}")
    return Verification(not reasons, reasons, a)


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
        for vdir in sorted((p for p in mdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            try:
                out.append(read_artifact(vdir))
            except StoreError:
                continue
    return out


def latest_artifact(store: str | os.PathLike, model: str) -> Artifact | None:
    arts = [a for a in list_artifacts(store) if a.path.parent.name == model]
    return arts[-1] if arts else None


# ----------------------------------------------------------------------------- Triton repository

_NAME_RE = re.compile(r'^\s*name\s*:\s*"[^"]*"\s*$', re.M)
_POLICY_RE = re.compile(r"^\s*version_policy\s*:.*$", re.M)


def rewrite_config(text: str, name: str, versions: list[int] | None, spec: dict[str, Any] | None = None) -> str:
    """config.pbtxt with ``name`` replaced, ``version_policy`` = specific ``versions`` (None: keep) and the
    ``linewatch_spec`` parameter replaced by ``spec`` (metadata.json is the sha-verified source of truth)."""
    if spec is not None:
        text = "\n".join(ln for ln in text.splitlines() if '"linewatch_spec"' not in ln) + "\n"
        quoted = orjson.dumps(orjson.dumps(spec).decode()).decode()
        text += f'parameters {{ key: "linewatch_spec" value {{ string_value: {quoted} }} }}\n'
    text = _NAME_RE.sub(f'name: "{name}"', text, count=1) if _NAME_RE.search(text) else f'name: "{name}"\n{text}'
    if versions is not None:
        policy = "version_policy: { specific: { versions: [ " + ", ".join(str(v) for v in versions) + " ] } }"
        text = _POLICY_RE.sub(policy, text, count=1) if _POLICY_RE.search(text) else text.rstrip("\n") + "\n" + policy + "\n"
    return text


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
