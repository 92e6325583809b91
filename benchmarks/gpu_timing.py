"""Device, timing and data helpers of benchmarks/gpu_check.py: the environment record, IEEE FP32, real
images as uint8 host batches (pinned on cuda), the on-device normalisation, output copies into host
buffers, latency by CUDA events (perf_counter on the CPU) and the second path the agreement rows compare."""

from __future__ import annotations

import contextlib
import copy
import platform
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import git_state, machine
from contracts.cli import UsageError
from contracts.spec import InputSpec, to_tensor


def environment(dev) -> dict:
    drv = smi_name = None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        if exe := shutil.which("nvidia-smi"):
            line = subprocess.run([exe, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            drv, smi_name = (v.strip() for v in line.split(",", 1))
    return {"device": dev.type, "driver_version": drv,
            "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else smi_name,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            **git_state(), "machine": machine(), "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "fp32": "IEEE (TF32 off for cudnn conv and matmul)",
            "cudnn_benchmark": dev.type == "cuda"}


def set_fp32_ieee(dev) -> None:
    # the legacy flags: they keep the new fp32_precision getters consistent (setting conv.fp32_precision alone
    # makes torch.backends.cudnn.allow_tf32 raise "mix of the legacy and new APIs" for any later reader)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = dev.type == "cuda"


def read_bgr(paths) -> list[np.ndarray]:
    out = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    if bad := [p for p, img in zip(paths, out, strict=True) if img is None]:
        raise UsageError(f"cannot read image {bad[0]}")
    return out


def rgb_u8(imgs: list[np.ndarray], size: int) -> list[np.ndarray]:
    return [cv2.cvtColor(cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB) for i in imgs]


def host_batch(frames: list[np.ndarray], b: int, dev):
    """uint8 NHWC batch of b frames (cycled), pinned on cuda so the H2D copy is asynchronous."""
    t = torch.from_numpy(np.stack([frames[i % len(frames)] for i in range(b)]))
    return t.pin_memory() if dev.type == "cuda" else t


def spread(folder: Path, n: int) -> list[Path]:
    """n images of the bottle test set, taken in turn from good and every defect type."""
    from models.data import list_images

    groups = [list_images(d) for d in sorted(folder.iterdir()) if d.is_dir()]
    return [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)][:n]


def tensors(imgs: list[np.ndarray], size: int, mean, std):
    """float32 NCHW through contracts.spec.to_tensor (the serving preprocess)."""
    spec = InputSpec(height=size, width=size, mean=tuple(mean), std=tuple(std))
    return torch.from_numpy(np.stack([to_tensor(i, spec) for i in imgs]))


def prep_fn(dev, mean, std, dtype):
    """uint8 NHWC host batch -> (x / 255 - mean) / std as NCHW on the device, in ``dtype``."""
    m, sd = (torch.tensor(v, dtype=torch.float32, device=dev).view(1, -1, 1, 1) for v in (mean, std))
    return lambda u8: ((u8.to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0 - m) / sd).to(dtype).contiguous()


def host_sink(dev):
    """Copies outputs into host buffers (pinned on cuda, allocated on first use), as a serving loop would."""
    bufs: dict = {}

    def to_host(**outs) -> None:
        for name, t in outs.items():
            if (buf := bufs.get(name)) is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = bufs[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=dev.type == "cuda")
            buf.copy_(t, non_blocking=True)
    return to_host


def measure(step, dev, batch: int, a) -> dict:
    """Latency of ``step()`` after ``a.warmup`` untimed calls; stops early (``iters`` says how many were
    timed) once the timed calls have taken ``a.budget_s``."""
    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timed, wall, t_first = [], [], time.perf_counter()
    for _ in range(a.iters):
        ev = [torch.cuda.Event(enable_timing=True) for _ in "se"] if dev.type == "cuda" else None
        t0 = time.perf_counter()
        if ev:
            ev[0].record()
        step()
        if ev:
            ev[1].record()
            ev[1].synchronize()
        wall.append((time.perf_counter() - t0) * 1000.0)
        timed.append(ev[0].elapsed_time(ev[1]) if ev else wall[-1])
        if len(timed) >= 2 and time.perf_counter() - t_first > a.budget_s:
            break
    ms = np.asarray(timed, dtype=np.float64)
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "ms_per_image_p50": p50 / batch, "images_per_s": float(batch * 1000.0 / ms.mean()), "iters": int(ms.size),
            "wall_p50_ms": float(np.percentile(wall, 50)), "timer": "cuda_events" if dev.type == "cuda" else "perf_counter"}


def device_copy(model, dev):
    return copy.deepcopy(model).to(dev).eval()


@contextlib.contextmanager
def onednn_off():
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def other_path(model, dev):
    """(copy, input transform, context, label): the path the fp32 agreement rows compare with ``model`` run on
    the CPU as is. cuda: the model on the device. cpu (no second device): a copy run with oneDNN off, i.e.
    PyTorch's own convolution kernels (other code, other summation order): a real comparison of two
    implementations, but no GPU figure."""
    if dev.type == "cuda":
        return device_copy(model, dev), lambda x: x.to(dev), contextlib.nullcontext, "cuda-vs-cpu"
    return device_copy(model, dev), lambda x: x, onednn_off, "cpu-without-onednn-vs-cpu"


def peak(dev, reset: bool = False):
    if dev.type != "cuda":
        return None
    return torch.cuda.reset_peak_memory_stats(dev) if reset else torch.cuda.max_memory_allocated(dev)
