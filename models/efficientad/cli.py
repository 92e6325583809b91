"""``linewatch-models efficientad {train,evaluate,export,distill-teacher}``."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from contracts.cli import UsageError, positive_int
from contracts.config import Settings

DEFAULT_TEACHER_KIND = "lite0-features"
DEVICES = typing.get_args(Settings.model_fields["train_device"].annotation)  # auto, cpu, cuda


def _usage(msg: str) -> UsageError:
    return UsageError(msg)


def _dir(p: str, what: str) -> Path:
    path = Path(p)
    if not path.is_dir():
        raise _usage(f"{what} not found: {path}")
    return path


def _file(p: str | None, what: str) -> Path | None:
    if p is None:
        return None
    path = Path(p)
    if not path.is_file():
        raise _usage(f"{what} not found: {path}")
    return path


def _device(args):
    """``--device`` or else ``settings.train_device``; CUDA asked for but unusable: one line, exit 1."""
    from models.precision import cli_train_device

    return cli_train_device(args.device or args.settings.train_device)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="training device (default: settings train_device / LINEWATCH_TRAIN_DEVICE, 'auto': CUDA "
                        "when torch sees it, with bf16 autocast there)")


def cmd_train(args) -> int:
    from models.backbones import LITE0_WEIGHTS
    from models.data import data_root, list_images
    from models.efficientad.model import DEFAULT_TEACHER, save_checkpoint
    from models.efficientad.train import TrainConfig, train_efficientad

    good = _dir(args.train_dir, "training image folder")
    pdn_given = bool(args.teacher or args.random_teacher)
    kind = args.teacher_kind or ("pdn" if pdn_given else DEFAULT_TEACHER_KIND)
    lite0 = kind == "lite0-features"
    if lite0 and pdn_given:
        raise _usage("--teacher/--random-teacher are PDN teachers; --teacher-kind lite0-features uses --backbone-weights")
    teacher = None if args.random_teacher or lite0 else _file(args.teacher or str(DEFAULT_TEACHER), "teacher weights")
    backbone = _file(args.backbone_weights or str(data_root(args.settings) / LITE0_WEIGHTS), "backbone weights") if lite0 else None
    paths = list_images(good)
    if len(paths) < 2:
        raise _usage(f"need at least 2 images in {good}")
    bad = list_images(_dir(args.anomalous_val_dir, "anomalous validation folder")) if args.anomalous_val_dir else None
    if args.penalty_dir:
        _dir(args.penalty_dir, "penalty image folder")
    device = _device(args)
    cfg = TrainConfig(model_size=args.model_size, teacher_kind=kind,
                      backbone_weights=str(backbone) if backbone else None, steps=args.steps, lr=args.lr, seed=args.seed,
                      penalty_dir=args.penalty_dir, select_every=args.select_every,
                      max_train_images=args.max_train_images, max_train_seconds=args.max_seconds,
                      amp_bf16=args.amp_bf16, require_sha256=args.settings.require_sha256)
    model, meta = train_efficientad(paths, cfg, teacher_weights=teacher, anomalous_val_paths=bad, device=device)
    save_checkpoint(model, args.out, meta)
    print(f"saved {args.out} threshold={meta['threshold']:.6g}")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np
    import torch

    from models.data import MVTecDataset, denormalize, mvtec_samples
    from models.efficientad.model import load_checkpoint
    from models.efficientad.train import predict
    from models.evaluation import evaluate, save_heatmap_overlay, write_results_json

    ck = _file(args.checkpoint, "checkpoint")
    cat = _dir(args.mvtec_dir, "MVTec category folder")
    samples = mvtec_samples(cat, "test")
    model, meta = load_checkpoint(ck, require_sha256=args.settings.require_sha256)
    ds = MVTecDataset(cat, "test", 256, samples=samples, mean=model.input_mean, std=model.input_std)
    items = [ds[i] for i in range(len(ds))]
    maps, scores = predict(model, torch.stack([it["image"] for it in items]))
    masks = np.stack([it["mask"].numpy() for it in items])
    res = evaluate(scores.numpy(), [s.label for s in samples], [s.defect_type for s in samples],
                   maps=maps[:, 0].numpy(), masks=masks, threshold=meta.get("threshold"))
    write_results_json({"checkpoint": str(ck), "metrics": res}, args.out)
    if args.overlays:
        for i, it in enumerate(items):
            save_heatmap_overlay(denormalize(it["image"], model.input_mean, model.input_std), maps[i, 0].numpy(),
                                 Path(args.overlays) / f"{samples[i].defect_type}_{samples[i].path.stem}.png",
                                 vmin=0.0, mask=masks[i])
    o = res["overall"]
    print(f"image_auroc={o['image_auroc']:.4f} pixel_auroc={o['pixel_auroc']:.4f} aupro_30={o['aupro_30']:.4f}")
    return 0


def cmd_export(args) -> int:
    from models.efficientad.detector import DETECTOR

    vdir = DETECTOR.export(_file(args.checkpoint, "checkpoint"), Path(args.repository),
                           DETECTOR.info.model_name(args.product), version=args.version,
                           max_batch_size=args.max_batch_size, require_sha256=args.settings.require_sha256)
    print(vdir)
    return 0


def cmd_distill(args) -> int:
    from models.efficientad.distill import DistillConfig, distill_teacher

    folder = _dir(args.image_dir, "image folder")
    weights = _file(args.backbone_weights, "backbone weights")
    device = _device(args)
    cfg = DistillConfig(backbone=args.backbone, backbone_weights=str(weights) if weights else None,
                        out_indices=tuple(args.out_indices), model_size=args.model_size, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, max_images=args.max_images, seed=args.seed,
                        max_seconds=args.max_seconds, amp_bf16=args.amp_bf16)
    meta = distill_teacher(folder, args.out, cfg, device=device)
    state = "complete" if meta["complete"] else f"paused at step {meta['steps_done']} (rerun to resume)"
    print(f"saved {args.out} {state} held_out_loss={meta['held_out_loss']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("efficientad", help="EfficientAD (one model per product)")
    verbs = g.add_subparsers(dest="verb", metavar="VERB", parser_class=type(g))
    verbs.required = True

    t = verbs.add_parser("train", help="train student + autoencoder on good images")
    t.add_argument("--train-dir", required=True, help="folder of good images (e.g. <mvtec>/bottle/train/good)")
    t.add_argument("--teacher", help="PDN teacher weights (official teacher_small.pth layout or distill-teacher "
                   "output; implies --teacher-kind pdn; default for pdn: the generic teacher shipped with the package)")
    t.add_argument("--random-teacher", action="store_true", help="random teacher (smoke tests only)")
    t.add_argument("--teacher-kind", choices=["pdn", "lite0-features"], default=None,
                   help=f"lite0-features: the frozen EfficientNet-Lite0 stages 2+3 as the teacher; pdn: a distilled "
                        f"PDN teacher file (default: {DEFAULT_TEACHER_KIND}, the better on held-out CutPaste "
                        f"anomalies in benchmarks/accuracy.py)")
    t.add_argument("--backbone-weights", help="EfficientNet-Lite0 weights for lite0-features "
                                              "(default: <data>/weights/efficientnet-lite0-57934424.pth)")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--model-size", choices=["small", "medium"], default="small")
    t.add_argument("--steps", type=positive_int, default=70_000)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-train-images", type=positive_int)
    t.add_argument("--max-seconds", type=float, help="wall budget of the step loop (LR drop at 95%% of it); CPU schedules")
    t.add_argument("--amp-bf16", action="store_true", help="bf16 autocast on the CPU (only worth it on CPUs with "
                                                            "native bf16; always on with CUDA)")
    _add_device(t)
    t.add_argument("--select-every", type=int, default=0,
                   help="every N steps score held-out good + CutPaste images and keep the best state")
    t.add_argument("--penalty-dir", help="image folder for the pretraining penalty (paper: ImageNet)")
    t.add_argument("--anomalous-val-dir", help="anomalous validation images: F1-optimal threshold")
    t.set_defaults(func=cmd_train)

    e = verbs.add_parser("evaluate", help="evaluate a checkpoint on an MVTec-layout category")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--mvtec-dir", required=True, help="category folder with test/ and ground_truth/")
    e.add_argument("--out", required=True, help="results JSON")
    e.add_argument("--overlays", help="folder for heat-map overlay PNGs")
    e.set_defaults(func=cmd_evaluate)

    x = verbs.add_parser("export", help="export to a Triton model repository")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--repository", required=True, help="Triton model repository (e.g. triton_repo)")
    x.add_argument("--product", required=True)
    x.add_argument("--version", type=positive_int, help="default: next free version")
    x.add_argument("--max-batch-size", type=positive_int, default=8)
    x.set_defaults(func=cmd_export)

    d = verbs.add_parser("distill-teacher", help="distil a PDN teacher from a timm backbone (resumes from <out>.ckpt)")
    d.add_argument("--image-dir", required=True, help="generic images (e.g. <data>/imagenet-sample)")
    d.add_argument("--out", required=True, help="teacher .safetensors to write (+ .sha256, .json provenance)")
    d.add_argument("--backbone", default="tf_efficientnet_lite0")
    d.add_argument("--out-indices", type=int, nargs="+", default=[2, 3], help="backbone stages of the target")
    d.add_argument("--backbone-weights", help="local weights file (never downloaded)")
    d.add_argument("--model-size", choices=["small", "medium"], default="small")
    d.add_argument("--steps", type=positive_int, default=60_000)
    d.add_argument("--batch-size", type=positive_int, default=16)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--max-images", type=positive_int)
    d.add_argument("--max-seconds", type=float, help="wall budget of the step loop (CPU schedules)")
    d.add_argument("--amp-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on the CPU (default: only where the CPU has native bf16; always on with CUDA)")
    _add_device(d)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_distill)
