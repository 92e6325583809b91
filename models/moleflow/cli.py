"""``linewatch-models moleflow {train-task,evaluate,export}``.

train-task  add one task (good images only) to a MoLE-Flow store; creates the store (base) on the
            first task, later tasks train only their adapter (base and other adapters untouched).
evaluate    per-task image/pixel AUROC, pixel AP, AUPRO, routing accuracy; with several tasks also the
            accuracy matrix (row i = base + adapters 0..i, i.e. the model right after task i),
            forgetting, BWT and a PNG of the matrix.
export      write a new Triton version of the model from the store (see models/moleflow/export.py).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from contracts.cli import UsageError, positive_int
from contracts.config import Settings

DEVICES = typing.get_args(Settings.model_fields["train_device"].annotation)  # auto, cpu, cuda


def _usage(msg: str) -> UsageError:
    return UsageError(msg)


def _one_line(fn):
    """Artifact / value problems become one-line usage errors (exit 2), not tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        from models.moleflow.store import ArtifactError

        try:
            return fn(args)
        except (ArtifactError, ValueError, KeyError) as exc:
            raise _usage(str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__) from None

    return wrapper


def _weights(args) -> Path | None:
    from models.data import data_root

    if args.backbone_weights:
        p = Path(args.backbone_weights)
        if not p.is_file():
            raise _usage(f"backbone weights not found: {p}")
        return p
    if args.random_backbone:
        return None
    from models.backbones import LITE0_WEIGHTS

    auto = data_root(args.settings) / LITE0_WEIGHTS
    if args.backbone in ("tf_efficientnet_lite0", "efficientnet_lite0") and auto.is_file():
        return auto  # local ImageNet weights (never downloaded)
    raise _usage(f"no weights for backbone {args.backbone}: pass --backbone-weights FILE (or --random-backbone)")


def cmd_train_task(args) -> int:
    import torch

    from models.locks import store_lock
    from models.moleflow.datasets import task_images
    from models.moleflow.model import check_task_name

    try:
        check_task_name(args.task)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    paths = task_images(args.data_dir, args.task)
    if len(paths) < 2:
        raise _usage(f"need at least 2 good images for task {args.task}, found {len(paths)}")
    from models.precision import cli_train_device

    device = cli_train_device(args.device or args.settings.train_device)  # unusable CUDA: one line, exit 1,
    # before the lock creates the store directory (nothing is written for a run that cannot train)
    # one writer at a time (models/locks.py): load the store, take the next adapter index ... save the adapter
    with store_lock(out, what="MoLE-Flow training store"):
        return _train_task_locked(args, out, paths, device)


def _train_task_locked(args, out: Path, paths, device) -> int:
    from models.moleflow.datasets import task_images
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.store import BASE_META, load_model, save_adapter, save_base_if_needed
    from models.moleflow.train import TrainConfig, train_task
    quick = args.quick
    model = None
    if (out / BASE_META).is_file():
        model = load_model(out)
        if args.task in model.tasks:  # idempotent re-runs (demo): an existing task is kept, never retrained
            print(f"task {args.task}: already in {out} (kept; tasks are immutable, use a new name to retrain)")
            return 0
    if model is None:
        cfg = MoLEFlowConfig(backbone=args.backbone, dim=args.dim, grid=args.grid or (14 if quick else 28),
                             subnet_hidden=args.hidden or (128 if quick else 256),
                             lora_rank=args.rank or (32 if quick else 64), seed=args.seed)
        cfg.lora_alpha = float(cfg.lora_rank)
        model = MoLEFlow(cfg, backbone_weights=_weights(args))
    tcfg = TrainConfig(epochs=args.epochs or (10 if quick else 60), lr=args.lr, batch_size=args.batch_size,
                       max_images=args.max_images or (120 if quick else None), seed=args.seed,
                       time_budget_s=args.time_budget_s or (240.0 if quick else None))
    cal = None
    if args.calibration_dir:
        cal = task_images(args.calibration_dir, args.task)
        if not cal:
            raise _usage(f"no images in --calibration-dir {args.calibration_dir}")
    meta = train_task(model, args.task, paths, tcfg, calibration_images=cal, device=device)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_base_if_needed(model, out)
    save_adapter(model, args.task, out, sha, extra={"route_distance_q99": meta["route_distance_q99"],
                                                    "train": {k: v for k, v in meta.items() if k != "losses"}})
    print(f"task {args.task}: {meta['n_images']} images, {meta['epochs']} epochs, {meta['train_seconds']}s, "
          f"threshold={meta['threshold']:.4g} -> {out}")
    return 0


