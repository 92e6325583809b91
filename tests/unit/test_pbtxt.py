"""config.pbtxt through Triton's own schema (issue #27 item 4): contracts/pbtxt.py builds and edits every
config as a ``ModelConfig`` message (tritonclient.grpc.model_config_pb2) with protobuf's text format.

A rendered config round-trips; a config edited by hand (several lines, comments, another field order,
list syntax) parses, edits and pins like a rendered one; a field or type Triton's schema does not know
fails with the line and the field; versions pinned before configs were messages still verify."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import orjson
import pytest

from contracts.artifact import read_artifact, verify_artifact, write_manifest
from contracts.pbtxt import (
    ConfigError,
    TensorConfig,
    apply_deployment,
    build_config,
    config_pinned,
    config_sha256,
    format_config,
    parse_config,
    render_config,
    rewrite_config,
)
from contracts.pbtxt import schema as pb

REPO = Path(__file__).resolve().parents[2]
IN = [TensorConfig("image", "TYPE_UINT8", (3, 64, 64)), TensorConfig("task", "TYPE_STRING", (1,), optional=True)]
OUT = [TensorConfig("anomaly_map", "TYPE_FP16", (1, 8, 8)), TensorConfig("score", "TYPE_FP32", (1,))]
SPEC = {"model": "m", "version": 1, "note": 'q"uote \\ and ünïcode'}

# what an operator might write: comments, several lines, another field order, list syntax, colons
HAND_EDITED = '''
# EfficientAD, bottle: edited by hand
backend: "python"   # the Python backend
name: "m"
input [
  {
    name: "image"
    data_type: TYPE_UINT8
    dims: [ 3, 64, 64 ]
  },
  { name: "task", data_type: TYPE_STRING, dims: [ 1 ], optional: true }
]
output: [ { name: "anomaly_map" data_type: TYPE_FP16 dims: [ 1, 8, 8 ] },
          { name: "score" data_type: TYPE_FP32 dims: 1 } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
dynamic_batching {
  max_queue_delay_microseconds: 2000  # 2 ms
}
max_batch_size: 8
'''


def test_render_round_trips_through_the_message():
    cfg = build_config("m", inputs=IN, outputs=OUT, spec=SPEC, parameters={"delay_ms": "5"}, latest=2)
    text = format_config(cfg)
    assert parse_config(text) == cfg and render_config("m", inputs=IN, outputs=OUT, spec=SPEC,
                                                       parameters={"delay_ms": "5"}, latest=2) == text
    assert orjson.loads(parse_config(text).parameters["linewatch_spec"].string_value) == SPEC
    assert format_config(parse_config(text)) == text
    # edits keep everything they do not own
    again = parse_config(rewrite_config(text, "m2", [4, 5], {"model": "m2"}))
    assert again.name == "m2" and list(again.version_policy.specific.versions) == [4, 5]
    assert not again.version_policy.HasField("latest")  # a oneof: specific replaced latest
    assert again.parameters["delay_ms"].string_value == "5" and list(again.input) == list(cfg.input)


def test_hand_edited_config_with_comments_parses_edits_and_pins_like_a_rendered_one():
    rendered = render_config("m", inputs=IN, outputs=OUT)
    assert parse_config(HAND_EDITED) == parse_config(rendered)
    # the pin is the message's: comments, layout and order do not change it; nor does the spec parameter
    assert config_sha256(HAND_EDITED) == config_sha256(rendered)
    assert config_sha256(rewrite_config(HAND_EDITED, "m", None, SPEC)) == config_sha256(HAND_EDITED)
    assert config_sha256(HAND_EDITED.replace("2000", "3000")) != config_sha256(HAND_EDITED)
    # edits work on it (the old regexes needed their own one-line layout; the warmup came out None)
    edited = parse_config(rewrite_config(HAND_EDITED, "m__candidate", [3], SPEC))
    assert edited.name == "m__candidate" and list(edited.version_policy.specific.versions) == [3]
    deployed = parse_config(apply_deployment(HAND_EDITED, device="gpu", instances=2, gpus=[1]))
    assert [(g.kind, g.count, list(g.gpus)) for g in deployed.instance_group] == [(pb().ModelInstanceGroup.KIND_GPU, 2, [1])]
    (warm,) = deployed.model_warmup
    assert list(warm.inputs) == ["image"] and list(warm.inputs["image"].dims) == [3, 64, 64]
    assert apply_deployment(HAND_EDITED) == apply_deployment(rendered)


def test_deployment_keeps_what_an_operator_added():
    text = HAND_EDITED + '''
optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda_graph_probe" } ] } }
model_warmup [ { name: "real_frame" batch_size: 1 inputs { key: "image" value { data_type: TYPE_UINT8
  dims: [ 3, 64, 64 ] random_data: true } } } ]
'''
    trt = apply_deployment(text, device="gpu", onnxruntime=True)
    back = parse_config(apply_deployment(trt))
    names = [a.name for a in back.optimization.execution_accelerators.gpu_execution_accelerator]
    assert names == ["cuda_graph_probe"] and [w.name for w in back.model_warmup] == ["real_frame", "zeros"]
    assert back.backend == "python" and not back.default_model_filename


@pytest.mark.parametrize("text, says", [
    (HAND_EDITED + "max_batch: 4\n", 'no field named "max_batch"'),
    (HAND_EDITED + "max_batch_size: 4\n", "max_batch_size"),  # a singular field set twice
    (HAND_EDITED.replace("TYPE_FP16", "TYPE_HALF"), "TYPE_HALF"),
    (HAND_EDITED.replace("count: 1,", 'count: "one",'), "count"),
    (HAND_EDITED.replace("dynamic_batching {", "dynamic_batching"), ""),
])
def test_invalid_config_fails_with_the_line_and_the_field(text, says):
    with pytest.raises(ConfigError, match="not a valid Triton ModelConfig") as e:
        parse_config(text)
    assert says in str(e.value) and re.search(r"\d+:\d+", str(e.value)), e.value
    for edit in (lambda: rewrite_config(text, "m", [1]), lambda: apply_deployment(text), lambda: config_sha256(text)):
        with pytest.raises(ConfigError):
            edit()
    assert not config_pinned(text, "0" * 64)


def test_invalid_values_are_refused_when_building():
    with pytest.raises(ConfigError, match="TYPE_FLOAT32.*TYPE_FP32"):
        render_config("m", inputs=[TensorConfig("image", "TYPE_FLOAT32", (3, 8, 8))], outputs=[])
    with pytest.raises(ConfigError, match="only inputs may be optional"):
        render_config("m", inputs=[], outputs=[TensorConfig("score", "TYPE_FP32", (1,), optional=True)])
    with pytest.raises(ConfigError, match="KIND_TPU"):
        render_config("m", inputs=[], outputs=[], instance_kind="KIND_TPU")


def _legacy_digest(text: str) -> str:
    """How versions exported before configs were messages pinned their template."""
    kept = "\n".join(ln.rstrip() for ln in text.splitlines() if '"linewatch_spec"' not in ln).strip() + "\n"
    return hashlib.sha256(kept.encode()).hexdigest()


LEGACY = '''name: "m"
backend: "python"
max_batch_size: 8
input [
  { name: "image" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] }
]
output [
  { name: "anomaly_map" data_type: TYPE_FP32 dims: [ 1, 64, 64 ] },
  { name: "score" data_type: TYPE_FP32 dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "linewatch_spec" value { string_value: "{}" } }
'''


def test_versions_pinned_before_configs_were_messages_still_verify(tmp_path):
    assert config_pinned(LEGACY, _legacy_digest(LEGACY)) and config_pinned(LEGACY, config_sha256(LEGACY))
    assert not config_pinned(LEGACY.replace("2000", "3000"), _legacy_digest(LEGACY))
    assert not config_pinned(LEGACY, None)
    vdir = tmp_path / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.py").write_text("# thin\n")
    spec = {"schema": 1, "model": "m", "detector": "efficientad", "version": 1, "product": "bottle",
            "input": {"name": "image", "height": 64, "width": 64, "color": "RGB", "layout": "NCHW", "dtype": "FP32",
                      "scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3},
            "outputs": {"anomaly_map": "anomaly_map", "score": "score"}, "threshold": 1.0}
    (vdir / "config.pbtxt").write_text(LEGACY)
    write_manifest(vdir, {**spec, "config_sha256": _legacy_digest(LEGACY)}, ["model.py"])
    assert verify_artifact(vdir, strict=True).ok
    (vdir / "config.pbtxt").write_text(LEGACY.replace("KIND_CPU count: 1", "KIND_CPU count: 4"))
    assert any(r.startswith("config_sha256_mismatch") for r in verify_artifact(vdir).reasons)
    (vdir / "config.pbtxt").write_text(LEGACY + "bogus_field: 1\n")
    reasons = verify_artifact(vdir).reasons
    assert any(r.startswith("bad_config") and "bogus_field" in r for r in reasons), reasons
    assert read_artifact(vdir).config_path is not None


def test_contracts_import_only_the_schema_of_tritonclient():
    """pyproject's import-linter exception (contracts.pbtxt -> tritonclient) covers one module: the schema."""
    uses = subprocess.run(["git", "grep", "-nE", r"^\s*(from|import) tritonclient", "--", "contracts/*.py"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip().splitlines()
    assert uses and all(re.search(r"contracts/pbtxt\.py:\d+:\s+from tritonclient\.grpc import model_config_pb2$", u)
                        or "from tritonclient.grpc.model_config_pb2 import ModelConfig" in u for u in uses), uses
