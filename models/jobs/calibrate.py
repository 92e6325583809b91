"""Calibrating an exported version: its operating point on held-out good images, written into its metadata.

    linewatch-models calibrate --version-dir REPO/MODEL[/VERSION] --good-dir DIR [--task T] [--target-false-alarm-rate R]

The training job (models/jobs/train_job.py) calibrates every release this way; the demo's quick recipe
(devstack/demo.py) runs the verb after its export, on the images its training left out. The version is
loaded exactly as Triton serves it (``Detector.load_serving``), scored on the held-out good images and
their synthetic defects (models/operating_point.py), and the ``operating_point`` goes into metadata.json
(per task for a multi-task detector) and the config's ``linewatch_spec``; every artifact's digest is
re-pinned (contracts.artifact.write_manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contracts.image import decode_image
from contracts.spec import ModelSpec, to_tensor
from models.detector import Scorer
from models.operating_point import choose_operating_point


def score_images(scorer: Scorer, spec: ModelSpec, task: str | None, paths: list[Path]) -> np.ndarray:
    """Scores of the exported artifact, preprocessed exactly as the worker does (contracts.spec)."""
    out = []
    for i in range(0, len(paths), 8):
        x = np.stack([to_tensor(decode_image(p.read_bytes()), spec) for p in paths[i:i + 8]])
        out.append(np.asarray(scorer(x, [task] * len(x))[spec.outputs.get("score", "score")], np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def score_arrays(scorer: Scorer, spec: ModelSpec, task: str | None, images) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n], native anomaly maps [n, h, w]) of decoded BGR images, preprocessed as the worker does."""
    scores, maps = [], []
    for i in range(0, len(images), 8):
        x = np.stack([to_tensor(im, spec) for im in images[i:i + 8]])
        out = scorer(x, [task] * len(x))
        scores.append(np.asarray(out[spec.outputs.get("score", "score")], np.float64).reshape(-1))
        m = np.asarray(out[spec.outputs.get("anomaly_map", "anomaly_map")], np.float32)
        maps.append(m.reshape(len(x), *m.shape[-2:]))
    return np.concatenate(scores), np.concatenate(maps)


def carry_operating_points(meta: dict, model_dir: Path, task: str) -> None:
    """Earlier tasks of a multi-task model keep the operating point their own release chose: copied from
    the newest older version where the task's adapter is the same file (adapters never change once
    trained, so their held-out estimates still hold)."""
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.name != str(meta["version"])),
                      reverse=True) if model_dir.is_dir() else []
    for t, info in meta["tasks"].items():
        if t == task or "operating_point" in info:
            continue
        for v in versions:
            try:
                old = json.loads((model_dir / str(v) / "metadata.json").read_text()).get("tasks", {}).get(t, {})
            except (OSError, ValueError):
                continue
            if old.get("adapter_sha256") == info.get("adapter_sha256") and "operating_point" in old:
                info["operating_point"] = old["operating_point"]
                break


def choose_for_version(det, vdir: Path, good: list[Path], task: str | None, rate: float, seed: int = 0,
                       loaded: tuple[ModelSpec, Scorer] | None = None) -> tuple[dict, np.ndarray]:
    """The operating point of version ``vdir`` of detector ``det`` on the held-out ``good`` images, and those
    images' scores; ``loaded``: its (spec, scorer) when the caller already loaded it (the training job adds
    files before re-pinning)."""
    spec, scorer = loaded or (det.spec(vdir), det.load_serving(vdir))
    first: list[np.ndarray] = []  # choose_operating_point scores the good images first, then synthetic defects

    def score(imgs):
        s, m = score_arrays(scorer, spec, task, imgs)
        if not first:
            first.append(np.asarray(s, np.float64).reshape(-1))
        return s, m

    op = choose_operating_point(score, [decode_image(p.read_bytes()) for p in good],
                                (spec.input.height, spec.input.width), target_false_alarm_rate=rate, seed=seed)
    return op, first[0]


def apply_operating_point(meta: dict, op: dict, task: str | None, model_dir: Path) -> None:
    """Write ``op`` into a version's metadata: per task (multi-task; earlier tasks keep theirs), else the model's
    (its ``threshold``/``map_threshold`` too, for readers of the older fields)."""
    if task and isinstance(meta.get("tasks"), dict) and task in meta["tasks"]:
        meta["tasks"][task]["operating_point"] = op
        carry_operating_points(meta, model_dir, task)
    else:
        meta["operating_point"] = op
        meta["threshold"], meta["map_threshold"] = op["threshold"], op["map_threshold"]


def _cmd(a) -> int:
    from contracts.artifact import write_manifest
    from contracts.pbtxt import rewrite_config
    from models.artifacts import version_dir
    from models.data import list_images
    from models.registry import get

    vdir = version_dir(Path(a.version_dir))  # a model dir: its newest version
    meta = json.loads((vdir / "metadata.json").read_text())
    det = get(meta["detector"])
    task = a.task or (det.info.task_of(meta["product"]) if meta.get("product") else None)
    good = [Path(p) for p in list_images(Path(a.good_dir))]
    if len(good) < 4:
        raise ValueError(f"need at least 4 held-out good images in {a.good_dir}, found {len(good)}")
    op, _ = choose_for_version(det, vdir, good, task, a.target_false_alarm_rate or a.settings.target_false_alarm_rate,
                            a.seed)
    apply_operating_point(meta, op, task, vdir.parent)
    cfg = vdir.parent / "config.pbtxt"
    files = list(meta.get("artifacts") or {})
    meta = write_manifest(vdir, meta, files)
    if cfg.is_file():  # a version exported straight into a Triton repository: its served spec too
        cfg.write_text(rewrite_config(cfg.read_text(), meta["model"], None, spec=meta))
    print(json.dumps({"version_dir": str(vdir), "task": task, "operating_point": op}))
    return 0


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="choose an exported version's operating point on held-out good images")
    c.add_argument("--version-dir", required=True, help="an exported version dir, or a model dir (its newest version)")
    c.add_argument("--good-dir", required=True, help="held-out good images (none of them trained on)")
    c.add_argument("--task", default=None, help="multi-task models: the task (default: the spec's product's)")
    c.add_argument("--target-false-alarm-rate", type=float, default=None, help="default: settings (0.01)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd)
