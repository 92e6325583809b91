"""The probe detector: a real Triton Python-backend model with a real ``linewatch_spec`` (64x64 input,
anomaly map = mean |x| over channels, a configurable per-batch delay). It makes fault scenarios cost
seconds on a 2-core machine; written through the same artifact contract as the real detectors."""

from __future__ import annotations

import contextlib
from pathlib import Path

from contracts.artifact import CONFIG, MODEL_FILE, TensorConfig, render_config, write_manifest

_PROBE_MODEL_PY = '''"""linewatch probe detector (tests/harness/probe_model.py): anomaly map = mean |x| over channels."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay_s = float(params.get("delay_ms", {}).get("string_value", "0")) / 1000.0

    def execute(self, requests):
        if self.delay_s:
            time.sleep(self.delay_s)  # one "forward pass" per dynamic batch
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "image").as_numpy()
            amap = np.abs(x).mean(axis=1, keepdims=True).astype(np.float32)
            score = amap.reshape(len(x), -1).mean(axis=1, keepdims=True).astype(np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("anomaly_map", amap),
                                                   pb_utils.Tensor("score", score)]))
        return out
'''


def write_probe_model(repo: str | Path, name: str = "probe_bottle", *, product: str = "bottle", size: int = 64,
                      delay_ms: int = 0, max_batch: int = 8, threshold: float = 10.0) -> str:
    """Write the probe detector into a Triton model repository; returns its name."""
    spec = {"schema": 1, "model": name, "detector": "probe", "version": 1, "product": product,
            "input": {"name": "image", "height": size, "width": size, "color": "RGB", "layout": "NCHW",
                      "dtype": "FP32", "scale": 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "outputs": {"anomaly_map": "anomaly_map", "score": "score"},
            "threshold": threshold, "map_threshold": threshold}
    d = Path(repo) / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "1" / MODEL_FILE).write_text(_PROBE_MODEL_PY)
    meta = write_manifest(d / "1", spec, [MODEL_FILE])
    (d / CONFIG).write_text(render_config(
        name, max_batch_size=max_batch, spec=meta, parameters={"delay_ms": str(int(delay_ms))},
        inputs=[TensorConfig("image", "TYPE_FP32", (3, size, size))],
        outputs=[TensorConfig("anomaly_map", "TYPE_FP32", (1, size, size)), TensorConfig("score", "TYPE_FP32", (1,))]))
    return name


@contextlib.contextmanager
def probe_stack(root: Path, delay_ms: int):
    """A LocalStack of its own serving the probe detector, for a module that kills, pauses or restarts its
    services (the session stack must survive every test). Yields (stack, model name)."""
    from devstack.stack import LocalStack

    model = write_probe_model(root / "model_repository", delay_ms=delay_ms)
    stack = LocalStack(root / "work", root / "model_repository", start_timeout_s=90, load_models=[model])
    stack.start()
    try:
        yield stack, model
    finally:
        stack.stop()
