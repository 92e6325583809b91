"""Training job: good images of a product -> artifact in the model store -> ``released`` on model-events.

    python -m models.jobs.train_job --detector moleflow --product cells --train-dir DIR \\
        --store /models/store --base-store /models/moleflow-store [--val-good DIR --val-bad DIR] \\
        [--bootstrap kafka:9092] [--no-publish] [--device auto|cpu|cuda] [-- extra args for the detector's train verb]

Steps: split the good images (held-out part: calibration + probe images), train and export through the
detector registry (models/registry.py: ``--detector`` is any registered detector; a multi-task detector
such as MoLE-Flow adds the product's task adapter to ``--base-store`` on the frozen base, a per-product
one such as EfficientAD trains a fresh model), export a new version into the model store (Triton
layout, ``<store>/<model>/<version>``), score the held-out good images with the exported artifact loaded
as Triton serves it (calibration scores the rollout health check and drift monitor compare against), evaluate on labelled validation images if given (image AUROC;
``--min-auroc`` gates the release), copy probe images into the artifact, rewrite metadata.json with
every artifact's sha256, and publish ``released`` by running ``linewatch release`` (a subprocess:
``models`` never imports faust). The detector trains on ``Settings.train_device`` (LINEWATCH_TRAIN_DEVICE,
set to cuda by the GPU training Job; ``--device`` overrides it): "cuda" without a usable GPU fails in
one line (exit 1) before any training. Exit codes (contracts/cli.py): 0 released (or written with --no-publish),
2 usage / data errors, 1 runtime failures (the release command failed), 3 evaluation gate failed
(artifact written, not released).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import numpy as np

from contracts.artifact import write_manifest
from contracts.cli import OneLineParser, RuntimeFailure, run_command
from contracts.config import Settings
from contracts.detectors import detector_names
from models.artifacts import sha256_file as _sha
from models.jobs.calibrate import apply_operating_point, choose_for_version, score_images


def _link_files(paths: list[Path], folder: Path) -> Path:
    """A folder of symlinks to ``paths`` (a split of the user's images, nothing copied)."""
    folder.mkdir()
    for p in paths:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def _images(d: str | Path) -> list[Path]:
    from models.data import list_images

    return [Path(p) for p in list_images(Path(d))]


def training_budget(a, settings: Settings) -> tuple[float | None, str]:
    """(wall budget in seconds, device): on a CPU the detector's full recipe fits Settings.train_budget_cpu_s
    (``--time-budget-s`` overrides, 0 = none); on a GPU the full schedule runs unless a budget is given."""
    from models.precision import train_device

    device = train_device(settings.train_device).type
    if a.time_budget_s is not None:
        return (a.time_budget_s or None), device
    return (settings.train_budget_cpu_s if device == "cpu" else None), device


def _schedule_ran(meta: dict, task: str | None) -> dict:
    """What the detector's training recorded about its schedule (steps / epochs), for the release metadata."""
    src = meta["tasks"].get(task, {}) if task and isinstance(meta.get("tasks"), dict) else meta
    keys = ("epochs", "epochs_planned", "steps_done", "selected_step", "train_seconds", "held_out_cutpaste_auroc")
    return {k: src[k] for k in keys if k in src} | {k: v for k, v in (src.get("schedule") or {}).items()}


def run_job(a, settings: Settings) -> int:
    """One onboarding. A multi-task detector's onboardings of one model take turns (issue #26 item 9): its training
    store's lock (models/locks.py) is held from loading the store (the next adapter index) to the exported version's
    manifest and its release, so a second job waits, then adds its adapter after the first and exports the next
    version."""
    from models.locks import store_lock
    from models.registry import get

    if get(a.detector).info.multi_task and a.base_store:
        with store_lock(a.base_store, what=f"{a.detector} training store"):
            return _run_job(a, settings)
    return _run_job(a, settings)


def _run_job(a, settings: Settings) -> int:
    from models.data import split_good
    from models.registry import get

    if getattr(a, "device", None):
        settings = settings.model_copy(update={"train_device": a.device})

    det = get(a.detector)
    store = Path(a.store.removeprefix("file://"))
    good = _images(a.train_dir)
    if len(good) < 4:
        raise ValueError(f"need at least 4 good images in {a.train_dir}, found {len(good)}")
    model = a.model or det.info.model_name(a.product)
    task = det.info.task_of(a.product)
    if det.info.multi_task and not a.base_store:
        raise ValueError(f"--base-store ({det.name} training store: frozen base + task adapters) is required")
    train, hold = split_good(good, a.holdout, a.seed)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lw-train-") as tmp:
        tdir = _link_files(train, Path(tmp) / "train")  # the training split as symlinks (nothing copied)
        # the held-out split sets the threshold where the detector takes calibration images (MoLE-Flow adapters)
        cdir = _link_files(hold, Path(tmp) / "calibration")
        # a multi-task detector extends its persistent training store; a per-product one trains afresh
        ckpt = Path(a.base_store) if det.info.multi_task else Path(tmp) / f"{det.name}.ckpt"
        budget, device = training_budget(a, settings)
        extra = [*a.extra, *(det.budget_args(budget) if budget and det.budget_flag not in a.extra else [])]
        t_train = time.monotonic()
        det.train(tdir, ckpt, product=a.product, settings=settings, calibration_dir=cdir, extra=extra)
        train_s = time.monotonic() - t_train
        vdir = det.export(ckpt, store, model, require_sha256=settings.require_sha256)
    meta = json.loads((vdir / "metadata.json").read_text())
    spec, scorer = det.spec(vdir), det.load_serving(vdir)
    import cv2

    pdir = vdir / "probe"
    pdir.mkdir(exist_ok=True)
    files = []
    for i, p in enumerate(hold[: a.probe_images]):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = 256 / max(h, w)
        if s < 1:
            img = cv2.resize(img, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
        rel = f"probe/{i:03d}.png"
        cv2.imwrite(str(vdir / rel), img)
        files.append(rel)
    # calibrate on the images exactly as the controller's health check will score them: the stored
    # (downscaled) probe files where a held-out image became a probe, the originals otherwise
    # and the operating point (decision + box thresholds, FAR/recall estimates) on the same images, scored once
    calibration = [vdir / f for f in files] + list(hold[len(files):])
    op, cal = choose_for_version(det, vdir, calibration, task,
                                 a.target_false_alarm_rate or settings.target_false_alarm_rate, a.seed,
                                 loaded=(spec, scorer))
    thr = op["threshold"]
    apply_operating_point(meta, op, task, store / model)
    if task and isinstance(meta.get("tasks"), dict) and task in meta["tasks"]:
        meta["tasks"][task]["calibration_scores"] = [float(x) for x in cal]
    else:
        meta["calibration"] = {"scores": [float(x) for x in cal], "n": int(cal.size),
                               "source": "held-out good training images (the stored probe files where one became a probe)"}
    gate_ok = True
    if a.val_good or a.val_bad:
        from sklearn.metrics import roc_auc_score

        vg = _images(a.val_good) if a.val_good else list(hold)
        vb = _images(a.val_bad) if a.val_bad else []
        sg, sb = score_images(scorer, spec, task, vg), score_images(scorer, spec, task, vb)
        ev = {"n_good": len(vg), "n_bad": len(vb), "false_alarm_rate": float(np.mean(sg > thr)) if sg.size else None,
              "recall": float(np.mean(sb > thr)) if sb.size else None}
        if sg.size and sb.size:
            ev["image_auroc"] = float(roc_auc_score(np.r_[np.zeros(sg.size), np.ones(sb.size)], np.r_[sg, sb]))
            gate_ok = a.min_auroc is None or ev["image_auroc"] >= a.min_auroc
        meta["evaluation"] = ev
    meta["probe"] = {"files": files, "kind": "good"}
    meta["training"] = {"train_images": len(train), "holdout_images": len(hold), "train_dir": str(a.train_dir),
                        "device": device, "budget_s": budget, "seconds": round(train_s, 1), "train_args": extra,
                        **_schedule_ran(meta, task)}
    meta = write_manifest(vdir, meta, [*(meta.get("artifacts") or {}), *files])  # the probe images are pinned too
    summary = {"artifact": str(vdir), "model": model, "version": int(meta["version"]),
               "sha256": _sha(vdir / "metadata.json"), "evaluation": meta.get("evaluation"),
               "calibration_median": float(np.median(cal)) if cal.size else None,
               "operating_point": {k: op[k] for k in ("threshold", "target_false_alarm_rate", "estimated_false_alarm_rate",
                                                      "estimated_recall", "estimated_recall_by_family", "n_good")}}
    print(json.dumps(summary))
    if not gate_ok:
        sys.stderr.write(f"train_job: image AUROC {meta['evaluation']['image_auroc']:.3f} < --min-auroc "
                         f"{a.min_auroc}: artifact written, not released\n")
        return 3
    if a.no_publish:
        return 0
    cmd = [sys.executable, "-m", "stream.ops.cli", "release", str(vdir)]
    if task:
        cmd += ["--task", task]
    if a.bootstrap:
        cmd += ["--bootstrap", a.bootstrap]
    if a.topic:
        cmd += ["--topic", a.topic]
    try:
        subprocess.run(cmd, check=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise RuntimeFailure(f"artifact written, release failed: {e}") from None
    return 0


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="python -m models.jobs.train_job", description=__doc__.splitlines()[0])
    ap.add_argument("--detector", choices=detector_names(), default=detector_names()[0])
    ap.add_argument("--product", required=True, help="product name (MoLE-Flow: the new task)")
    ap.add_argument("--train-dir", required=True, help="folder of good images")
    ap.add_argument("--store", required=True, help="model store (directory or file:// URI)")
    ap.add_argument("--model", help="model name (default: the detector's, contracts/detectors.py)")
    ap.add_argument("--base-store", help="multi-task detectors (MoLE-Flow): the training store (frozen base + adapters)")
    ap.add_argument("--val-good", help="labelled validation: good images")
    ap.add_argument("--val-bad", help="labelled validation: defective images")
    ap.add_argument("--min-auroc", type=float, help="do not release below this validation image AUROC")
    ap.add_argument("--holdout", type=float, default=0.25,
                    help="fraction of good images held out for the operating point (at least 20, at most half)")
    ap.add_argument("--target-false-alarm-rate", type=float, default=None,
                    help="decision threshold's false-alarm rate on good parts (default: settings, 0.01)")
    ap.add_argument("--probe-images", type=int, default=24)
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="wall budget of the detector's training (default: settings train_budget_cpu_s on a CPU, "
                         "none on a GPU; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", help="Kafka bootstrap (default: settings / running stack)")
    ap.add_argument("--topic", help="model-events topic")
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("--device", choices=typing.get_args(Settings.model_fields["train_device"].annotation), default=None,
                    help="training device (default: settings train_device / LINEWATCH_TRAIN_DEVICE)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: args for the detector's train verb")
    ap.set_defaults(func=_cmd)
    return ap


def _cmd(a) -> int:
    """The verb: ``a.settings`` is the entry point's Settings (models/cli.py main or :func:`main`)."""
    a.extra = [x for x in (a.extra or []) if x != "--"]
    return run_job(a, a.settings)


def register(sub) -> None:
    """``linewatch-models job train ...``"""
    g = sub.add_parser("job", help="container jobs")
    gs = g.add_subparsers(dest="job", required=True)
    build_parser(gs.add_parser("train", help="train + export + calibrate + release a model/adapter"))


def main(argv: list[str] | None = None) -> int:
    from models.errors import usage_errors

    a = build_parser(OneLineParser(prog="python -m models.jobs.train_job",
                                   description=__doc__.splitlines()[0])).parse_args(argv)

    def go() -> int:
        from contracts.logs import configure_logging

        a.settings = Settings()
        configure_logging(a.settings.log_level)
        return a.func(a)

    return run_command("train_job", go, usage=usage_errors())


if __name__ == "__main__":
    raise SystemExit(main())
