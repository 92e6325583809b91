"""GPU check: EfficientAD-S/M and MoLE-Flow latency on one device and device-vs-CPU agreement, in one JSON.

Latency = CUDA events on cuda (time.perf_counter on cpu) around: host->device copy of a uint8 RGB NHWC
batch of real bottle test images (pinned on cuda), normalisation on the device, the model, device->host
copy of anomaly_map + score into pinned buffers; warmup iterations excluded. EfficientAD (random init,
256x256): batch 1/8/32, FP32 and half (cuda: model.half(); cpu: torch.autocast bf16, no fp16 there).
MoLE-Flow (two tasks fitted quickly: bottle train/good, imagenet-sample): predict routed (task=None, the
Mahalanobis router) and forced (task="bottle") at batch 1/8. Agreement: FP32 maps/scores of real images
on the device vs on the CPU, and MoLE-Flow routing. FP32 is IEEE (TF32 off); cudnn.benchmark on cuda.
--device cpu has no second device: the agreement rows compare the model run with oneDNN off (PyTorch's own
im2col + GEMM and depthwise kernels) with the default CPU run (oneDNN), and say so ("comparison").

--tiny (a smoke run of every section, under a minute on one slow core; no figure in it is a measurement):
EfficientAD with every hidden convolution EAD_TINY_DIV times narrower and EAD_TINY_CHANNELS output
channels (same layers, 256x256 input), MoLE-Flow MOLE_TINY at MOLE_TINY["image_size"], few images and
iterations.

Writes <out>/gpu_check.json + .png (--device cpu: gpu_check_cpu.*; every target then says "device": "cpu").

    .venv/bin/python benchmarks/gpu_check.py [--device cuda|cpu] [--tiny] [--out DIR] [--iters N]
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import bottle_test_dir  # noqa: E402
from benchmarks.gpu_timing import (  # noqa: E402
    device_copy,
    environment,
    host_batch,
    host_sink,
    measure,
    other_path,
    peak,
    prep_fn,
    read_bgr,
    rgb_u8,
    set_fp32_ieee,
    spread,
    tensors,
)
from contracts.cli import OneLineParser, UsageError, positive_float, positive_int, run_command  # noqa: E402
from contracts.logs import get_logger  # noqa: E402

PROG = "benchmarks/gpu_check.py"
log = get_logger("benchmarks.gpu_check")
TARGET_EAD_MS, TARGET_MOLE_MS, TARGET_MAP_DIFF = 1.0, 5.0, 1e-3
EAD_SIZES = {"EfficientAD-S": "small", "EfficientAD-M": "medium"}
EAD_RES = 256  # fixed by the architecture (the autoencoder decodes to the PDN's 56x56 grid of a 256 input)
MOLE_TINY = dict(image_size=112, grid=14, dim=32, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, coupling_layers=2,
                 dia_blocks=2)
EAD_TINY_DIV, EAD_TINY_CHANNELS = 8, 32  # --tiny: hidden convolutions 8x narrower, 32 output channels (not 384)
EAD_WEIGHTS = ("random init (torch.manual_seed(0)); teacher normalisation and map quantiles fitted on bottle "
               "train/good images: latency does not depend on the weights, the maps are no real anomaly maps")


def narrow(seq: torch.nn.Sequential, div: int) -> torch.nn.Sequential:
    """``seq`` with every hidden Conv2d ``div`` times narrower (the first one's input and the last one's
    output channels kept; kernels, strides, paddings and the other layers as they are), random init."""
    convs = [i for i, m in enumerate(seq) if isinstance(m, torch.nn.Conv2d)]
    layers = []
    for i, m in enumerate(seq):
        if isinstance(m, torch.nn.Conv2d):
            m = torch.nn.Conv2d(m.in_channels if i == convs[0] else max(1, m.in_channels // div),
                                m.out_channels if i == convs[-1] else max(1, m.out_channels // div),
                                m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
        layers.append(m)
    return torch.nn.Sequential(*layers)


def ead_model(size: str, tiny: bool):
    """EfficientAD-S/M, random init (seed 0); ``tiny``: narrowed (EAD_TINY_DIV, EAD_TINY_CHANNELS)."""
    from models.efficientad.model import EfficientAD

    torch.manual_seed(0)
    if not tiny:
        return EfficientAD(size).eval()
    m = EfficientAD(size, out_channels=EAD_TINY_CHANNELS)
    m.teacher, m.student, m.autoencoder = (narrow(n, EAD_TINY_DIV) for n in (m.teacher, m.student, m.autoencoder))
    for p in m.teacher.parameters():
        p.requires_grad_(False)
    return m.eval()


@torch.no_grad()
def fit_normalisation(model, imgs: list[np.ndarray]):
    """Teacher mean/std and map quantiles (train.py) from good images: maps at a fitted model's scale."""
    from models.efficientad.train import TrainConfig, compute_map_quantiles, compute_teacher_normalization

    x = tensors(imgs, EAD_RES, model.input_mean, model.input_std)
    compute_teacher_normalization(model, torch.cat([model.teacher(x[i:i + 4]) for i in range(0, len(x), 4)]))
    compute_map_quantiles(model, x, TrainConfig.q_a, TrainConfig.q_b)
    return model.eval()


