"""The detector contract, the same checks for every registered detector (contracts/detectors.py):

its demo recipe (models.detector.Detector.quick_recipe, tiny schedule) trains on a few real MVTec bottle
images and exports into a temporary repository -> the manifest verifies (contracts.artifact.verify_artifact)
-> the real tritonserver loads it -> the spec round-trips (metadata.json == config.pbtxt's linewatch_spec
== Detector.spec) -> on real images preprocessed as the worker does (contracts.spec.to_tensor) every
output Triton serves equals the eager ``Detector.load_serving`` one.

Detector-specific checks stay beside their detectors (test_efficientad_triton.py: the exported trace
equals the eager EfficientAD; test_moleflow_triton.py: in-memory model parity and the adapter rollout).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from contracts.artifact import CONFIG, rewrite_config, verify_artifact
from contracts.config import Settings
from contracts.detectors import DETECTORS
from contracts.image import decode_image
from contracts.pbtxt import apply_deployment
from contracts.spec import parse_spec, to_tensor
from models import Detector
from models.cli import run
from models.registry import get

pytestmark = pytest.mark.integration

PRODUCT = "bottle"


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_contract(name, local_stack, shared_data, tmp_path):
    det = get(name)
    repo = tmp_path / "repo"
    recipe = det.quick_recipe(data_dir=shared_data, product=PRODUCT, workdir=tmp_path / "work", repository=repo,
                              steps=2, max_images=8)
    (tmp_path / "work" / "artifacts").mkdir(parents=True)
    settings = Settings(data_dir=shared_data)
    for argv in recipe.steps:
        assert run(argv, settings) == 0, argv
    versions = sorted((p for p in (repo / recipe.model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [v.name for v in versions] == ["1"]
    vdir = versions[-1]

    # the manifest pins every file of the version
    ver = verify_artifact(vdir)
    assert ver.ok, ver.reasons
    meta = ver.artifact.metadata
    assert meta["detector"] == name and meta["model"] == recipe.model
    # the recipe's calibrate step chose an operating point on held-out good images (per task if multi-task)
    op = meta["tasks"][PRODUCT]["operating_point"] if det.info.multi_task else meta["operating_point"]
    assert op["n_good"] >= 20 and op["n_synthetic"] == 2 * op["n_good"] and 0 <= op["estimated_recall"] <= 1
    assert op["target_false_alarm_rate"] == Settings().target_false_alarm_rate

    # Triton (real tritonserver) loads it, under a session-unique name
    served = f"contract_{name}"
    dst = Path(local_stack.model_repository) / served
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(vdir.parent, dst)
    # the config the rollout writes (stream/lifecycle/repository.py): renamed, plus the CPU deployment's
    # instance group and warmup batch (contracts.pbtxt, Triton's ModelConfig schema)
    (dst / CONFIG).write_text(apply_deployment(rewrite_config((vdir.parent / CONFIG).read_text(), served, None)))
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    client.load_model(served, headers=local_stack.control_headers)
    try:
        assert client.is_model_ready(served, vdir.name)

        # the spec round-trips: metadata.json == Triton's linewatch_spec == Detector.spec
        cfg = client.get_model_config(served, as_json=True)["config"]
        triton_spec = json.loads(cfg["parameters"]["linewatch_spec"]["string_value"])
        spec = parse_spec(meta)
        assert parse_spec(triton_spec) == spec == det.spec(vdir)
        assert triton_spec["artifacts"] == meta["artifacts"]
        if det.info.multi_task:  # one model, the product is one of its tasks
            assert PRODUCT in spec.tasks
        else:  # one model per product
            assert spec.product == PRODUCT and not spec.tasks

        # eager (the version dir loaded in-process as Triton's model does) == served, every output
        cat = shared_data / "mvtec" / PRODUCT / "test"
        images = [sorted((cat / "broken_large").glob("*.png"))[0], sorted((cat / "good").glob("*.png"))[0]]
        x = np.stack([to_tensor(decode_image(p.read_bytes()), spec) for p in images])
        task = det.info.task_of(PRODUCT)
        tasks = [task, None]  # multi-task: one named task, one routed by the model
        eager = det.load_serving(vdir)(x, tasks)

        assert spec.input.dtype == "UINT8" and x.dtype == np.uint8  # pixels on the wire, normalised in-graph
        inp = grpcclient.InferInput(spec.input.name, list(x.shape), spec.input.dtype)
        inp.set_data_from_numpy(x)
        inputs = [inp]
        if det.info.multi_task:
            t = grpcclient.InferInput("task", [len(tasks), 1], "BYTES")
            t.set_data_from_numpy(np.array([[(s or "").encode()] for s in tasks], dtype=np.object_))
            inputs.append(t)
        outs = list(spec.outputs.values())
        res = client.infer(served, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outs])
        amap = res.as_numpy(spec.outputs["anomaly_map"])  # the model's native resolution, FP16
        assert amap.shape[:2] == (2, 1) and amap.shape[-1] <= spec.input.width and amap.dtype == np.float16
        assert res.as_numpy(spec.outputs["score"]).shape == (2, 1)
        for o in outs:
            got, want = res.as_numpy(o), eager[o]
            assert got.shape == want.shape, o
            if want.dtype == np.object_:
                assert [bytes(v) for v in got.reshape(-1)] == [bytes(v) for v in want.reshape(-1)], o
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=o)
        # the Python API (models.api.Detector) scores what Triton serves, judged by the version's operating point
        preds = Detector.load(vdir).predict_batch([decode_image(p.read_bytes()) for p in images], tasks)
        np.testing.assert_allclose([p.score for p in preds], res.as_numpy(spec.outputs["score"])[:, 0], rtol=1e-4, atol=1e-5)
        assert all(p.is_anomaly == (p.score > p.threshold) and bool(p.boxes) == p.is_anomaly for p in preds)
    finally:
        client.unload_model(served, headers=local_stack.control_headers)