def _test_set(model, task: str, data_dir: str, stride: int = 1):
    import numpy as np
    import torch

    from models.data import MVTecDataset
    from models.moleflow.evaluate import TaskTestSet
    from models.moleflow.train import extract_features, load_images

    S = model.cfg.image_size
    if data_dir == "elpv":
        from models.moleflow.datasets import elpv_split

        _, test = elpv_split()
        test = test[::stride]
        x = load_images([p for p, _ in test], S, *model.cfg.input_normalization())
        p, g = extract_features(model, x, desc=f"{task}: test features")
        return TaskTestSet(task, p, g, [lab for _, lab in test], ["good" if lab == 0 else "defective" for _, lab in test],
                           paths=[str(q) for q, _ in test]), x
    d = Path(data_dir)
    cat = d / task if (d / task / "test").is_dir() else d
    if not (cat / "test").is_dir():
        raise _usage(f"no MVTec test split under {d}")
    mean, std = model.cfg.input_normalization()
    ds = MVTecDataset(cat, "test", S, mean=mean, std=std)
    items = [ds[i] for i in range(0, len(ds), stride)]
    x = torch.stack([it["image"] for it in items])
    p, g = extract_features(model, x, desc=f"{task}: test features")
    return TaskTestSet(task, p, g, [it["label"] for it in items], [it["defect_type"] for it in items],
                       masks=np.stack([it["mask"].numpy() for it in items]), paths=[it["path"] for it in items]), x


def cmd_evaluate(args) -> int:
    import math

    import torch

    from models.data import denormalize
    from models.evaluation import save_heatmap_overlay, write_results_json
    from models.moleflow.evaluate import evaluate_task, forgetting_bwt, save_matrix_png, strip_private
    from models.moleflow.store import list_adapters, load_model

    torch.set_num_threads(args.threads)
    store = Path(args.checkpoint)
    all_tasks = list_adapters(store)
    if not all_tasks:
        raise _usage(f"no MoLE-Flow adapters in {store}")
    pairs = []
    for spec in args.eval:
        task, _, dd = spec.partition("=")
        if task not in all_tasks or not dd:
            raise _usage(f"--eval {spec!r}: expected TASK=DIR with TASK in {all_tasks}")
        pairs.append((task, dd))
    full = load_model(store)
    sets = {t: _test_set(full, t, dd, args.stride) for t, dd in pairs}
    order = [t for t in all_tasks if t in sets]
    matrix, rows = [], []
    for i, _ in enumerate(all_tasks):  # model right after task i = base + adapters[:i+1]
        sub = load_model(store, all_tasks[: i + 1]) if i < len(all_tasks) - 1 else full
        res = {t: evaluate_task(sub, sets[t][0]) for t in order if t in sub.tasks}
        rows.append(res)
        matrix.append([res[t]["routed"]["overall"]["image_auroc"] if t in res else math.nan for t in order])
    final = rows[-1]
    fb = forgetting_bwt(matrix) if len(order) > 1 else {"forgetting": 0.0, "bwt": 0.0}
    out = {"checkpoint": str(store), "tasks": all_tasks, "evaluated": order, "accuracy_matrix_image_auroc": matrix,
           "forgetting": fb, "per_task": strip_private(final)}
    write_results_json(out, args.out)
    if len(order) > 1:
        save_matrix_png(matrix, order, Path(args.out).with_suffix(".png"))
    if args.overlays:
        for t in order:
            ts, x = sets[t]
            o = full.predict_features(ts.patch, ts.image, size=full.cfg.image_size)
            for i in range(len(ts.labels)):
                save_heatmap_overlay(denormalize(x[i], *full.cfg.input_normalization()), o["anomaly_map"][i, 0].numpy(),
                                     Path(args.overlays) / t / f"{ts.defect_types[i]}_{Path(ts.paths[i]).stem}.png",
                                     mask=ts.masks[i] if ts.masks is not None else None, title=o["task"][i])
    for t in order:
        r = final[t]["routed"]["overall"]
        px = f" pixel_auroc={r['pixel_auroc']:.4f} aupro_30={r['aupro_30']:.4f}" if "pixel_auroc" in r else ""
        print(f"{t}: image_auroc={r['image_auroc']:.4f}{px} routing={final[t]['routing_accuracy']:.3f}")
    if len(order) > 1:
        print(f"forgetting={fb['forgetting']:.4f} bwt={fb['bwt']:.4f}")
    return 0


