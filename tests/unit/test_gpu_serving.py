"""Device-aware serving (GPU-serving issue, deliver 1, 4, 6): the deployment setting becomes each materialised
config's instance group, a GPU instance without CUDA fails its load with one line, UINT8 frames cross the
wire and are normalised in-graph exactly as the FP32 path normalised them before."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from contracts.artifact import read_artifact, verify_artifact, write_manifest
from contracts.config import ServingSettings
from contracts.pbtxt import TensorConfig, apply_deployment, format_config, parse_config, render_config
from contracts.pbtxt import schema as pb
from contracts.spec import model_input, normalise, parse_spec, to_pixels, to_tensor
from models.serving_device import CudaUnavailable, instance_device, self_check
from stream.lifecycle.repository import StoreError, materialize, write_config

IN = [TensorConfig("image", "TYPE_UINT8", (3, 64, 64)), TensorConfig("task", "TYPE_STRING", (1,), optional=True)]
OUT = [TensorConfig("anomaly_map", "TYPE_FP16", (1, 8, 8)), TensorConfig("score", "TYPE_FP32", (1,))]


def _spec(detector: str = "efficientad", dtype: str = "UINT8") -> dict:
    return {"schema": 1, "model": "m", "detector": detector, "version": 1, "product": "bottle",
            "input": {"name": "image", "height": 64, "width": 64, "color": "RGB", "layout": "NCHW", "dtype": dtype,
                      "scale": 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "outputs": {"anomaly_map": "anomaly_map", "score": "score"}, "threshold": 0.0}


def test_deployment_block_gpu_cpu_and_tensorrt():
    t = render_config("m", inputs=IN, outputs=OUT, spec=_spec())
    gpu = apply_deployment(t, device="gpu", instances=2, gpus=[0, 1])
    g = parse_config(gpu)
    assert [(x.kind, x.count, list(x.gpus)) for x in g.instance_group] == [(pb().ModelInstanceGroup.KIND_GPU, 2, [0, 1])]
    assert g.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"  # DLPack in GPU memory
    assert g.parameters["linewatch_fp16"].string_value == "1"
    # the warmup batch: the required UINT8 image, not the optional BYTES task
    (warm,) = g.model_warmup
    assert (warm.name, warm.batch_size, list(warm.inputs)) == ("zeros", 1, ["image"])
    w = warm.inputs["image"]
    assert (w.data_type, list(w.dims), w.zero_data) == (pb().TYPE_UINT8, [3, 64, 64], True)
    trt = parse_config(apply_deployment(gpu, device="gpu", onnxruntime=True, trt_cache_dir="/cache"))
    assert trt.backend == "onnxruntime" and trt.default_model_filename == "model.onnx"
    (acc,) = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_engine_cache_path"] == "/cache"
    assert len(trt.instance_group) == 1 and len(trt.model_warmup) == 1  # idempotent: replaced, not added
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in trt.parameters
    cpu = apply_deployment(format_config(trt))
    c = parse_config(cpu)
    assert cpu == apply_deployment(t) and c.backend == "python" and not c.HasField("optimization")
    assert [(x.kind, x.count) for x in c.instance_group] == [(pb().ModelInstanceGroup.KIND_CPU, 1)]
    assert not c.default_model_filename and c.parameters["linewatch_fp16"].string_value == "0"
    assert parse_config(cpu).parameters["linewatch_spec"] == parse_config(t).parameters["linewatch_spec"]
    with pytest.raises(ValueError, match="GPU path"):
        apply_deployment(t, onnxruntime=True)
    with pytest.raises(ValueError):
        ServingSettings(efficientad_backend="onnxruntime")  # the CPU stack serves the Python backend


def _artifact(store, detector="efficientad", onnx=True):
    vdir = store / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.py").write_text("# thin\n")
    files = ["model.py"]
    if onnx:
        (vdir / "model.onnx").write_bytes(b"onnx graph")
        files.append("model.onnx")
    spec = _spec(detector)
    meta = write_manifest(vdir, spec, files, config=render_config("m", inputs=IN, outputs=OUT, spec=spec))
    assert verify_artifact(vdir, strict=True).ok, meta
    return read_artifact(vdir)


def test_materialize_writes_the_deployment(tmp_path):
    gpu = ServingSettings(device="gpu", instances=1, gpus=[1], efficientad_backend="onnxruntime")
    out = materialize(_artifact(tmp_path / "store"), tmp_path / "repo", "m", [1], gpu)
    cfg = (out.parent / "config.pbtxt").read_text()
    c = parse_config(cfg)
    assert [(x.kind, x.count, list(x.gpus)) for x in c.instance_group] == [(pb().ModelInstanceGroup.KIND_GPU, 1, [1])]
    assert c.backend == "onnxruntime" and (out / "model.onnx").is_file()
    assert list(c.version_policy.specific.versions) == [1]
    assert verify_artifact(out).ok  # the version's pinned template is untouched: only the model config differs
    # a rollback rewrites the config: the deployment stays
    write_config(out.parent, cfg, "m", [1], serving=gpu)
    assert (out.parent / "config.pbtxt").read_text().count("KIND_GPU") == 1
    # MoLE-Flow keeps the Python backend on the GPU; an EfficientAD without model.onnx is refused
    mf = materialize(_artifact(tmp_path / "s2", "moleflow", onnx=False), tmp_path / "r2", "m", [1], gpu)
    mcfg = (mf.parent / "config.pbtxt").read_text()
    assert parse_config(mcfg).backend == "python" and "KIND_GPU" in mcfg
    with pytest.raises(StoreError, match="model.onnx"):
        materialize(_artifact(tmp_path / "s3", onnx=False), tmp_path / "r3", "m", [1], gpu)


def test_gpu_instance_without_cuda_fails_its_load_in_one_line():
    assert instance_device({"model_instance_kind": "CPU"}) == torch.device("cpu")
    assert self_check("cpu")["device"] == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for call in (lambda: instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "0"}),
                 lambda: self_check("gpu")):
        with pytest.raises(CudaUnavailable) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "sees no CUDA" in msg and torch.__version__ in msg


def test_uint8_wire_equals_the_fp32_normalisation(shared_data):
    """A UINT8 frame normalised in-graph is bit-for-bit the FP32 tensor the worker used to send."""
    img = cv2.imread(str(sorted((shared_data / "mvtec/bottle/test/broken_large").glob("*.png"))[0]))
    u8, f32 = parse_spec(_spec()), parse_spec(_spec(dtype="FP32"))
    px = to_tensor(img, u8)
    assert px.dtype == np.uint8 and px.shape == (3, 64, 64) and np.array_equal(px, to_pixels(img, f32))
    np.testing.assert_array_equal(normalise(px[None], u8)[0], to_tensor(img, f32))
    assert model_input(px[None], u8).dtype == np.uint8  # pixels cross the wire: a quarter of the bytes
    np.testing.assert_array_equal(model_input(px[None], f32)[0], to_tensor(img, f32))  # an FP32 version
    with pytest.raises(ValueError, match="UINT8"):
        model_input(to_tensor(img, f32)[None], u8)
    with pytest.raises(ValueError, match="dtype"):
        parse_spec(json.dumps(_spec(dtype="FP64")))
