import hashlib
import json

import orjson
import pytest

from contracts.artifact import (
    ArtifactError,
    ArtifactIntegrityError,
    MissingArtifactError,
    StoreError,
    TensorConfig,
    check_compatibility,
    check_sha256,
    config_sha256,
    latest_artifact,
    list_artifacts,
    path_to_uri,
    read_artifact,
    read_manifest,
    render_config,
    rewrite_config,
    uri_to_path,
    verify_artifact,
    write_manifest,
)
from contracts.pbtxt import parse_config
from contracts.pbtxt import schema as pb
from stream.lifecycle.repository import materialize, remove_model_dir, repository_versions, write_config

CONFIG = '''name: "efficientad_bottle"
backend: "python"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
parameters { key: "linewatch_spec" value { string_value: "{}" } }
'''


def spec(model="efficientad_bottle", version=1, **kw):
    d = {"schema": 1, "model": model, "detector": "efficientad", "version": version, "product": "bottle",
         "input": {"name": "image", "height": 64, "width": 64, "color": "RGB", "layout": "NCHW", "dtype": "FP32",
                   "scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3},
         "outputs": {"anomaly_map": "anomaly_map", "score": "score"}, "threshold": 1.0, "map_threshold": 1.0}
    d.update(kw)
    return d


def make_artifact(store, model="efficientad_bottle", version=1, payload=b"weights", **kw):
    vdir = store / model / str(version)
    vdir.mkdir(parents=True)
    (vdir / "model.pt").write_bytes(payload)
    (vdir / "model.py").write_text("# thin\n")
    (store / model / "config.pbtxt").write_text(CONFIG)
    meta = spec(model, version, artifacts={"model.pt": hashlib.sha256(payload).hexdigest(),
                                           "model.py": hashlib.sha256(b"# thin\n").hexdigest()},
                config_sha256=config_sha256(CONFIG), **kw)
    (vdir / "metadata.json").write_text(json.dumps(meta))
    return vdir, hashlib.sha256((vdir / "metadata.json").read_bytes()).hexdigest()


def test_uri_forms(tmp_path):
    assert uri_to_path(path_to_uri(tmp_path)) == tmp_path.resolve()
    assert uri_to_path(str(tmp_path)) == tmp_path
    with pytest.raises(StoreError, match="scheme"):
        uri_to_path("s3://bucket/x")


def test_verify_ok_and_listing(tmp_path):
    vdir, sha = make_artifact(tmp_path)
    make_artifact(tmp_path, version=2, payload=b"v2")
    v = verify_artifact(path_to_uri(vdir), sha, "efficientad_bottle", 1)
    assert v.ok, v.reasons
    assert v.artifact.product == "bottle" and v.artifact.sha256 == sha
    assert [a.version for a in list_artifacts(tmp_path)] == [1, 2]
    assert latest_artifact(tmp_path, "efficientad_bottle").version == 2


def test_corrupted_artifact_and_wrong_event_sha(tmp_path):
    vdir, sha = make_artifact(tmp_path)
    (vdir / "model.pt").write_bytes(b"tampered")
    v = verify_artifact(vdir, sha)
    assert not v.ok and any(r.startswith("sha256_mismatch: model.pt") for r in v.reasons)
    v = verify_artifact(vdir, "0" * 64, "other", 7)
    kinds = {r.split(":")[0] for r in v.reasons}
    assert {"sha256_mismatch", "model_mismatch", "version_mismatch"} <= kinds


def test_missing_pieces(tmp_path):
    vdir, sha = make_artifact(tmp_path)
    (vdir / "model.py").unlink()
    (vdir / "model.pt").unlink()
    reasons = verify_artifact(vdir, sha).reasons
    assert any(r.startswith("missing_artifact") for r in reasons) and any("model_py" in r for r in reasons)
    assert verify_artifact(tmp_path / "nope").reasons[0].startswith("unreadable_artifact")
    (vdir / "metadata.json").write_text("{bad")
    with pytest.raises(StoreError, match="corrupt"):
        read_artifact(vdir)


def test_path_escape_rejected(tmp_path):
    vdir, _ = make_artifact(tmp_path)
    meta = json.loads((vdir / "metadata.json").read_text())
    meta["artifacts"]["../../etc/passwd"] = "0" * 64
    (vdir / "metadata.json").write_text(json.dumps(meta))
    assert any(r.startswith("bad_artifact_path") for r in verify_artifact(vdir).reasons)


def test_compatibility_input_and_detector():
    cur = spec(version=1)
    assert check_compatibility(spec(version=2), cur) == []
    assert check_compatibility(spec(version=1), None) == []
    new = spec(version=2)
    new["input"] = dict(new["input"], height=128)
    assert any("input.height" in r for r in check_compatibility(new, cur))
    assert any(r.startswith("version") for r in check_compatibility(spec(version=1), cur))
    assert any(r.startswith("detector") for r in check_compatibility(spec(version=2, detector="moleflow"), cur))


def test_compatibility_moleflow_base_and_adapters():
    t0 = {"bottle": {"index": 0, "adapter_sha256": "a" * 64}}
    cur = spec("moleflow", 1, detector="moleflow", base_sha256="b" * 64, tasks=t0)
    ok = spec("moleflow", 2, detector="moleflow", base_sha256="b" * 64,
              tasks={**t0, "cells": {"index": 1, "adapter_sha256": "c" * 64}})
    assert check_compatibility(ok, cur) == []
    other_base = dict(ok, base_sha256="d" * 64)
    assert any(r.startswith("base_version") for r in check_compatibility(other_base, cur))
    touched = dict(ok, tasks={"bottle": {"adapter_sha256": "e" * 64}, "cells": {"adapter_sha256": "c" * 64}})
    assert any("earlier task" in r for r in check_compatibility(touched, cur))
    dropped = dict(ok, tasks={"cells": {"adapter_sha256": "c" * 64}})
    assert any("missing" in r for r in check_compatibility(dropped, cur))
    assert any(r.startswith("base_version") for r in check_compatibility(dict(ok, base_sha256=None), None))


def test_rewrite_config_and_materialize(tmp_path):
    txt = rewrite_config(CONFIG, "efficientad_bottle__candidate", [3], {"model": "x", "k": 'q"uote'})
    cfg = parse_config(txt)
    assert cfg.name == "efficientad_bottle__candidate" and list(cfg.version_policy.specific.versions) == [3]
    assert txt.count("linewatch_spec") == 1
    assert orjson.loads(cfg.parameters["linewatch_spec"].string_value) == {"model": "x", "k": 'q"uote'}
    txt2 = rewrite_config(txt, "m", [4])
    assert txt2.count("version_policy") == 1 and list(parse_config(txt2).version_policy.specific.versions) == [4]
    store, repo = tmp_path / "store", tmp_path / "repo"
    vdir, sha = make_artifact(store, version=5)
    art = read_artifact(vdir)
    out = materialize(art, repo, "efficientad_bottle__candidate", [5])
    assert out == repo / "efficientad_bottle__candidate" / "5"
    assert (out / "model.pt").read_bytes() == b"weights"
    cfg = (repo / "efficientad_bottle__candidate" / "config.pbtxt").read_text()
    assert orjson.loads(parse_config(cfg).parameters["linewatch_spec"].string_value)["version"] == 5
    assert repository_versions(repo, "efficientad_bottle__candidate") == [5]
    write_config(repo / "efficientad_bottle__candidate", cfg, "efficientad_bottle__candidate", [5, 6])
    written = parse_config((repo / "efficientad_bottle__candidate" / "config.pbtxt").read_text())
    assert list(written.version_policy.specific.versions) == [5, 6]
    remove_model_dir(repo, "efficientad_bottle__candidate")
    assert repository_versions(repo, "efficientad_bottle__candidate") == []


def test_unlisted_file_rejected_pycache_ignored(tmp_path):
    vdir, sha = make_artifact(tmp_path)
    (vdir / "__pycache__").mkdir()
    (vdir / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"x")  # Triton's Python backend writes these
    assert verify_artifact(vdir, sha).ok
    (vdir / "sub").mkdir()
    (vdir / "sub" / "smuggled.pt").write_bytes(b"x")
    v = verify_artifact(vdir, sha)
    assert not v.ok and v.reasons == ["extra_file: sub/smuggled.pt is not listed in metadata.json"]
    with pytest.raises(ArtifactIntegrityError, match="extra_file: sub/smuggled.pt"):
        v.raise_for_reasons(vdir)


def test_manifest_writer_and_reader(tmp_path):
    vdir = tmp_path / "m" / "3"
    (vdir / "adapters" / "a").mkdir(parents=True)
    (vdir / "model.pt").write_bytes(b"w")
    (vdir / "adapters" / "a" / "x.bin").write_bytes(b"a")
    (vdir / "model.py").write_text("# thin\n")
    (tmp_path / "m" / "config.pbtxt").write_text(CONFIG)
    tasks = {"zeta": {"index": 0}, "alpha": {"index": 1}}  # insertion order is the task order: never sorted
    meta = write_manifest(vdir, spec("m", 3, tasks=tasks, artifacts={"stale": "0" * 64}),
                          ["model.pt", "adapters/a/x.bin", "model.py"])
    assert set(meta["artifacts"]) == {"model.pt", "adapters/a/x.bin", "model.py"}
    assert meta["artifacts"]["model.pt"] == hashlib.sha256(b"w").hexdigest()
    back, digest = read_manifest(vdir)
    assert back == meta and list(back["tasks"]) == ["zeta", "alpha"]
    assert digest == hashlib.sha256((vdir / "metadata.json").read_bytes()).hexdigest()
    assert not list(vdir.glob(".*"))  # the atomic write left no temp file
    v = verify_artifact(vdir, digest, "m", 3)
    assert v.ok, v.reasons
    (vdir / "model.py").write_text("# changed\n")  # listed: model.py is pinned like any artifact
    assert any(r.startswith("sha256_mismatch: model.py") for r in verify_artifact(vdir).reasons)
    with pytest.raises(ArtifactError, match="relative"):
        write_manifest(vdir, spec("m", 3), ["../escape"])
    with pytest.raises(ArtifactError, match="lists no artifact"):
        write_manifest(vdir, spec("m", 3), [])
    with pytest.raises(StoreError, match="no metadata.json"):
        read_manifest(tmp_path)


def test_check_sha256_and_error_hierarchy(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    d = hashlib.sha256(b"weights").hexdigest()
    assert check_sha256(f, d) == d and check_sha256(f, d[:8]) == d  # torch-hub name prefix
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        check_sha256(f, "0" * 64)
    with pytest.raises(ArtifactIntegrityError):
        check_sha256(f, d[:4])  # a prefix shorter than 8 hex pins nothing
    with pytest.raises(MissingArtifactError) as e:
        check_sha256(tmp_path / "nope", d)
    assert isinstance(e.value, FileNotFoundError)
    for cls in (StoreError, ArtifactIntegrityError, MissingArtifactError):
        assert issubclass(cls, ArtifactError) and issubclass(cls, RuntimeError)


def test_render_config():
    s = {"model": "m", "k": 'q"uote'}
    txt = render_config("m", max_batch_size=4, latest=1, spec=s, parameters={"delay_ms": "100"},
                        inputs=[TensorConfig("image", "TYPE_FP32", (3, 64, 64)),
                                TensorConfig("task", "TYPE_STRING", (1,), optional=True)],
                        outputs=[TensorConfig("score", "TYPE_FP32", (1,))])
    cfg = parse_config(txt)
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("m", "python", 4)
    image, task = cfg.input
    assert (image.name, image.data_type, list(image.dims), image.optional) == ("image", pb().TYPE_FP32, [3, 64, 64], False)
    assert (task.name, task.data_type, list(task.dims), task.optional) == ("task", pb().TYPE_STRING, [1], True)
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("score", [1])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb().ModelInstanceGroup.KIND_CPU, 1)]
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["delay_ms"].string_value == "100"
    assert orjson.loads(cfg.parameters["linewatch_spec"].string_value) == s
    # the renderer and the rewriter agree: rewriting a rendered config with its own name / spec changes nothing
    assert rewrite_config(txt, "m", None, s) == txt
    pinned = parse_config(render_config("m", versions=[2, 3], max_queue_delay_us=None, inputs=[], outputs=[]))
    assert list(pinned.version_policy.specific.versions) == [2, 3] and not pinned.HasField("dynamic_batching")
    assert not parse_config(render_config("m", inputs=[], outputs=[])).HasField("version_policy")
    with pytest.raises(ValueError):
        render_config("m", versions=[1], latest=1, inputs=[], outputs=[])
