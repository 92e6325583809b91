"""Training job: good images of a product -> artifact in the model store -> ``released`` on model-events.

    python -m models.jobs.train_job --detector moleflow --product cells --train-dir DIR \\
        --store /models/store --base-store /models/moleflow-store [--val-good DIR --val-bad DIR] \\
        [--bootstrap kafka:9092] [--no-publish] [-- extra args for the detector's train verb]

Steps: split the good images (held-out part: calibration + probe images), train through the models CLI
(MoLE-Flow: ``train-task`` adds a task adapter to ``--base-store`` on the frozen base; EfficientAD:
``train``), export a new version into the model store (Triton layout, ``<store>/<model>/<version>``),
score the held-out good images with the exported artifact (calibration scores the rollout health check
and drift monitor compare against), evaluate on labelled validation images if given (image AUROC;
``--min-auroc`` gates the release), copy probe images into the artifact, rewrite metadata.json with
every artifact's sha256, and publish ``released`` by running ``linewatch release`` (a subprocess:
``models`` never imports faust). Exit codes: 0 released (or written with --no-publish), 2 usage /
data errors, 3 evaluation gate failed (artifact written, not released).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from models.artifacts import sha256_file as _sha


def _link_files(paths: list[Path], folder: Path) -> Path:
    """A folder of symlinks to ``paths`` (a split of the user's images, nothing copied)."""
    folder.mkdir()
    for p in paths:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def _images(d: str | Path) -> list[Path]:
    from models.data import list_images  # noqa: PLC0415

    return [Path(p) for p in list_images(Path(d))]


def split_good(paths: list[Path], holdout: float, seed: int, min_holdout: int = 10) -> tuple[list[Path], list[Path]]:
    paths = sorted(paths)
    rng = random.Random(seed)
    idx = list(range(len(paths)))
    rng.shuffle(idx)
    n_hold = min(max(min_holdout, int(round(len(paths) * holdout))), len(paths) // 2)
    hold = sorted(paths[i] for i in idx[:n_hold])
    train = sorted(paths[i] for i in idx[n_hold:])
    return train, hold


def score_images(vdir: Path, detector: str, task: str | None, paths: list[Path]) -> np.ndarray:
    """Scores of the exported artifact, preprocessed exactly as the worker does (contracts.spec)."""
    import torch  # noqa: PLC0415

    from contracts.image import decode_image  # noqa: PLC0415
    from contracts.spec import parse_spec, to_tensor  # noqa: PLC0415

    meta = json.loads((vdir / "metadata.json").read_text())
    spec = parse_spec(meta)
    torch.set_num_threads(1)
    if detector == "efficientad":
        from models.efficientad.serving import verify_and_load  # noqa: PLC0415 - sha256 first, then load

        net = verify_and_load(vdir)[0].eval()

        def run(x):
            return net(x)[1]
    else:
        from models.moleflow.store import load_model  # noqa: PLC0415

        mf = load_model(vdir)

        def run(x):
            return mf.predict(x, tasks=[task] * len(x), calibrated=True)["score"]
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), 8):
            x = np.stack([to_tensor(decode_image(p.read_bytes()), spec) for p in paths[i:i + 8]])
            out.append(run(torch.from_numpy(x)).reshape(-1).float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _models_cli(argv: list[str]) -> None:
    from models.cli import main  # noqa: PLC0415

    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def _newest_version(model_dir: Path) -> Path:
    vs = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not vs:
        raise RuntimeError(f"export wrote no version under {model_dir}")
    return max(vs, key=lambda p: int(p.name))


def run_job(a) -> int:
    store = Path(a.store.removeprefix("file://"))
    good = _images(a.train_dir)
    if len(good) < 4:
        raise ValueError(f"need at least 4 good images in {a.train_dir}, found {len(good)}")
    train, hold = split_good(good, a.holdout, a.seed)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lw-train-") as tmp:
        tdir = _link_files(train, Path(tmp) / "train")  # the training split as symlinks (nothing copied)
        if a.detector == "moleflow":
            model = a.model or "moleflow"
            if not a.base_store:
                raise ValueError("--base-store (MoLE-Flow training store: frozen base + adapters) is required")
            # the held-out split sets the adapter's threshold (the scores below use it too)
            cdir = _link_files(hold, Path(tmp) / "calibration")
            _models_cli(["moleflow", "train-task", "--data-dir", str(tdir), "--task", a.product, "--out", a.base_store,
                         "--calibration-dir", str(cdir), *a.extra])
            _models_cli(["moleflow", "export", "--checkpoint", a.base_store, "--repo", str(store), "--name", model])
        else:
            model = a.model or f"efficientad_{a.product}"
            ckpt = Path(tmp) / "efficientad.pt"
            _models_cli(["efficientad", "train", "--train-dir", str(tdir), "--out", str(ckpt), *a.extra])
            _models_cli(["efficientad", "export", "--checkpoint", str(ckpt), "--repository", str(store),
                         "--product", a.product])
    vdir = _newest_version(store / model)
    meta = json.loads((vdir / "metadata.json").read_text())
    task = a.product if a.detector == "moleflow" else None
    cal = score_images(vdir, a.detector, task, hold)
    thr = float(meta.get("threshold", 0.0))
    if task and isinstance(meta.get("tasks"), dict) and task in meta["tasks"]:
        meta["tasks"][task]["calibration_scores"] = [float(x) for x in cal]
    else:
        meta["calibration"] = {"scores": [float(x) for x in cal], "n": int(cal.size),
                               "source": "held-out good training images"}
    gate_ok = True
    if a.val_good or a.val_bad:
        from sklearn.metrics import roc_auc_score  # noqa: PLC0415

        vg = _images(a.val_good) if a.val_good else list(hold)
        vb = _images(a.val_bad) if a.val_bad else []
        sg, sb = score_images(vdir, a.detector, task, vg), score_images(vdir, a.detector, task, vb)
        ev = {"n_good": len(vg), "n_bad": len(vb), "false_alarm_rate": float(np.mean(sg > thr)) if sg.size else None,
              "recall": float(np.mean(sb > thr)) if sb.size else None}
        if sg.size and sb.size:
            ev["image_auroc"] = float(roc_auc_score(np.r_[np.zeros(sg.size), np.ones(sb.size)], np.r_[sg, sb]))
            gate_ok = a.min_auroc is None or ev["image_auroc"] >= a.min_auroc
        meta["evaluation"] = ev
    import cv2  # noqa: PLC0415

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
    meta["probe"] = {"files": files, "kind": "good"}
    arts = dict(meta.get("artifacts") or {})
    arts.update({f: _sha(vdir / f) for f in files})
    meta["artifacts"] = arts
    meta["training"] = {"train_images": len(train), "holdout_images": len(hold), "train_dir": str(a.train_dir)}
    tmpm = vdir / ".metadata.json.tmp"
    tmpm.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmpm, vdir / "metadata.json")
    summary = {"artifact": str(vdir), "model": model, "version": int(meta["version"]),
               "sha256": _sha(vdir / "metadata.json"), "evaluation": meta.get("evaluation"),
               "calibration_median": float(np.median(cal)) if cal.size else None}
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
    subprocess.run(cmd, check=True, timeout=120)
    return 0


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="python -m models.jobs.train_job", description=__doc__.splitlines()[0])
    ap.add_argument("--detector", choices=["moleflow", "efficientad"], default="moleflow")
    ap.add_argument("--product", required=True, help="product name (MoLE-Flow: the new task)")
    ap.add_argument("--train-dir", required=True, help="folder of good images")
    ap.add_argument("--store", required=True, help="model store (directory or file:// URI)")
    ap.add_argument("--model", help="model name (default: moleflow / efficientad_<product>)")
    ap.add_argument("--base-store", help="MoLE-Flow training store (frozen base + adapters)")
    ap.add_argument("--val-good", help="labelled validation: good images")
    ap.add_argument("--val-bad", help="labelled validation: defective images")
    ap.add_argument("--min-auroc", type=float, help="do not release below this validation image AUROC")
    ap.add_argument("--holdout", type=float, default=0.15, help="fraction of good images held out for calibration")
    ap.add_argument("--probe-images", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", help="Kafka bootstrap (default: settings / running stack)")
    ap.add_argument("--topic", help="model-events topic")
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: args for the detector's train verb")
    ap.set_defaults(func=_cmd)
    return ap


def _cmd(a) -> int:
    a.extra = [x for x in (a.extra or []) if x != "--"]
    try:
        return run_job(a)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        sys.stderr.write(f"train_job: error: {str(e).splitlines()[0]}\n")
        return 2


def register(sub) -> None:
    """``linewatch-models job train ...``"""
    g = sub.add_parser("job", help="container jobs")
    gs = g.add_subparsers(dest="job", required=True)
    build_parser(gs.add_parser("train", help="train + export + calibrate + release a model/adapter"))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return int(a.func(a) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
