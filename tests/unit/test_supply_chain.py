"""Supply chain of model artifacts (issue #15 item 5): strict names, copy (not link) with a post-copy
check, config.pbtxt pinned by the manifest, explicit version policy, no takeover of a product without a
flag, candidates never routed. Pure logic on real files; the Triton side is tests/integration/test_rollout.py."""

from __future__ import annotations

import hashlib
import json

import pytest

from contracts.artifact import (
    ArtifactIntegrityError,
    StoreError,
    TensorConfig,
    config_sha256,
    read_artifact,
    render_config,
    verify_artifact,
    write_manifest,
)
from contracts.envelope import EnvelopeError, Frame
from contracts.model_events import ModelEvent, ModelEventError, decode
from contracts.names import BadNameError, check_name, check_version
from contracts.pbtxt import parse_config
from stream.inference.routing import Router, RoutingConfig
from stream.lifecycle.repository import materialize, write_config
from tests.harness.requires import require_module

BAD_NAMES = ["..", "../x", "a/b", "a\\b", ".hidden", "", "x" * 129, "a..b", "a b", "/abs", "é"]


def spec(model="efficientad_bottle", version=1):
    return {"schema": 1, "model": model, "detector": "efficientad", "version": version, "product": "bottle",
            "input": {"name": "image", "height": 64, "width": 64, "color": "RGB", "layout": "NCHW", "dtype": "FP32",
                      "scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3},
            "outputs": {"anomaly_map": "anomaly_map", "score": "score"}, "threshold": 1.0, "map_threshold": 1.0}


def cfg(name="efficientad_bottle", spec_=None):
    return render_config(name, inputs=[TensorConfig("image", "TYPE_FP32", (3, 64, 64))],
                         outputs=[TensorConfig("score", "TYPE_FP32", (1,))], spec=spec_)


def export(store, model="efficientad_bottle", version=1):
    """What an export writes: files, manifest pinning model.py + the config template, config.pbtxt."""
    vdir = store / model / str(version)
    vdir.mkdir(parents=True)
    (vdir / "model.pt").write_bytes(b"weights")
    (vdir / "model.py").write_text("# thin\n")
    meta = write_manifest(vdir, spec(model, version), ["model.pt", "model.py"], config=cfg(model, spec(model, version)))
    (store / model / "config.pbtxt").write_text(cfg(model, meta))
    return vdir, hashlib.sha256((vdir / "metadata.json").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- 1. strict names


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_check_name_rejects_escaping_names(bad):
    with pytest.raises(BadNameError):
        check_name(bad)


def test_check_name_and_version_accept_ordinary():
    assert check_name("efficientad_bottle") == "efficientad_bottle"
    assert check_name("lwt_bottle-1.2") == "lwt_bottle-1.2"
    assert check_version(3) == 3 and check_version("7") == 7
    for bad in (0, -1, "01x", "..", True, "1/2"):
        with pytest.raises(BadNameError):
            check_version(bad)


@pytest.mark.parametrize("bad", ["..", ".x", "a/b", "x" * 129, "a..b"])
def test_model_event_rejects_bad_names(bad):
    d = {"schema": 1, "type": "released", "model": "m", "version": 1, "artifact_uri": "/x", "sha256": "a" * 64}
    for field in ("model", "product", "task"):
        with pytest.raises(ModelEventError, match=field):
            decode(json.dumps({**d, field: bad}))


def test_model_event_rejects_candidate_model_and_validates_take_over():
    d = {"schema": 1, "type": "released", "model": "m__candidate", "version": 1, "artifact_uri": "/x",
         "sha256": "a" * 64}
    with pytest.raises(ModelEventError, match="model"):
        decode(json.dumps(d))
    with pytest.raises(ModelEventError, match="take_over"):
        decode(json.dumps({**d, "model": "m", "take_over": "yes"}))
    assert decode(json.dumps({**d, "model": "m", "take_over": True})).take_over is True
    assert ModelEvent("released", "m", 1, artifact_uri="/x", sha256="a" * 64).take_over is False


def test_read_and_verify_reject_escaping_model_name(tmp_path):
    vdir, sha = export(tmp_path / "store")
    meta = json.loads((vdir / "metadata.json").read_text())
    meta["model"] = "../evil"
    (vdir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="model name"):
        read_artifact(vdir)
    v = verify_artifact(vdir)
    assert not v.ok and v.reasons[0].startswith("unreadable_artifact") and "model name" in v.reasons[0]
    bad_dir = tmp_path / "s2" / ".hidden" / "1"
    bad_dir.parent.parent.mkdir()
    (tmp_path / "store" / "efficientad_bottle").rename(bad_dir.parent)
    meta["model"] = None
    (bad_dir / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    with pytest.raises(StoreError, match="model name"):
        read_artifact(bad_dir)


@pytest.mark.parametrize("bad", ["..", "../x", ".x", "a/b"])
def test_materialize_rejects_escaping_target_name(tmp_path, bad):
    vdir, _ = export(tmp_path / "store")
    with pytest.raises(ValueError, match="model name"):
        materialize(read_artifact(vdir), tmp_path / "repo", bad, [1])
    assert not (tmp_path / "x").exists() and not (tmp_path / "repo" / "1").exists()


def test_exports_use_the_shared_name_check():
    require_module("torch", "torch is not installed (the [models] extra, in [dev]: make venv)")
    from models.efficientad.export import export_triton as ead_export
    from models.moleflow.export import export_triton as mf_export

    for bad in ("..", "a/../b", ".x"):
        with pytest.raises(ValueError, match="name"):
            ead_export(None, "/nonexistent", bad)
        with pytest.raises(ValueError, match="name"):
            mf_export("/nonexistent", "/nonexistent", name=bad)


# ----------------------------------------------------------------------------- 2. copy, not link


def test_materialize_copies_so_store_changes_do_not_reach_triton(tmp_path):
    store, repo = tmp_path / "store", tmp_path / "repo"
    vdir, sha = export(store)
    art = verify_artifact(vdir, sha, strict=True).raise_for_reasons()
    out = materialize(art, repo, "efficientad_bottle", [1])
    for f in ("model.pt", "model.py", "metadata.json"):
        assert (out / f).stat().st_ino != (vdir / f).stat().st_ino and (out / f).stat().st_nlink == 1
    with open(vdir / "model.pt", "r+b") as f:  # the store changes in place after the rollout
        f.write(b"EVIL")
    assert (out / "model.pt").read_bytes() == b"weights"
    assert verify_artifact(out, sha).ok  # what Triton serves still verifies


def test_materialize_refuses_a_store_changed_between_verify_and_copy(tmp_path):
    store, repo = tmp_path / "store", tmp_path / "repo"
    vdir, sha = export(store)
    art = verify_artifact(vdir, sha, strict=True).raise_for_reasons()
    (vdir / "model.pt").write_bytes(b"swapped after verification")
    (vdir / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(ArtifactIntegrityError, match="model.pt"):
        materialize(art, repo, "efficientad_bottle", [1])
    assert not (repo / "efficientad_bottle" / "1").exists()
    assert not (repo / "efficientad_bottle" / "config.pbtxt").exists()


def test_materialize_refuses_an_artifact_inside_the_repository(tmp_path):
    vdir, sha = export(tmp_path)
    with pytest.raises(StoreError, match="repository"):
        materialize(read_artifact(vdir), tmp_path, "other", [1])


# ----------------------------------------------------------------------------- 3. config.pbtxt pinned


def test_manifest_pins_config_template(tmp_path):
    vdir, sha = export(tmp_path / "store")
    meta = json.loads((vdir / "metadata.json").read_text())
    assert meta["config_sha256"] == config_sha256((vdir / "config.pbtxt").read_text())
    # the linewatch_spec parameter is replaced from metadata.json at materialize, so it is not pinned
    assert config_sha256(cfg("efficientad_bottle", {"other": 1})) == meta["config_sha256"]
    assert verify_artifact(vdir, sha, strict=True).ok


def test_modified_config_refused_by_verify_and_materialize(tmp_path):
    store, repo = tmp_path / "store", tmp_path / "repo"
    vdir, sha = export(store)
    art = read_artifact(vdir)
    (vdir / "config.pbtxt").write_text(cfg().replace("TYPE_FP32", "TYPE_FP16", 1))
    v = verify_artifact(vdir, sha)
    assert not v.ok and any(r.startswith("config_sha256_mismatch") for r in v.reasons), v.reasons
    with pytest.raises(ArtifactIntegrityError, match="config"):
        materialize(art, repo, "efficientad_bottle", [1])
    assert not (repo / "efficientad_bottle" / "config.pbtxt").exists()


def test_strict_verify_requires_config_digest_and_pinned_model_py(tmp_path):
    vdir = tmp_path / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.pt").write_bytes(b"w")
    (vdir / "model.py").write_text("# thin\n")
    write_manifest(vdir, spec("m"), ["model.pt"])
    (vdir.parent / "config.pbtxt").write_text(cfg("m"))
    reasons = verify_artifact(vdir, strict=True).reasons
    assert any(r.startswith("missing_config_digest") for r in reasons), reasons
    assert any(r.startswith("unpinned_model_py") for r in reasons), reasons
    assert verify_artifact(vdir).ok  # lenient (Triton's initialize of a directly loaded export)


def test_rollout_always_writes_an_explicit_version_policy(tmp_path):
    store, repo = tmp_path / "store", tmp_path / "repo"
    vdir, _ = export(store)
    materialize(read_artifact(vdir), repo, "efficientad_bottle", [1])
    written = parse_config((repo / "efficientad_bottle" / "config.pbtxt").read_text())
    assert list(written.version_policy.specific.versions) == [1]
    for versions in ([], None):
        with pytest.raises(ValueError, match="version"):
            write_config(repo / "efficientad_bottle", cfg(), "efficientad_bottle", versions)


# ----------------------------------------------------------------------------- 5. candidates never routed


def F(product=None, task=None, camera="cam-1"):
    return Frame(frame_id="f", camera_id=camera, ts_ms=0, image=b"x", product=product, task=task)


def test_candidate_product_or_task_header_is_bad_header():
    r = Router(RoutingConfig(), {"efficientad_bottle": (), "efficientad_bottle__candidate": (),
                                 "moleflow": ("bottle",), "moleflow__candidate": ("bottle",)})
    for fr in (F(product="bottle__candidate"), F(product="bottle", task="bottle__candidate"),
               F(task="moleflow__candidate")):
        with pytest.raises(EnvelopeError) as e:
            r.route(fr)
        assert e.value.reason == "bad_header", e.value
    assert r.route(F(product="bottle")).model == "efficientad_bottle"


def test_routing_config_cannot_name_a_candidate():
    with pytest.raises(ValueError, match="candidate"):
        RoutingConfig.from_dict({"products": {"bottle": "efficientad_bottle__candidate"}})
    with pytest.raises(ValueError, match="candidate"):
        RoutingConfig.from_dict({"cameras": {"cam-1": "bottle__candidate"}})


@pytest.mark.parametrize("bad", ["x\n", "bottle\n", "x\r\n", "x\n\n"])
def test_names_reject_trailing_newline(bad):
    """Issue #26 item 11: ``$`` matches before a final ``\\n``, so ``x\\n`` passed and became a folder
    ``x\\n`` (``POST /api/onboarding/x%0A/onboard``). Every name check matches the whole string."""
    from contracts.envelope import decode_frame, encode_frame
    from contracts.names import is_safe_name
    from models.moleflow.config import check_task_name

    assert not is_safe_name(bad)
    with pytest.raises(BadNameError):
        check_name(bad)
    with pytest.raises(ValueError):
        check_task_name(bad)
    with pytest.raises(BadNameError):
        check_version(bad)
    key, value, headers = encode_frame(Frame(frame_id="f1", camera_id="cam1", ts_ms=1, image=b"\xff\xd8x"))
    for header in ("frame_id", "camera_id"):
        bad_headers = [(k, (bad.encode() if k == header else v)) for k, v in headers]
        with pytest.raises(EnvelopeError):
            decode_frame(key, value, bad_headers)