def efficientad(dev, a, data: dict) -> dict:
    res = {"weights": EAD_WEIGHTS, "resolution": EAD_RES, "batches": list(a.ead_batches), "warmup": a.warmup,
           "half_mode": "model.half() (float16)" if dev.type == "cuda" else
           "torch.autocast('cpu', dtype=torch.bfloat16): fp16 convolutions are not run on cpu",
           "input": "uint8 RGB NHWC (real bottle test images), pinned host memory on cuda; normalised on the device",
           "timed": "H2D copy + normalise + forward + D2H copy of anomaly_map and score (in the model's dtype)",
           "models": {}, "gpu_vs_cpu": {}, "peak_gpu_memory_bytes": {}}
    frames = rgb_u8(data["latency"], EAD_RES)
    for label, size in EAD_SIZES.items():
        base = fit_normalisation(ead_model(size, a.tiny), data["fit"])
        peak(dev, reset=True)
        res["models"][label] = {}
        for prec in ("fp32", "half"):
            model, dtype, ctx = device_copy(base, dev), torch.float32, contextlib.nullcontext
            if prec == "half" and dev.type == "cuda":
                model, dtype = model.half(), torch.float16
            elif prec == "half":
                ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            prep, to_host, rows = prep_fn(dev, base.input_mean, base.input_std, dtype), host_sink(dev), {}
            for b in a.ead_batches:
                u8 = host_batch(frames, b, dev)

                def step(u8=u8, model=model, prep=prep, to_host=to_host, ctx=ctx):
                    with torch.inference_mode(), ctx():
                        amap, score = model(prep(u8))
                        to_host(anomaly_map=amap, score=score)

                rows[str(b)] = r = measure(step, dev, b, a)
                log.info("efficientad_latency", model=label, precision=prec, batch=b, p50_ms=round(r["p50_ms"], 3),
                         p99_ms=round(r["p99_ms"], 3), images_per_s=round(r["images_per_s"], 1), iters=r["iters"])
            res["models"][label][prec] = rows
            del model
        res["peak_gpu_memory_bytes"][label] = peak(dev)
        res["gpu_vs_cpu"][label] = ead_diff(base, dev, data["diff"], label)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def ead_diff(base, dev, imgs: list[np.ndarray], label: str) -> dict:
    x = tensors(imgs, EAD_RES, base.input_mean, base.input_std)
    model, to_other, ctx, comparison = other_path(base, dev)
    with torch.inference_mode():
        ref_map, ref_score = base(x)
        with ctx():
            d_map, d_score = (t.float().cpu() for t in model(to_other(x)))
    out = {"comparison": comparison, "precision": "fp32", "images": len(imgs),
           "map_max_abs_diff": float((d_map - ref_map).abs().max()),
           "score_max_abs_diff": float((d_score - ref_score).abs().max()),
           "map_max_abs_value": float(ref_map.abs().max()), "score_max_abs_value": float(ref_score.abs().max())}
    log.info("efficientad_gpu_vs_cpu", model=label, **out)
    return out


