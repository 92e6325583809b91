"""The Triton fixture is real: a TorchScript model served by tritonserver's Python backend over
gRPC with dynamic batching returns what the same torch module returns in-process."""

import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

pytestmark = pytest.mark.integration

MODEL = "fixture_tiny_conv"

CONFIG = """
name: "fixture_tiny_conv"
backend: "python"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 16, 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4, 8, 8 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

MODEL_PY = textwrap.dedent(
    '''
    import os
    import numpy as np
    import torch
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            torch.set_num_threads(1)
            here = os.path.dirname(__file__)
            self.net = torch.jit.load(os.path.join(here, "model.pt")).eval()

        def execute(self, requests):
            xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
            sizes = [x.shape[0] for x in xs]
            with torch.inference_mode():
                y = self.net(torch.from_numpy(np.concatenate(xs))).numpy()
            out, i = [], 0
            for n in sizes:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y[i:i + n])]))
                i += n
            return out
    '''
)


class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_torchscript_model_served_over_grpc_matches_local(local_stack):
    torch.manual_seed(0)
    net = TinyConv().eval()
    d = local_stack.model_repository / MODEL
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(CONFIG)
    (d / "1" / "model.py").write_text(MODEL_PY)
    torch.jit.trace(net, torch.zeros(1, 3, 16, 16)).save(str(d / "1" / "model.pt"))
    local_stack.load_model(MODEL)

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 16, 16), dtype=np.float32) for n in (1, 3, 2, 1, 4, 1)]
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)

    def infer(x):
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("y")]).as_numpy("y")

    with ThreadPoolExecutor(4) as ex:  # concurrent requests: dynamic batching merges them
        outs = list(ex.map(infer, batches))
    for x, y in zip(batches, outs, strict=True):
        with torch.inference_mode():
            ref = net(torch.from_numpy(x)).numpy()
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    cfg = client.get_model_config(MODEL).config
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    client.unload_model(MODEL, headers=local_stack.control_headers)
    client.close()
