"""Numeric precision and device choices that depend on the machine.

bf16 autocast only pays where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere
(AVX2-only CPUs) PyTorch emulates it and a training step gets orders of magnitude slower, so
every CPU schedule defaults to fp32 there.

Training device (``Settings.train_device`` / ``--device``): "auto" trains on ``cuda:0`` when torch sees
CUDA, else on the CPU; "cuda" without CUDA is an error (one line naming why), never a silent CPU run.
On CUDA the training passes run under bf16 autocast: H100/H200 compute bf16 natively and bf16 has
fp32's exponent range, so no GradScaler is needed. Models and checkpoints leave training on the CPU.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Any

import torch

from contracts.config import Settings

_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
TRAIN_DEVICES: tuple[str, ...] = typing.get_args(Settings.model_fields["train_device"].annotation)  # auto, cpu, cuda
CUDA_MISSING = ("linewatch: train_device=cuda but torch {torch} sees no CUDA (built for CUDA {cuda}, {why}); "
                "install the torch build that matches the node driver, or train with --device cpu / "
                "LINEWATCH_TRAIN_DEVICE=cpu")


@functools.cache
def native_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (Linux; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return any(f in flags for f in _NATIVE_FLAGS)


def train_device(choice: str = "auto") -> torch.device:
    """The device a training runs on: "auto" (cuda:0 when available, else cpu), "cpu" or "cuda".

    RuntimeError (one line) for "cuda" where torch sees no CUDA; ValueError for any other choice."""
    from models.serving_device import cuda_problem

    if choice not in TRAIN_DEVICES:
        raise ValueError(f"train device must be one of {', '.join(TRAIN_DEVICES)}, not {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    why = cuda_problem()
    if why is None:
        return torch.device("cuda", 0)
    if choice == "cuda":
        raise RuntimeError(CUDA_MISSING.format(torch=torch.__version__, cuda=torch.version.cuda, why=why))
    return torch.device("cpu")


def autocast_args(device: torch.device | str, cpu_bf16: bool) -> dict[str, Any]:
    """``torch.autocast(**autocast_args(...))`` for a training pass on ``device``: bf16 on CUDA, bf16 on
    the CPU only when ``cpu_bf16`` (native bf16 CPUs), disabled on anything else."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True}
    return {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": bool(cpu_bf16) and dev.type == "cpu"}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_cpu(obj: Any) -> Any:
    """Tensors in (nested dicts / lists / tuples of) ``obj`` on the CPU; CPU tensors are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def log_train_device(log: Any, device: torch.device, amp: dict[str, Any], **fields: Any) -> None:
    """One structured ``train_device`` line at the start of a training: device, torch, CUDA build, autocast."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "amp": str(amp["dtype"]).removeprefix("torch.") if amp.get("enabled") else "fp32"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    log.info("train_device", **info, **fields)


def cli_train_device(choice: str) -> torch.device:
    """:func:`train_device` for a CLI verb: an unusable choice becomes contracts.cli's one-line failure
    (RuntimeFailure, exit 1), never a traceback."""
    from contracts.cli import RuntimeFailure

    try:
        return train_device(choice)
    except RuntimeError as e:
        raise RuntimeFailure(str(e)) from None