def moleflow(dev, a, data_dir: Path, data: dict) -> dict:
    from models.data import list_images
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.train import TrainConfig, train_task

    cfg = MoLEFlowConfig(**MOLE_TINY) if a.tiny else MoLEFlowConfig()
    n_train = 8 if a.tiny else 32
    inet = list_images(data_dir / "imagenet-sample")
    inet_train, inet_test = inet[::7][:n_train], inet[3::11][:a.mole_test // 2]
    tcfg = TrainConfig(epochs=1 if a.tiny else 2, batch_size=4 if a.tiny else 16, progress=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = MoLEFlow(cfg, backbone_weights=data_dir / "weights" / "efficientnet-lite0-57934424.pth")
    fitted, on = {}, {"device": dev} if "device" in inspect.signature(train_task).parameters else {}
    for task, paths in (("bottle", list_images(data_dir / "mvtec" / "bottle" / "train" / "good")[:n_train]),
                        ("imagenet", inet_train)):
        meta = train_task(model, task, paths, tcfg, **on)  # fitted on the device where train_task takes one
        fitted[task] = {"images": meta["n_images"], "epochs": meta["epochs"], "final_loss": meta["final_loss"]}
    model.cpu().eval()  # the CPU reference; the device copy is made from it
    fit_s = time.perf_counter() - t0
    log.info("moleflow_fitted", tasks=list(fitted), seconds=round(fit_s, 1))
    peak(dev, reset=True)
    dmodel, (mean, std), size = device_copy(model, dev), cfg.input_normalization(), cfg.image_size
    frames, prep, to_host = rgb_u8(data["latency"], size), prep_fn(dev, mean, std, torch.float32), host_sink(dev)
    lat, routed_to = {"routed": {}, "forced": {}}, {}
    for b in a.mole_batches:
        u8 = host_batch(frames, b, dev)
        for mode, tasks in (("routed", None), ("forced", ["bottle"] * b)):
            def step(u8=u8, tasks=tasks, key=f"{mode}{b}"):
                with torch.inference_mode():
                    out = dmodel.predict(prep(u8), tasks)
                    to_host(anomaly_map=out["anomaly_map"], score=out["score"])
                routed_to[key] = out["task"]

            lat[mode][str(b)] = r = measure(step, dev, b, a)
            log.info("moleflow_latency", mode=mode, batch=b, ms_per_image_p50=round(r["ms_per_image_p50"], 3),
                     p99_ms=round(r["p99_ms"], 3), iters=r["iters"])
    mem = peak(dev)
    return {"config": cfg.to_dict(), "tasks": fitted, "fit_seconds": fit_s, "fit_device": str(on.get("device", "cpu")),
            "weights": "backbone: EfficientNet-Lite0 ImageNet weights (shared data); flow and adapters fitted here "
                       "in a few epochs (not an accurate model)",
            "train_config": {"epochs": tcfg.epochs, "batch_size": tcfg.batch_size},
            "input": f"uint8 RGB NHWC {size}x{size} (real bottle test images), normalised on the device",
            "timed": "H2D copy + normalise + predict (backbone, router, flow per task) + D2H of anomaly_map, score",
            "batches": list(a.mole_batches), "warmup": a.warmup, "latency": lat,
            "latency_batch_tasks": {k: {t: ts.count(t) for t in sorted(set(ts))} for k, ts in routed_to.items()},
            "peak_gpu_memory_bytes": mem,
            "gpu_vs_cpu": mole_agreement(model, dev, data["mole_bottle"], read_bgr(inet_test), size, mean, std)}


def mole_agreement(model, dev, bottle: list, inet: list, size: int, mean, std) -> dict:
    x, truth = tensors(bottle + inet, size, mean, std), ["bottle"] * len(bottle) + ["imagenet"] * len(inet)
    other, to_other, ctx, comparison = other_path(model, dev)
    ref, got = {"task": [], "anomaly_map": [], "score": []}, {"task": [], "anomaly_map": [], "score": []}
    with torch.inference_mode():
        for s in range(0, len(x), 8):
            with ctx():
                other_out = other.predict(to_other(x[s:s + 8]))
            for acc, out in ((ref, model.predict(x[s:s + 8])), (got, other_out)):
                acc["task"] += out["task"]
                acc["anomaly_map"].append(out["anomaly_map"].float().cpu())
                acc["score"].append(out["score"].float().cpu())
    same = torch.tensor([r == g for r, g in zip(ref["task"], got["task"], strict=True)])

    def diff(k):  # over the images routed to the same task on both devices
        r, g = torch.cat(ref[k])[same], torch.cat(got[k])[same]
        return (float((g - r).abs().max()), float(r.abs().max())) if len(r) else (None, None)

    (md, mv), (sd, _) = diff("anomaly_map"), diff("score")
    out = {"comparison": comparison, "precision": "fp32", "images": len(x),
           "routing_agreement": float(same.float().mean()),
           "routing_correct_cpu": float(np.mean([r == t for r, t in zip(ref["task"], truth, strict=True)])),
           "map_max_abs_diff": md, "score_max_abs_diff": sd, "map_max_abs_value": mv,
           "map_diff_over": "images routed to the same task on both devices"}
    log.info("moleflow_gpu_vs_cpu", **out)
    return out


def targets(res: dict, dev) -> dict:
    ead, mole = res["efficientad"], res["moleflow"]
    s1, m8 = ead["models"]["EfficientAD-S"]["half"].get("1"), mole["latency"]["routed"].get("8")
    worst = max(max(v["map_max_abs_diff"], v["score_max_abs_diff"]) for v in ead["gpu_vs_cpu"].values())
    rows = {"efficientad_s_b1_half_p50_ms": (s1 and s1["p50_ms"], TARGET_EAD_MS, 1),
            "moleflow_routed_b8_ms_per_image": (m8 and m8["ms_per_image_p50"], TARGET_MOLE_MS, 1),
            "efficientad_fp32_max_abs_diff": (worst, TARGET_MAP_DIFF, 1),
            "moleflow_fp32_map_max_abs_diff": (mole["gpu_vs_cpu"]["map_max_abs_diff"], TARGET_MAP_DIFF, 1),
            "moleflow_routing_identical": (mole["gpu_vs_cpu"]["routing_agreement"], 1.0, -1)}  # -1: value >= target
    out: dict = {k: {"value": v, "target": t, "pass": None if v is None else bool(sign * (v - t) <= 0),
                     "device": dev.type} for k, (v, t, sign) in rows.items()}
    notes = []
    if dev.type != "cuda":
        notes.append("measured on cpu (agreement: cpu without oneDNN vs cpu with it): not GPU figures")
    if res["tiny"]:
        notes.append("--tiny: narrowed random models, few iterations; a smoke run, no target is measured")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = res["environment"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, precs in res["efficientad"]["models"].items():
        for prec, rows in precs.items():
            bs = sorted(int(b) for b in rows)
            p50, p99 = [rows[str(b)]["p50_ms"] for b in bs], [rows[str(b)]["p99_ms"] for b in bs]
            name = f"{label} {prec}" + (" (bf16 autocast)" if prec == "half" and env["device"] == "cpu" else "")
            ax1.errorbar(bs, p50, yerr=[[0] * len(bs), [q - p for p, q in zip(p50, p99, strict=True)]], marker="o",
                         capsize=3, label=name)
    ax1.axhline(TARGET_EAD_MS, color="grey", ls=":", label=f"target S b1 half {TARGET_EAD_MS} ms")
    ax1.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per batch (p50, bar to p99)",
            title=f"EfficientAD {EAD_RES}x{EAD_RES}, H2D + D2H included")
    for mode, rows in res["moleflow"]["latency"].items():
        bs = sorted(int(b) for b in rows)
        ax2.plot(bs, [rows[str(b)]["ms_per_image_p50"] for b in bs], marker="o", label=f"MoLE-Flow {mode}")
    ax2.axhline(TARGET_MOLE_MS, color="grey", ls=":", label=f"target routed b8 {TARGET_MOLE_MS} ms/image")
    ax2.set(xscale="log", xlabel="batch", ylabel="ms per image (p50)", title="MoLE-Flow predict, 2 tasks")
    for ax, bs in ((ax1, res["efficientad"]["batches"]), (ax2, res["moleflow"]["batches"])):
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"gpu_check on {env['device']} ({env['gpu_name'] or env['machine']}), torch {env['torch']}, "
                 f"commit {env['commit']}{' [tiny]' if res['tiny'] else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a) -> int:
    from models.serving_device import cuda_problem

    if a.device == "cuda" and (why := cuda_problem()):
        raise UsageError(f"--device cuda but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA: "
                         f"{why}; torch.cuda.is_available() is False (run with --device cpu)")
    from contracts.config import Settings
    from models.data import list_images

    data_dir = Path(Settings().data_dir)
    if (test_dir := bottle_test_dir(data_dir)) is None:
        return 2
    if not (data_dir / "imagenet-sample").is_dir():
        raise UsageError(f"imagenet-sample not found under {data_dir} (set LINEWATCH_DATA_DIR)")
    dev = torch.device(a.device)
    set_fp32_ieee(dev)
    a.iters = a.iters or (2 if a.tiny else 100)
    a.warmup = 1 if a.tiny else max(3, a.iters // 10)
    a.ead_batches = ((1,) if dev.type == "cpu" else (1, 8)) if a.tiny else (1, 8, 32)
    a.mole_batches, a.mole_test = (1, 8), 6 if a.tiny else 120
    t0 = time.perf_counter()
    log.info("gpu_check_start", device=dev.type, tiny=a.tiny, iters=a.iters, warmup=a.warmup)
    data = {"fit": read_bgr(list_images(data_dir / "mvtec" / "bottle" / "train" / "good")[:1 if a.tiny else 8]),
            "latency": read_bgr(spread(test_dir, 8)), "diff": read_bgr(spread(test_dir, 1 if a.tiny else 8)),
            "mole_bottle": read_bgr(spread(test_dir, a.mole_test - a.mole_test // 2))}
    res = {"schema": 1, "tool": PROG, "command": " ".join([PROG, *a.argv]), "tiny": a.tiny,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": environment(dev)}
    if a.tiny:
        res["tiny_reductions"] = (f"{a.iters} timed iterations, {a.warmup} warmup, {a.budget_s} s budget; "
                                  f"EfficientAD batches {list(a.ead_batches)} at {EAD_RES}x{EAD_RES} (the "
                                  f"architecture's fixed input), hidden convolutions {EAD_TINY_DIV}x narrower, "
                                  f"{EAD_TINY_CHANNELS} output channels; MoLE-Flow {MOLE_TINY}; "
                                  f"{a.mole_test} agreement images")
    res["efficientad"] = efficientad(dev, a, data)
    res["moleflow"] = moleflow(dev, a, data_dir, data)
    peaks = [*res["efficientad"]["peak_gpu_memory_bytes"].values(), res["moleflow"]["peak_gpu_memory_bytes"]]
    res["peak_gpu_memory_bytes"] = None if None in peaks else max(peaks)
    res["targets"] = targets(res, dev)
    res["wall_s"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / ("gpu_check" if dev.type == "cuda" else "gpu_check_cpu")
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    plot(res, stem.with_suffix(".png"))
    log.info("gpu_check_done", json=str(stem.with_suffix(".json")), wall_s=round(res["wall_s"], 1),
             **{k: v["pass"] for k, v in res["targets"].items() if isinstance(v, dict)})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and iterations (a 2-core CPU in under a minute)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--iters", type=positive_int, default=None, help="timed iterations per configuration "
                    "(default 100, --tiny 2)")
    ap.add_argument("--budget-s", type=positive_float, default=15.0,
                    help="stop timing one configuration after this many seconds (the timed iterations are recorded)")
    a = ap.parse_args(argv)
    a.argv = argv
    from models.data import DataError

    return run_command(PROG, lambda: run(a), usage=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
