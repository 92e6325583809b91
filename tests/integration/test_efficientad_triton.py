"""EfficientAD end to end on the real stack: tiny training on real bottle images -> export into the
session Triton model repository -> explicit load -> gRPC inference equals the eager module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from models.data import MVTecDataset, list_images, mvtec_category_dir
from models.efficientad.export import export_triton
from models.efficientad.networks import pdn_small
from models.efficientad.train import TrainConfig, train_efficientad

pytestmark = pytest.mark.integration


def test_efficientad_served_by_triton_matches_eager(local_stack, shared_data, tmp_path):
    cat = mvtec_category_dir("bottle", shared_data)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher_small.pth"
    torch.save(pdn_small().state_dict(), teacher)  # official teacher_small.pth layout
    cfg = TrainConfig(steps=3, val_fraction=0.4, seed=0)
    model, meta = train_efficientad(list_images(cat / "train" / "good")[:5], cfg, teacher_weights=teacher)
    vdir = export_triton(model, local_stack.model_repository, "bottle", threshold=meta["threshold"],
                         map_threshold=meta["map_threshold"])
    name = vdir.parent.name
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    client.load_model(name)
    assert client.is_model_ready(name, str(vdir.name))
    spec = json.loads(client.get_model_config(name, as_json=True)["config"]["parameters"]["linewatch_spec"]["string_value"])
    assert spec["threshold"] == pytest.approx(meta["threshold"]) and spec["artifacts"]["model.pt"]
    # an official-layout teacher takes ImageNet-normalised inputs; the spec tells the worker so
    assert list(model.input_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert spec["input"]["mean"] == pytest.approx(list(model.input_mean))

    ds = MVTecDataset(cat, "test", 256, mean=model.input_mean, std=model.input_std)
    x = torch.stack([ds[0]["image"], ds[len(ds) - 1]["image"]])  # one defective, one good image
    with torch.no_grad():
        amap, score = model(x)
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    res = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput("anomaly_map"),
                                             grpcclient.InferRequestedOutput("score")])
    t_map, t_score = res.as_numpy("anomaly_map"), res.as_numpy("score")
    assert t_map.shape == (2, 1, 256, 256) and t_score.shape == (2, 1)
    np.testing.assert_allclose(t_map, amap.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t_score[:, 0], score.numpy(), rtol=1e-4, atol=1e-5)
