"""Multi-product accuracy: EfficientAD per product and MoLE-Flow as one continual sequence.

Products: every real inspection set available here. MVTec AD ``bottle`` (pixel masks), ELPV solar
``cells`` (PyPI wheel ``elpv-dataset``, image-level labels: good = probability 0, defective >= 0.5) and
MVTec AD ``screw`` (image labels only). Per product: image AUROC, pixel AUROC, AUPRO@30%, pixel AP
(where masks exist), and at the released operating point (models/operating_point.py: the threshold for
the target false-alarm rate, chosen on held-out good training images, recall estimated on synthetic
CutPaste + colour defects) the test set's recall and false-alarm rate, the share of defective test
images with a box at IoU >= 0.3 with a ground-truth region's box (masks) and the share of good test
images with no box; MoLE-Flow routing accuracy, forgetting, bit-identity of earlier tasks, wall time
and CPU ms/image (1 torch thread, batch 1, eager). Schedules, early stopping and thresholds use held-out
good images and synthetic anomalies only; each test set is scored once, at the end.

    .venv/bin/python benchmarks/accuracy.py                       # both detectors, generic teacher
    .venv/bin/python benchmarks/accuracy.py --detectors efficientad --teacher-kind pdn
    .venv/bin/python benchmarks/accuracy.py --detectors moleflow --moleflow-grid 28 --tag _grid28

Writes benchmarks/results/accuracy<tag>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_state  # noqa: E402
from contracts.config import Settings  # noqa: E402
from models.backbones import LITE0_WEIGHTS  # noqa: E402
from models.data import (  # noqa: E402
    data_root,
    list_images,
    load_image,
    load_mask,
    mvtec_category_dir,
    mvtec_samples,
    normalize,
    split_train_val,
)
from models.evaluation import evaluate, write_results_json  # noqa: E402
from models.moleflow.datasets import elpv_split  # noqa: E402

SETTINGS = Settings()  # this script's entry point settings (data_dir)
WEIGHTS = data_root(SETTINGS) / LITE0_WEIGHTS


@dataclass
class Product:
    name: str
    train: list[Path]
    test: list[Path]
    labels: list[int]
    defect_types: list[str]
    mask_paths: list[Path | None] | None  # None: image-level labels only


def products(elpv_train: int, elpv_test: int) -> list[Product]:
    bottle = mvtec_category_dir("bottle", data_root(SETTINGS))
    samples = mvtec_samples(bottle, "test")
    screw = mvtec_category_dir("screw", data_root(SETTINGS))
    s_samples = mvtec_samples(screw, "test")
    e_train, e_test = elpv_split(elpv_train, elpv_test, elpv_test)
    return [
        Product("bottle", list_images(bottle / "train" / "good"), [s.path for s in samples], [s.label for s in samples],
                [s.defect_type for s in samples], [s.mask_path for s in samples]),
        Product("cells", e_train, [p for p, _ in e_test], [lab for _, lab in e_test],
                ["good" if lab == 0 else "defective" for _, lab in e_test], None),
        Product("screw", list_images(screw / "train" / "good"), [s.path for s in s_samples],
                [s.label for s in s_samples], [s.defect_type for s in s_samples], None),
    ]


def masks_for(p: Product, size: int) -> np.ndarray | None:
    return None if p.mask_paths is None else np.stack([load_mask(m, size) for m in p.mask_paths])


def cpu_ms_per_image(fn, xs: torch.Tensor) -> float:
    torch.set_num_threads(1)
    fn(xs[:1])
    t = time.perf_counter()
    for i in range(len(xs)):
        fn(xs[i:i + 1])
    return (time.perf_counter() - t) * 1000 / len(xs)


def summarize(res: dict) -> dict:
    o = res["overall"]
    return {k: o.get(k) for k in ("image_auroc", "pixel_auroc", "aupro_30", "pixel_ap")}


# ---------------------------------------------------------------- operating point
def bgr(paths: list[Path]) -> list[np.ndarray]:
    import cv2

    return [cv2.imread(str(q), cv2.IMREAD_COLOR) for q in paths]


def as_batch(imgs: list[np.ndarray], size: int, mean, std) -> torch.Tensor:
    """BGR uint8 images -> the normalised [N, 3, size, size] batch a detector scores (INTER_AREA resize, RGB)."""
    import cv2

    return torch.stack([normalize(cv2.cvtColor(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA),
                                               cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0, mean, std) for im in imgs])


def at_operating_point(op: dict, scores: np.ndarray, maps: np.ndarray, p: Product, size: int) -> dict:
    """Test-set figures at the released operating point (reported, never used to choose it)."""
    from contracts.operating_point import anomaly_boxes, prepare_map
    from models.evaluation import box_hits

    y = np.asarray(p.labels)
    flagged = np.asarray(scores) > op["threshold"]
    boxes = [anomaly_boxes(prepare_map(m, (size, size), op["map_sigma"], op["map_border"]), op["map_threshold"],
                           force=True) if f else [] for m, f in zip(maps, flagged, strict=True)]
    out = {"threshold": op["threshold"], "recall_at_threshold": float(flagged[y == 1].mean()),
           "false_alarm_rate": float(flagged[y == 0].mean()), "good_box_free_rate": float(np.mean([not b for b, lab in zip(boxes, y, strict=True) if lab == 0])),
           "n_good": int((y == 0).sum()), "n_defective": int((y == 1).sum()),
           "released": {k: op[k] for k in ("target_false_alarm_rate", "estimated_false_alarm_rate", "estimated_recall",
                                           "estimated_recall_by_family", "n_good", "n_synthetic", "method")}}
    if p.mask_paths is not None:
        masks = masks_for(p, size)
        hits = [box_hits(b, m) for b, m, lab in zip(boxes, masks, y, strict=True) if lab == 1]
        out["box_hit_rate"] = float(np.mean(hits))
    return out


# ---------------------------------------------------------------- EfficientAD
def run_efficientad(prods: list[Product], args) -> dict:
    from models.efficientad.model import DEFAULT_TEACHER
    from models.efficientad.train import TrainConfig, predict, train_efficientad
    from models.operating_point import choose_operating_point

    out = {}
    for p in prods:
        torch.set_num_threads(args.threads)
        fit, hold = split_train_val(sorted(p.train), args.holdout, 0)
        t0 = time.time()
        cfg = TrainConfig(steps=args.efficientad_steps, lr=args.efficientad_lr, seed=0,
                          max_train_seconds=args.efficientad_seconds, select_every=args.select_every,
                          amp_bf16=args.amp_bf16, backbone_weights=str(WEIGHTS),
                          teacher_kind=args.teacher_kind, student_crop=args.efficientad_student_crop,
                          penalty_dir=str(data_root(SETTINGS) / "imagenet-sample") if args.penalty else None)
        model, meta = train_efficientad(fit, cfg, teacher_weights=DEFAULT_TEACHER if args.teacher_kind == "pdn" else None)
        train_s = time.time() - t0

        def score(imgs, m=model):
            maps, scores = predict(m, as_batch(imgs, 256, m.input_mean, m.input_std))
            return scores.numpy().reshape(-1), maps[:, 0].numpy()

        op = choose_operating_point(score, bgr(hold), (256, 256), target_false_alarm_rate=args.target_false_alarm_rate)
        scores, maps = score(bgr(p.test))
        res = evaluate(scores, p.labels, p.defect_types, maps=maps, masks=masks_for(p, 256))
        x = torch.stack([normalize(load_image(q, 256), model.input_mean, model.input_std) for q in p.test[:8]])
        out[p.name] = {"metrics": summarize(res), "per_defect": {k: v.get("image_auroc") for k, v in res["per_defect"].items()},
                       "operating_point": at_operating_point(op, scores, maps, p, 256),
                       "steps_done": meta["steps_done"], "selected_step": meta["selected_step"],
                       "selection_synthetic_auroc": meta["selection"], "train_seconds": round(train_s, 1),
                       "cpu_ms_per_image": cpu_ms_per_image(lambda b, m=model: predict(m, b), x),
                       "n_train": len(fit), "n_holdout": len(hold), "n_test": len(p.test)}
        print(f"efficientad {p.name}: {out[p.name]['metrics']} {out[p.name]['operating_point']} "
              f"steps={meta['steps_done']} {train_s:.0f}s", flush=True)
    teacher_desc = (f"generic PDN teacher {DEFAULT_TEACHER.name} (distilled over imagenet-sample)"
                    if args.teacher_kind == "pdn" else f"frozen tf_efficientnet_lite0 teacher ({args.teacher_kind})")
    return {"teacher": teacher_desc, "teacher_kind": args.teacher_kind,
            "teacher_sha256": _sha(DEFAULT_TEACHER) if args.teacher_kind == "pdn" else None,
            "schedule": {"steps": args.efficientad_steps, "seconds": args.efficientad_seconds, "lr": args.efficientad_lr,
                         "amp_bf16": args.amp_bf16, "student_crop": args.efficientad_student_crop,
                         "select_every": args.select_every, "penalty": args.penalty},
            "per_product": out, "mean": _mean([v["metrics"] for v in out.values()])}


# ---------------------------------------------------------------- MoLE-Flow
def run_moleflow(prods: list[Product], args) -> dict:
    from models.moleflow.evaluate import TaskTestSet, evaluate_task, forgetting_bwt, predict_set
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.train import TrainConfig, extract_features, load_images, train_task
    from models.operating_point import choose_operating_point

    torch.set_num_threads(args.threads)
    cfg = MoLEFlowConfig(grid=args.moleflow_grid, dim=args.moleflow_dim, subnet_hidden=args.moleflow_hidden,
                         lora_rank=args.moleflow_rank, lora_alpha=float(args.moleflow_rank))
    model = MoLEFlow(cfg, backbone_weights=WEIGHTS)
    S = cfg.image_size
    norm = cfg.input_normalization()
    sets, feats, held = [], [], []
    t0 = time.time()
    for p in prods:
        fit, hold = split_train_val(sorted(p.train), args.holdout, 0)
        feats.append((fit, extract_features(model, fit, desc=f"{p.name} train")))
        held.append((hold, synthetic_set(model, p.name, hold, norm)))
        x = load_images(p.test, S, *norm)
        pt, it = extract_features(model, x, desc=f"{p.name} test")
        sets.append(TaskTestSet(p.name, pt, it, p.labels, p.defect_types, masks=masks_for(p, S)))
    feat_s = time.time() - t0
    tcfg = TrainConfig(epochs=args.moleflow_epochs, progress=False, time_budget_s=args.moleflow_seconds)
    matrix, metas, before, ops = [], [], {}, {}
    final = {}
    for i, p in enumerate(prods):
        metas.append(train_task(model, p.name, feats[i][0], tcfg, features=feats[i][1], calibration_images=held[i][0]))

        def score(imgs, t=p.name):
            o = model.predict(as_batch(imgs, S, *norm), [t] * len(imgs), calibrated=True)
            return o["score"].numpy(), o["anomaly_map"][:, 0].numpy()

        ops[p.name] = choose_operating_point(score, bgr(held[i][0]), (S, S),
                                             target_false_alarm_rate=args.target_false_alarm_rate)
        final = {ts.task: evaluate_task(model, ts) for ts in sets[: i + 1]}
        matrix.append([final[ts.task]["routed"]["overall"]["image_auroc"] if j <= i else float("nan")
                       for j, ts in enumerate(sets)])
        before[p.name] = model.predict_features(sets[i].patch, sets[i].image, [p.name] * len(sets[i].labels))["score"]
    identical = {t: bool(torch.equal(model.predict_features(ts.patch, ts.image, [t] * len(ts.labels))["score"], before[t]))
                 for t, ts in ((ts.task, ts) for ts in sets)}
    fb = forgetting_bwt(matrix)
    at_op = {}
    for p, ts in zip(prods, sets, strict=True):  # routed, calibrated: what the served model returns
        r = predict_set(model, ts, oracle=False)
        thr = torch.tensor([model.thresholds[t]["threshold"] for t in r["tasks"]]).numpy()
        # image-label products: boxes only matter for good frames, and a flagged frame always gets one
        maps = r["maps"] if p.mask_paths is not None else np.zeros((len(ts.labels), 8, 8), np.float32)
        mthr = np.array([model.thresholds[t]["map_threshold"] for t in r["tasks"]])[:, None, None]
        at_op[p.name] = at_operating_point(ops[p.name], r["scores"] - thr, maps - mthr, p, S)
    x = load_images(prods[0].test[:4] + prods[-1].test[:4], S, *norm)
    per = {t: {"metrics": summarize(r["routed"]), "oracle": summarize(r["oracle"]), "routing_accuracy": r["routing_accuracy"],
               "per_defect": {k: v.get("image_auroc") for k, v in r["routed"]["per_defect"].items()},
               "operating_point": at_op[t],
               "held_out_cutpaste_image_auroc": evaluate_task(model, held[k][1])["oracle"]["overall"]["image_auroc"]}
           for k, (t, r) in enumerate(final.items())}
    return {"config": cfg.to_dict(), "train_config": metas[0]["train_config"],
            "accuracy_matrix_image_auroc": matrix, "forgetting": fb["forgetting"], "bwt": fb["bwt"],
            "earlier_tasks_bit_identical": identical,
            "routing_accuracy": float(np.mean([r["routing_accuracy"] for r in final.values()])),
            "per_product": per, "mean": _mean([v["metrics"] for v in per.values()]),
            "epochs": {m["task"]: m["epochs"] for m in metas},
            "train_seconds": {m["task"]: m["train_seconds"] for m in metas}, "feature_seconds": round(feat_s, 1),
            "cpu_ms_per_image": cpu_ms_per_image(lambda b: model.predict(b), x)}


def synthetic_set(model, task: str, good: list[Path], norm):
    """Held-out good images of ``task`` and their CutPaste copies as a labelled selection set."""
    import random

    from models.moleflow.evaluate import TaskTestSet
    from models.moleflow.train import extract_features
    from models.synthetic import cut_paste

    rng = random.Random(1)
    S = model.cfg.image_size
    raw = [load_image(q, S) for q in good]
    imgs = raw + [cut_paste(im, rng)[0] for im in raw]
    x = torch.stack([normalize(im, *norm) for im in imgs])
    pt, it = extract_features(model, x, progress=False)
    return TaskTestSet(task, pt, it, [0] * len(raw) + [1] * len(raw), ["good"] * len(raw) + ["cutpaste"] * len(raw))


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and np.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _sha(path: Path) -> str | None:
    from models.artifacts import sha256_file

    return sha256_file(path) if path.is_file() else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["image_auroc", "pixel_auroc", "aupro_30", "pixel_ap"]
    dets = [d for d in ("efficientad", "moleflow") if d in result]
    fig, axes = plt.subplots(1, max(1, len(dets)), figsize=(6 * max(1, len(dets)), 4), squeeze=False)
    for ax, d in zip(axes[0], dets, strict=False):
        per = result[d]["per_product"]
        names = list(per)
        w = 0.8 / len(metrics)
        for k, m in enumerate(metrics):
            vals = [per[n]["metrics"].get(m) or 0.0 for n in names]
            ax.bar(np.arange(len(names)) + k * w, vals, w, label=m)
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
        ax.set_ylim(0, 1.05)
        ax.set_title(d)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"linewatch accuracy ({result['commit']}, {result['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", nargs="+", choices=["efficientad", "moleflow"], default=["efficientad", "moleflow"])
    from models.efficientad.cli import DEFAULT_TEACHER_KIND
    from models.efficientad.model import TEACHER_KINDS

    ap.add_argument("--teacher-kind", choices=TEACHER_KINDS, default=DEFAULT_TEACHER_KIND,
                    help="EfficientAD teacher (default: the CLI's, what onboarding trains)")
    ap.add_argument("--efficientad-steps", type=int, default=70_000)
    ap.add_argument("--efficientad-seconds", type=float, default=600.0,
                    help="wall budget per product (default: the training job's CPU budget, train_budget_cpu_s)")
    ap.add_argument("--efficientad-lr", type=float, default=1e-4)
    ap.add_argument("--efficientad-student-crop", type=int, default=0,
                    help="TrainConfig.student_crop: the student's passes on a random N px window per step (0: whole images)")
    ap.add_argument("--select-every", type=int, default=0, help="CutPaste selection every N steps (0: off, the CLI default)")
    ap.add_argument("--amp-bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast in the EfficientAD step loop (default: only where the CPU has native bf16)")
    ap.add_argument("--products", nargs="+", choices=["bottle", "cells", "screw"], default=["bottle", "cells", "screw"])
    ap.add_argument("--target-false-alarm-rate", type=float, default=SETTINGS.target_false_alarm_rate)
    ap.add_argument("--holdout", type=float, default=0.25, help="held-out good training images for the operating point")
    ap.add_argument("--penalty", action=argparse.BooleanOptionalAction, default=True,
                    help="pretraining penalty on the ImageNet sample")
    ap.add_argument("--moleflow-grid", type=int, choices=[14, 28], default=28)
    ap.add_argument("--moleflow-dim", type=int, default=None, help="default: backbone channels (152)")
    # defaults: what `linewatch onboard` ships on a CPU (train-task defaults under the job's 600 s budget)
    ap.add_argument("--moleflow-hidden", type=int, default=256)
    ap.add_argument("--moleflow-rank", type=int, default=64)
    ap.add_argument("--moleflow-epochs", type=int, default=60)
    ap.add_argument("--moleflow-seconds", type=float, default=600.0, help="wall budget per task (fewer epochs to fit)")
    ap.add_argument("--elpv-train", type=int, default=150)
    ap.add_argument("--elpv-test", type=int, default=60, help="good and defective cells each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="run the detectors in parallel processes (one core each)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.amp_bf16 is None:
        from models.precision import native_bf16

        args.amp_bf16 = native_bf16()
    t0 = time.time()
    prods = [p for p in products(args.elpv_train, args.elpv_test) if p.name in args.products]
    result: dict = {**git_state(), "command": " ".join(["benchmarks/accuracy.py", *(argv or sys.argv[1:])]),
                    "machine": {"cpu": _cpu_model(), "threads": args.threads,
                                "note": "2 shared CPU cores, no GPU"},
                    "weights": {"backbone": str(WEIGHTS), "backbone_sha256": _sha(WEIGHTS)},
                    "data": {p.name: {"train": len(p.train), "test": len(p.test), "masks": p.mask_paths is not None}
                             for p in prods}}
    runners = {"efficientad": run_efficientad, "moleflow": run_moleflow}
    if len(args.detectors) > 1 and args.parallel:  # one process per detector, 1 torch thread each
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(args.detectors)) as pool:
            futs = {d: pool.submit(runners[d], prods, args) for d in args.detectors}
            result.update({d: f.result() for d, f in futs.items()})
    else:
        result.update({d: runners[d](prods, args) for d in args.detectors})
    result["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(args.out_dir) / f"accuracy{args.tag}.json"
    write_results_json(result, out)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({d: result[d]["mean"] for d in ("efficientad", "moleflow") if d in result}), f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
