"""Safety of weights and adapters: loaded only verified and without pickle code execution
(Kafka TLS/SASL and secrets: test_safety_kafka.py)."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from contracts.artifact import ArtifactIntegrityError, sha256_file
from models.artifacts import safe_load_safetensors, safe_torch_load, sidecar_path, write_sha256_sidecar

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55word-do-not-log"


# ============================================================================ 1. weights / adapters


class Evil:
    """A pickle payload: unpickling it calls os.mkdir(marker) (a harmless, observable side effect)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _refuses_deserialising(monkeypatch):
    """Make any deserialisation fail loudly: proves a refusal happened *before* reading the tensors."""
    calls = []

    def spy(*a, **k):
        calls.append(a)
        raise AssertionError("deserialiser called on an unverified file")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(torch.jit, "load", spy)
    import safetensors.torch

    import models.moleflow.store as store

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    monkeypatch.setattr(store, "load_file", spy)
    return calls


def _tamper(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def test_static_no_unsafe_deserialisation_in_models_and_triton_repo():
    """Every torch.load passes weights_only=True; no pickle-family module is imported; every
    torch.jit.load is preceded, in its function, by a sha256 verification."""
    files = sorted((REPO / "models").rglob("*.py")) + sorted((REPO / "triton_repo").rglob("*.py"))
    assert len(files) > 10
    banned = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
    problems = []
    n_loads = 0
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        parents = {}
        for node in ast.walk(tree):
            for ch in ast.iter_child_nodes(node):
                parents[ch] = node
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in banned for m in mods):
                    problems.append(f"{f}:{node.lineno} imports {mods}")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "torch.load":
                n_loads += 1
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    problems.append(f"{f}:{node.lineno} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                problems.append(f"{f}:{node.lineno} np.load(allow_pickle=...)")
            if name == "torch.jit.load":
                n_loads += 1
                fn = node
                while fn is not None and not isinstance(fn, ast.FunctionDef):
                    fn = parents.get(fn)
                verified = fn is not None and any(
                    isinstance(c, ast.Call) and c.lineno < node.lineno
                    and any(s in ast.unparse(c.func) for s in ("sha256_file", "verify", "check_before_load"))
                    for c in ast.walk(fn))
                if not verified:
                    problems.append(f"{f}:{node.lineno} torch.jit.load without a prior sha256 check")
    assert n_loads >= 2, "the scan found no loads at all: is it looking at the right files?"
    assert not problems, problems


def test_the_evil_pickle_is_live(tmp_path):
    """Control: plain pickle *does* run the payload, so the refusals below are meaningful."""
    marker = tmp_path / "pwned-by-plain-pickle"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def test_malicious_reduce_refused_even_with_a_matching_sha256(tmp_path):
    from models.backbones import load_state_dict_file
    from models.efficientad.model import EfficientAD, load_checkpoint, load_teacher_weights

    marker = tmp_path / "pwned"
    # torch.save zip archive (the attacker also wrote a matching sidecar: integrity is not authenticity)
    ck = tmp_path / "evil.pt"
    torch.save({"format": "linewatch-efficientad", "state_dict": {"w": Evil(marker)}}, str(ck))
    write_sha256_sidecar(ck)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_checkpoint(ck)
    with pytest.raises(pickle.UnpicklingError):
        load_teacher_weights(EfficientAD(), ck)
    # legacy (non-zip) pickle stream named like a state_dict
    legacy = tmp_path / "backbone.pth"
    legacy.write_bytes(pickle.dumps({"conv_stem.weight": Evil(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(legacy, sha256=sha256_file(legacy))
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(legacy)  # no digest known: still weights_only
    assert not marker.exists(), "the pickle payload ran"


def test_tampered_checkpoint_refused_before_deserialising(tmp_path, monkeypatch):
    from models.efficientad.model import EfficientAD, load_checkpoint, save_checkpoint

    ck = save_checkpoint(EfficientAD().eval(), tmp_path / "m.pt", {"threshold": 0.1})
    side = sidecar_path(ck)
    assert side.read_text().split()[0] == sha256_file(ck)
    model, meta = load_checkpoint(ck)  # intact: loads
    assert meta["threshold"] == 0.1
    _tamper(ck)
    calls = _refuses_deserialising(monkeypatch)
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        load_checkpoint(ck)
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "m.pt", sha256="0" * 64)  # explicit digest wins over the sidecar
    assert calls == []


def test_digest_sources_and_require_mode(tmp_path, monkeypatch, capsys):
    from models.backbones import load_state_dict_file

    sd = {"conv_stem.weight": torch.ones(2)}
    f = tmp_path / "plain.pth"
    torch.save(sd, str(f))
    digest = sha256_file(f)
    # torch-hub naming: name-<sha256 prefix>.pth
    good_hub = tmp_path / f"net-{digest[:8]}.pth"
    good_hub.write_bytes(f.read_bytes())
    assert torch.equal(load_state_dict_file(good_hub)["conv_stem.weight"], torch.ones(2))
    bad_hub = tmp_path / "net-deadbeef.pth"
    bad_hub.write_bytes(f.read_bytes())
    calls = _refuses_deserialising(monkeypatch)
    with pytest.raises(ArtifactIntegrityError):
        load_state_dict_file(bad_hub)
    with pytest.raises(ArtifactIntegrityError):
        load_state_dict_file(f, sha256="ab" * 32)
    # no digest anywhere + require_sha256 (Settings.require_sha256, env LINEWATCH_REQUIRE_SHA256): refused
    # before reading, for torch.load and safetensors alike
    from contracts.config import Settings

    monkeypatch.setenv("LINEWATCH_REQUIRE_SHA256", "1")
    require = Settings().require_sha256
    assert require is True
    st = tmp_path / "plain.safetensors"
    st.write_bytes(b"not read")
    for load in (safe_torch_load, safe_load_safetensors):
        for p in (f, st):
            with pytest.raises(ArtifactIntegrityError, match="no sha256 known"):
                load(p, require_sha256=require)
    assert calls == []
    monkeypatch.undo()
    # default: an unpinned file still loads (weights_only) but is logged as unverified; the env var alone
    # (no Settings passed down) changes nothing in models.artifacts
    monkeypatch.setenv("LINEWATCH_REQUIRE_SHA256", "1")
    capsys.readouterr()
    assert torch.equal(load_state_dict_file(f)["conv_stem.weight"], torch.ones(2))
    assert "weights_unverified" in capsys.readouterr().err


def test_served_torchscript_verified_against_metadata_before_jit_load(tmp_path, monkeypatch):
    from contracts.artifact import write_manifest
    from models.efficientad.export import build_spec, config_pbtxt
    from models.efficientad.serving import ARTIFACT, MODEL_PY, verify_and_load

    class Tiny(torch.nn.Module):
        def forward(self, x):
            m = x.abs().mean(1, keepdim=True)
            return m, m.flatten(1).mean(1)

    vdir = tmp_path / "efficientad_bottle" / "1"
    vdir.mkdir(parents=True)
    torch.jit.save(torch.jit.trace(Tiny(), torch.zeros(2, 3, 8, 8)), str(vdir / ARTIFACT))
    (vdir / "model.py").write_text(MODEL_PY)
    meta = write_manifest(vdir, build_spec("efficientad_bottle", "bottle", 1, 0.1, 0.1, size=8), [ARTIFACT, "model.py"])
    (vdir.parent / "config.pbtxt").write_text(config_pbtxt("efficientad_bottle", meta, size=8))
    module, _ = verify_and_load(vdir)
    assert module(torch.ones(1, 3, 8, 8))[1].item() == pytest.approx(1.0)
    calls = _refuses_deserialising(monkeypatch)
    # an unlisted file beside the artifact is refused too (it would be served unpinned)
    (vdir / "extra.pt").write_bytes(b"x")
    with pytest.raises(ArtifactIntegrityError, match="extra_file: extra.pt"):
        verify_and_load(vdir)
    (vdir / "extra.pt").unlink()
    _tamper(vdir / ARTIFACT)
    with pytest.raises(ArtifactIntegrityError, match="sha256_mismatch: model.pt"):
        verify_and_load(vdir)
    (vdir / ARTIFACT).unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing_artifact: model.pt"):
        verify_and_load(vdir)
    assert calls == []


def test_moleflow_tampered_base_and_adapter_refused_before_reading(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from models.moleflow.store import ArtifactError, load_adapter, load_model

    store = tmp_path / "store"
    adir = store / "adapters" / "bottle"
    adir.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(store / "base.safetensors"))
    base_sha = sha256_file(store / "base.safetensors")
    (store / "base.json").write_text(json.dumps({"format": "moleflow-base", "sha256": base_sha, "config": {}}))
    save_file({"router.mean": torch.zeros(4)}, str(adir / "adapter.safetensors"))
    (adir / "adapter.json").write_text(json.dumps({"task": "bottle", "index": 1, "base_sha256": base_sha,
                                                   "sha256": sha256_file(adir / "adapter.safetensors")}))
    _tamper(adir / "adapter.safetensors")
    _tamper(store / "base.safetensors")
    calls = _refuses_deserialising(monkeypatch)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_adapter(None, adir, base_sha)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_model(store)
    # an adapter trained on another base is refused before its file is read as well
    with pytest.raises(ArtifactError, match="trained on base"):
        load_adapter(None, adir, "f" * 64)
    assert calls == []


def test_sidecar_is_written_for_everything_linewatch_saves(tmp_path):
    from models.efficientad.model import EfficientAD, save_checkpoint

    ck = save_checkpoint(EfficientAD(), tmp_path / "c.pt", {})
    assert sidecar_path(ck).is_file()
    src = (REPO / "models" / "efficientad" / "distill.py").read_text()
    assert "write_sha256_sidecar(out_path)" in src  # distilled teachers too