def cmd_export(args) -> int:
    from models.locks import store_lock
    from models.moleflow.export import export_triton

    store = Path(args.checkpoint)
    if not store.is_dir():
        raise _usage(f"MoLE-Flow store not found: {store}")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    with store_lock(store, what="MoLE-Flow training store"):  # a consistent store: no adapter half written
        vdir = export_triton(store, args.repo, args.name, args.version, tasks, args.max_batch_size)
    print(vdir)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("moleflow", help="MoLE-Flow (frozen flow base + one adapter per product task)")
    verbs = g.add_subparsers(dest="verb", metavar="VERB", parser_class=type(g))
    verbs.required = True

    t = verbs.add_parser("train-task", help="train one new task adapter from good images")
    t.add_argument("--data-dir", required=True,
                   help="MVTec root (<dir>/<task>/train/good), category dir, image folder, or 'elpv'")
    t.add_argument("--task", required=True)
    t.add_argument("--calibration-dir", help="held-out good images that set the task's threshold "
                   "(default: 10%% of the training images are held out)")
    t.add_argument("--out", required=True, help="store dir (created on the first task, extended afterwards)")
    t.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (new store only)")
    t.add_argument("--backbone-weights", default=None, help="local weights file (default: shared Lite0 weights)")
    t.add_argument("--random-backbone", action="store_true", help="random backbone weights (tests)")
    t.add_argument("--dim", type=positive_int, default=None,
                   help="D (default: the backbone's channels, no channel pooling; new store only)")
    t.add_argument("--grid", type=int, choices=[14, 28], default=None,
                   help="patch grid, new store only (default 28, the stride-8 resolution; 14 with --quick)")
    t.add_argument("--hidden", type=positive_int, default=None, help="coupling subnet width (default 256; 128 --quick)")
    t.add_argument("--rank", type=positive_int, default=None)
    t.add_argument("--epochs", type=positive_int, default=None, help="default 60 (10 with --quick)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--max-images", type=positive_int, default=None)
    t.add_argument("--time-budget-s", type=float, default=None, help="cap training time (fewer epochs)")
    t.add_argument("--quick", action="store_true", help="short CPU schedule: grid 14, hidden 128, r=32, 10 epochs, <=120 images")
    t.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: no OpenMP stalls on shared cores)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=DEVICES, default=None,
                   help="training device (default: settings train_device / LINEWATCH_TRAIN_DEVICE, 'auto': CUDA "
                        "when torch sees it; the flow trains in FP32 everywhere)")
    t.set_defaults(func=_one_line(cmd_train_task))

    e = verbs.add_parser("evaluate", help="per-task metrics, accuracy matrix, forgetting, routing")
    e.add_argument("--checkpoint", required=True, help="store dir")
    e.add_argument("--eval", action="append", required=True, metavar="TASK=DIR",
                   help="test data per task: MVTec root/category dir, or 'elpv' (repeatable)")
    e.add_argument("--out", required=True, help="results JSON (matrix PNG written beside it)")
    e.add_argument("--overlays", default=None, help="folder for heat-map overlay PNGs")
    e.add_argument("--stride", type=positive_int, default=1, help="use every n-th test image")
    e.add_argument("--threads", type=positive_int, default=2)
    e.set_defaults(func=_one_line(cmd_evaluate))

    x = verbs.add_parser("export", help="write a new Triton model version from the store")
    x.add_argument("--checkpoint", required=True, help="store dir")
    x.add_argument("--repo", "--repository", dest="repo", required=True)
    x.add_argument("--name", default="moleflow")
    x.add_argument("--version", type=positive_int, default=None)
    x.add_argument("--tasks", default=None, help="comma-separated subset (default: all adapters)")
    x.add_argument("--max-batch-size", type=positive_int, default=8)
    x.set_defaults(func=_one_line(cmd_export))
