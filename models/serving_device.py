"""The device a Triton Python-backend instance runs on, and zero-copy tensors in and out of it.

Triton tells each model instance where it runs (``args["model_instance_kind"]`` "CPU" or "GPU" and
``args["model_instance_device_id"]``) from the config's ``instance_group``, which the rollout writes
from the deployment setting ``serving.device`` when it materialises a version
(stream/lifecycle/repository.py). A GPU instance on a machine where torch sees no CUDA fails its
load with one line naming the cause, never a silent CPU fallback.
"""

from __future__ import annotations

from typing import Any

import torch

CUDA_MISSING = ("{what} asks for GPU {id} but torch {torch} sees no CUDA (built for CUDA {cuda}: {why}); "
                "install the torch build that matches the node driver and the Triton image (README: GPU "
                "prerequisites) or deploy with serving.device=cpu")


class CudaUnavailable(RuntimeError):
    """A GPU was asked for and torch cannot use one (one line: what asked, the torch build, why)."""


def cuda_problem() -> str | None:
    """Why CUDA is unusable here (None: usable)."""
    if torch.version.cuda is None:
        return "a CPU-only torch wheel"
    if not torch.cuda.is_available():
        return "no driver/GPU visible to this process, or a driver older than the wheel's CUDA"
    return None


def instance_device(args: dict[str, Any]) -> torch.device:
    """torch.device of this Triton model instance; RuntimeError (one line) for a GPU instance without CUDA."""
    kind = str(args.get("model_instance_kind", "CPU")).upper()
    if kind != "GPU":
        return torch.device("cpu")
    dev_id = int(args.get("model_instance_device_id", 0) or 0)
    why = cuda_problem()
    if why is not None:
        raise CudaUnavailable(CUDA_MISSING.format(what="linewatch: this KIND_GPU model instance", id=dev_id,
                                                  torch=torch.__version__, cuda=torch.version.cuda, why=why))
    if dev_id >= torch.cuda.device_count():
        raise CudaUnavailable(f"linewatch: instance asks for GPU {dev_id}; torch sees {torch.cuda.device_count()}")
    return torch.device("cuda", dev_id)


def input_tensor(pb_tensor: Any, device: torch.device) -> torch.Tensor:
    """A Triton input as a torch tensor on ``device`` via DLPack (no copy where it already lives there)."""
    t = torch.utils.dlpack.from_dlpack(pb_tensor.to_dlpack())
    return t if t.device == device else t.to(device, non_blocking=True)


def output_tensor(pb: Any, name: str, t: torch.Tensor) -> Any:
    """A torch tensor as a Triton output via DLPack (GPU tensors stay on the GPU)."""
    return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t.contiguous()))


def self_check(device: str) -> dict[str, Any]:
    """What a process will run on: logged at startup; RuntimeError when ``device`` is "gpu" without CUDA."""
    info: dict[str, Any] = {"requested": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if device == "gpu" and (why := cuda_problem()) is not None:
        raise CudaUnavailable(CUDA_MISSING.format(what="serving.device=gpu", id=0, torch=torch.__version__,
                                                  cuda=torch.version.cuda, why=why))
    info["device"] = "cuda" if device == "gpu" else "cpu"
    return info
