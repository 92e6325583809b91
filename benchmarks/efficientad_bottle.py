"""EfficientAD on MVTec AD bottle: teacher (distil or load) -> train -> evaluate -> CPU latency.

Writes benchmarks/results/efficientad_bottle.json + efficientad_bottle.png (+ a few overlays).
Usage:
  .venv/bin/python benchmarks/efficientad_bottle.py [--teacher FILE | --distill-steps N]
      [--train-steps N] [--lr X] [--triton-url HOST:PORT] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import MVTecDataset, data_root, denormalize, list_images, mvtec_category_dir, mvtec_samples  # noqa: E402
from models.efficientad.distill import distill_teacher  # noqa: E402
from models.efficientad.export import export_triton, trace_model  # noqa: E402
from models.efficientad.train import TrainConfig, predict, train_efficientad  # noqa: E402
from models.evaluation import evaluate, save_heatmap_overlay, write_results_json  # noqa: E402
from stream.logs import get_logger  # noqa: E402

log = get_logger("benchmarks.efficientad_bottle")


def latency_ms(fn, xs, warmup=2):
    for x in xs[:warmup]:
        fn(x)
    out = []
    for x in xs:
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000)
    return {"mean_ms": float(np.mean(out)), "p50_ms": float(np.median(out)), "p95_ms": float(np.percentile(out, 95)),
            "n": len(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--teacher", help="teacher weights file (skip distillation)")
    ap.add_argument("--backbone-weights", default=str(data_root() / "weights" / "efficientnet-lite0-57934424.pth"))
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-seconds", type=float, help="wall-clock budget for the training loop")
    ap.add_argument("--aug-variants", type=int, default=1)
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--triton-url")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    cat_dir = mvtec_category_dir(args.category)
    good_dir = cat_dir / "train" / "good"
    t_all = time.time()
    result: dict = {"category": args.category, "args": vars(args),
                    "hardware": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                                 "threads_train": torch.get_num_threads(), "gpu": False}}
    # 1) teacher
    if args.teacher:
        teacher_path = Path(args.teacher)
        ck = torch.load(str(teacher_path), map_location="cpu", weights_only=True)
        distill_meta = ck.get("meta") if isinstance(ck, dict) else None  # our distill-teacher files carry it
        result["teacher"] = {"source": "file", "path": str(teacher_path), "distill_meta": distill_meta}
    else:
        teacher_path = out / f"efficientad_{args.category}_teacher.pth"
        meta = distill_teacher(good_dir, teacher_path, "efficientnet_lite0", args.backbone_weights,
                               steps=args.distill_steps, batch_size=args.distill_batch, lr=args.lr, seed=args.seed)
        result["teacher"] = {"source": "distilled", **meta}
    # 2) train
    cfg = TrainConfig(steps=args.train_steps, lr=args.lr, aug_variants=args.aug_variants, seed=args.seed,
                      max_train_seconds=args.train_seconds)
    model, tmeta = train_efficientad(list_images(good_dir), cfg, teacher_weights=teacher_path)
    result["train"] = {k: v for k, v in tmeta.items() if k not in ("val_paths",)}
    # 3) evaluate on test
    t = time.time()
    ds = MVTecDataset(cat_dir, "test", 256)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    masks = np.stack([ds[i]["mask"].numpy() for i in range(len(ds))])
    maps, scores = predict(model, images)
    maps_np, scores_np = maps[:, 0].numpy(), scores.numpy()
    samples = mvtec_samples(cat_dir, "test")
    labels = [s.label for s in samples]
    types = [s.defect_type for s in samples]
    result["metrics"] = evaluate(scores_np, labels, types, maps=maps_np, masks=masks, threshold=tmeta["threshold"])
    result["metrics"]["eval_resolution"] = "256x256 (masks nearest-resized)"
    result["eval_seconds"] = time.time() - t
    vmax = float(np.percentile(maps_np, 99.9))
    for d in sorted(set(types)):
        i = types.index(d)
        save_heatmap_overlay(denormalize(images[i]), maps_np[i], out / f"efficientad_{args.category}_overlay_{d}.png",
                             vmin=0.0, vmax=vmax, mask=masks[i], title=f"{d} score={scores_np[i]:.3f}")
    # 4) latency, batch 1, 1 torch thread (the serving setting)
    torch.set_num_threads(1)
    xs = [images[i : i + 1] for i in range(min(args.latency_images, len(images)))]
    traced = trace_model(model)
    with torch.inference_mode():
        lat = {"eager": latency_ms(lambda x: model(x), xs), "torchscript": latency_ms(lambda x: traced(x), xs)}
        a1, s1 = model(images[:4])
        a2, s2 = traced(images[:4])
    result["export_max_abs_diff"] = {"map": float((a1 - a2).abs().max()), "score": float((s1 - s2).abs().max())}
    if args.triton_url:
        import tritonclient.grpc as grpcclient

        vdir = export_triton(model, out / "triton_repo", args.category, threshold=tmeta["threshold"])
        lat["triton_export_dir"] = str(vdir)
        client = grpcclient.InferenceServerClient(args.triton_url)
        client.load_model(f"efficientad_{args.category}")

        def infer(x):
            inp = grpcclient.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x.numpy())
            return client.infer(f"efficientad_{args.category}", [inp])

        lat["triton_grpc"] = latency_ms(infer, xs)
    result["latency_cpu_batch1_1thread"] = lat
    result["total_seconds"] = time.time() - t_all
    write_results_json(result, out / f"efficientad_{args.category}.json")
    # 5) plot: score distribution per defect type + latency bars
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for d in sorted(set(types)):
        axes[0].hist(scores_np[np.asarray(types) == d], bins=20, alpha=0.5, label=d)
    axes[0].axvline(tmeta["threshold"], color="k", ls="--", label="threshold")
    m = result["metrics"]["overall"]
    axes[0].set_title(f"{args.category}: img AUROC {m['image_auroc']:.3f}, AUPRO30 {m['aupro_30']:.3f}")
    axes[0].set_xlabel("image score")
    axes[0].legend(fontsize=7)
    names = [k for k in ("eager", "torchscript", "triton_grpc") if k in lat]
    axes[1].bar(names, [lat[k]["mean_ms"] for k in names])
    axes[1].set_ylabel("ms / image (CPU, batch 1, 1 thread)")
    axes[1].set_title("latency")
    fig.tight_layout()
    fig.savefig(out / f"efficientad_{args.category}.png", dpi=100)
    log.info("benchmark_done", **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro_30")},
             seconds=round(result["total_seconds"], 1))
    print(f"image AUROC {m['image_auroc']:.4f}  pixel AUROC {m['pixel_auroc']:.4f}  AUPRO30 {m['aupro_30']:.4f}  "
          f"total {result['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
