"""MoLE-Flow on the real stack: tiny training on real bottle images -> export into the session Triton
model repository -> explicit load -> gRPC inference equals eager (routed and task-named requests);
then a second task's adapter (real ELPV cells) is trained, exported as a NEW version and loaded via
explicit model control WITHOUT restarting Triton; both tasks serve and task 0's results are unchanged.
Requests carry UINT8 pixels (normalised in the model); maps come back FP16 at the flow grid."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from contracts.spec import normalise, parse_spec, to_pixels
from models.data import list_images
from models.moleflow.datasets import elpv_split
from models.moleflow.export import export_triton
from models.moleflow.model import MoLEFlow, MoLEFlowConfig
from models.moleflow.store import load_model, save_adapter, save_base_if_needed, save_model
from models.moleflow.train import TrainConfig, train_task

pytestmark = pytest.mark.integration

NAME = "moleflow_it"


def _infer(client, x: np.ndarray, tasks: list[str]):
    img = grpcclient.InferInput("image", list(x.shape), "UINT8")
    img.set_data_from_numpy(x)
    t = grpcclient.InferInput("task", [len(tasks), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in tasks], dtype=np.object_))
    outs = [grpcclient.InferRequestedOutput(n) for n in ("anomaly_map", "score", "task", "route_distance")]
    res = client.infer(NAME, [img, t], outputs=outs)
    return (res.as_numpy("anomaly_map"), res.as_numpy("score"),
            [v.decode() for v in res.as_numpy("task").reshape(-1)], res.as_numpy("route_distance"))


def _pixels(paths, spec) -> np.ndarray:
    return np.stack([to_pixels(cv2.imread(str(p)), parse_spec(spec)) for p in paths])


def _eager(model, px: np.ndarray, spec, tasks):
    """What the served model computes: in-graph normalisation, calibrated, the map at the flow grid."""
    x = torch.from_numpy(normalise(px, parse_spec(spec)))
    return model.predict_features(*model.extract(x), tasks, calibrated=True, size=0)


def _check(out, eager):
    amap, score, tasks, rd = out
    assert tasks == eager["task"]
    assert amap.dtype == np.float16 and amap.shape[-1] == 14  # native resolution, FP16 on the wire
    np.testing.assert_allclose(amap.astype(np.float32), eager["anomaly_map"].numpy(), rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(score[:, 0], eager["score"].numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(rd[:, 0], eager["route_distance"].numpy(), rtol=1e-4, atol=1e-4)


def test_moleflow_served_by_triton_and_adapter_rollout_without_restart(local_stack, shared_data, tmp_path):
    torch.set_num_threads(1)
    weights = shared_data / "weights" / "efficientnet-lite0-57934424.pth"
    cfg = MoLEFlowConfig(grid=14, dim=32, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, coupling_layers=2, dia_blocks=2)
    model = MoLEFlow(cfg, backbone_weights=weights)
    bottle = shared_data / "mvtec" / "bottle"
    tcfg = TrainConfig(epochs=2, batch_size=4, progress=False)
    train_task(model, "bottle", list_images(bottle / "train" / "good")[:8], tcfg)
    store = tmp_path / "store"
    save_model(model, store)

    v1 = export_triton(store, local_stack.model_repository, NAME)
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    client.load_model(NAME, headers=local_stack.control_headers)
    assert client.is_model_ready(NAME, v1.name)
    cfg_json = client.get_model_config(NAME, as_json=True)["config"]
    spec = json.loads(cfg_json["parameters"]["linewatch_spec"]["string_value"])
    assert spec["detector"] == "moleflow" and list(spec["tasks"]) == ["bottle"] and spec["input"]["height"] == 224

    assert spec["input"]["dtype"] == "UINT8"
    xb = _pixels([list_images(bottle / "test" / "broken_large")[0], list_images(bottle / "test" / "good")[0]], spec)
    eager_b = _eager(model, xb, spec, ["bottle", None])
    _check(_infer(client, xb, ["bottle", ""]), eager_b)

    # ---- task 1 (ELPV) trained into the same store; the running server gets it as version 2
    e_train, e_test = elpv_split(n_train=8, n_test_good=1, n_test_bad=1, seed=1)
    model2 = load_model(store)
    train_task(model2, "elpv", e_train, tcfg)
    save_adapter(model2, "elpv", store, save_base_if_needed(model2, store))
    v2 = export_triton(store, local_stack.model_repository, NAME)
    assert v2.name == str(int(v1.name) + 1)
    client.load_model(NAME, headers=local_stack.control_headers)  # explicit model control: no restart
    assert client.is_model_ready(NAME, v2.name)
    spec2 = json.loads(client.get_model_config(NAME, as_json=True)["config"]["parameters"]["linewatch_spec"]["string_value"])
    assert list(spec2["tasks"]) == ["bottle", "elpv"] and spec2["version"] == int(v2.name)

    xe = _pixels([p for p, _ in e_test], spec2)
    x = np.concatenate([xb, xe])
    eager = _eager(model2, x, spec2, [None, "bottle", None, "elpv"])
    assert eager["task"] == ["bottle", "bottle", "elpv", "elpv"]
    _check(_infer(client, x, ["", "bottle", "", "elpv"]), eager)
    # task 0's outputs are unchanged by task 1 (same eager results as before, served by the new version)
    again = _eager(model2, xb, spec2, ["bottle", None])
    assert torch.equal(again["anomaly_map"], eager_b["anomaly_map"]) and torch.equal(again["score"], eager_b["score"])
    client.unload_model(NAME, headers=local_stack.control_headers)
