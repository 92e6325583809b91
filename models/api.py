"""One Python API over an exported model: load a version, predict on an image array.

    from models import Detector
    import cv2

    det = Detector.load("triton_repo/efficientad_bottle")   # a model dir (its newest version) or a version dir
    score, is_anomaly, anomaly_map, boxes = det.predict(cv2.imread("bottle.png"))  # HxWx3 uint8, BGR

The same code the service runs, in-process: the version is verified and loaded by its detector's
Triton Python-backend class (``Detector.load_serving`` of models/detector.py: sha256 of every artifact
checked first), the image is preprocessed by ``contracts.spec.to_tensor`` (as the worker does after
decoding a frame with OpenCV: hence BGR), and the result is judged by the version's operating point
(``contracts.operating_point``: per task for a multi-task model) exactly as the worker judges it
(stream/worker/pipeline.py ``score``, stream/inference/heatmap.py ``make_defect_event``).

:class:`Prediction` unpacks as ``(score, is_anomaly, anomaly_map, boxes)``:

- ``score``: the served score (the units of the operating point's ``threshold``; MoLE-Flow serves the
  raw NLL minus the task's threshold); ``normalised_score`` is the [0, 1] one (0.5 at the threshold);
- ``is_anomaly``: ``score > threshold``;
- ``anomaly_map``: float32 [H, W] at the image's own size: the served map prepared as the defect event's
  heat map is (resized to the model input, smoothed, border ring dropped), then resized to the image;
- ``boxes``: a flagged image's defect boxes (at least one), as the defect event carries them: dicts with
  ``x, y, w, h`` normalised to [0, 1] (multiply by the image's width/height), ``area`` and ``peak``;
  empty for an image that is not flagged.

MoLE-Flow serves several tasks: ``predict(image)`` lets its prototype router choose the task (the
chosen ``task`` and ``route_distance`` are on the prediction), ``predict(image, task="bottle")`` names it.
``models.detector.Detector`` is the other "Detector": the interface each detector implements (training,
export, ``load_serving``); this one is what a user loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from contracts.operating_point import OperatingPoint, anomaly_boxes, operating_point_of, prepare_map
from contracts.spec import ModelSpec, to_tensor
from models.artifacts import version_dir

BATCH = 8  # images per forward pass in predict_batch


@dataclass(frozen=True)
class Prediction:
    """One image's result; unpacks as ``(score, is_anomaly, anomaly_map, boxes)``."""

    score: float
    is_anomaly: bool
    anomaly_map: np.ndarray
    boxes: list[dict[str, float]]
    normalised_score: float
    threshold: float
    task: str | None = None
    route_distance: float | None = None
    operating_point: OperatingPoint | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.score, self.is_anomaly, self.anomaly_map, self.boxes))


class Detector:
    """An exported version, loaded as Triton serves it. :meth:`load` it, then :meth:`predict`."""

    def __init__(self, spec: ModelSpec, scorer, path: Path):
        self.spec, self.path = spec, path
        self._scorer = scorer
        self._ops: dict[str, OperatingPoint] = {}

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """Load an exported version: ``path`` is a version dir (holds metadata.json) or a model dir (its
        newest version). Every artifact's sha256 is verified before anything is loaded."""
        from models.registry import get

        vdir = version_dir(Path(path))
        impl = get(_detector_name(vdir))
        return cls(impl.spec(vdir), impl.load_serving(vdir), vdir)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks of a multi-task model (MoLE-Flow), else ()."""
        return self.spec.tasks

    def operating_point(self, task: str | None = None) -> OperatingPoint:
        """The operating point the version applies to ``task`` (the model's own for a per-product model)."""
        key = task or ""
        if key not in self._ops:
            self._ops[key] = operating_point_of(self.spec.raw, task or None)
        return self._ops[key]

    def predict(self, image: np.ndarray, task: str | None = None) -> Prediction:
        """Score one HxWx3 uint8 **BGR** image (``cv2.imread``'s order; an RGB array: ``image[..., ::-1]``).
        ``task``: a multi-task model's task (None: its router chooses)."""
        return self.predict_batch([image], None if task is None else [task])[0]

    def predict_batch(self, images: Sequence[np.ndarray], tasks: Sequence[str | None] | None = None) -> list[Prediction]:
        """:meth:`predict` for several images (forward passes of up to ``BATCH`` images)."""
        if tasks is not None and len(tasks) != len(images):
            raise ValueError(f"{len(tasks)} tasks for {len(images)} images")
        tasks = list(tasks) if tasks is not None else [None] * len(images)
        for t in tasks:
            if t and self.tasks and t not in self.tasks:
                raise ValueError(f"task {t!r} is not a task of {self.spec.model} (tasks: {', '.join(self.tasks)})")
        for im in images:
            _check_image(im)
        out: list[Prediction] = []
        for i in range(0, len(images), BATCH):
            chunk, chunk_tasks = images[i:i + BATCH], tasks[i:i + BATCH]
            x = np.stack([to_tensor(im, self.spec) for im in chunk])
            served = self._scorer(x, chunk_tasks)
            out += [self._judge(im, served, j, chunk_tasks[j]) for j, im in enumerate(chunk)]
        return out

    def _judge(self, image: np.ndarray, served: dict[str, np.ndarray], j: int, asked: str | None) -> Prediction:
        """The worker's decision for item ``j`` of a served batch (stream/worker/pipeline.py ``score``)."""
        names = self.spec.outputs
        score = float(np.asarray(served[names.get("score", "score")]).reshape(-1)[j])
        task = _text(served[names["task"]], j) if "task" in names and names["task"] in served else asked
        rd_name = names.get("route_distance")
        rd = float(np.asarray(served[rd_name]).reshape(-1)[j]) if rd_name and rd_name in served else None
        op = self.operating_point(task)
        flagged = op.is_anomaly(score)
        size = (self.spec.input.height, self.spec.input.width)
        native = np.asarray(served[names.get("anomaly_map", "anomaly_map")])[j]
        prepared = prepare_map(native, size, op.map_sigma, op.map_border)  # as make_defect_event prepares it
        boxes = anomaly_boxes(prepared, op.box_threshold(), force=True) if flagged else []
        h, w = image.shape[:2]
        amap = prepared if prepared.shape == (h, w) else cv2.resize(prepared, (w, h), interpolation=cv2.INTER_LINEAR)
        return Prediction(score=score, is_anomaly=flagged, anomaly_map=amap, boxes=boxes,
                          normalised_score=op.normalised(score), threshold=op.threshold, task=task or None,
                          route_distance=rd, operating_point=op)


def _detector_name(vdir: Path) -> str:
    from contracts.artifact import read_manifest

    name = read_manifest(vdir)[0].get("detector")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{vdir}/metadata.json names no detector")
    return name


def _text(arr: np.ndarray, j: int) -> str:
    v = np.asarray(arr, dtype=object).reshape(-1)[j]
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)


def _check_image(im: np.ndarray) -> None:
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3 or 0 in im.shape:
        shape = getattr(im, "shape", None)
        dtype = getattr(im, "dtype", type(im).__name__)
        raise ValueError(f"predict takes an HxWx3 uint8 BGR image array (cv2.imread), got shape {shape} dtype {dtype}")
