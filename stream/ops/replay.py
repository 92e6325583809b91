"""Replay a folder of images onto the ``frames`` topic as one or more cameras at a given fps.

MVTec-style folders (``<folder>/good/*.png``, ``<folder>/<defect>/*.png``) get ground-truth
headers ``gt_label`` (good/defect) and ``gt_defect`` (the sub-folder name); a flat folder has no
labels. Each camera publishes every image once per loop, interleaved, paced to ``fps`` per camera
(0 = as fast as possible).
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from contracts.config import Settings
from contracts.envelope import Frame, encode_frame, new_frame_id
from contracts.logs import get_logger
from stream.kafka.clients import Producer
from stream.sources.inputs import list_images

log = get_logger("stream.ops.replay")


@dataclass
class Sent:
    frame_id: str
    camera: str
    path: str
    gt_label: str | None
    gt_defect: str | None
    ts_ms: int


async def replay(bootstrap: str, folder: str | Path, *, cameras: list[str] | None = None, fps: float = 10.0,
                 topic: str = "frames", product: str | None = None, line: str | None = None, loops: int = 1,
                 limit: int | None = None, interleave: bool = True, settings: Settings | None = None,
                 extra: dict[str, str] | None = None) -> list[Sent]:
    """Send the images of ``folder`` as frames (one per camera each); ``extra``: headers every frame carries
    (e.g. ``{"warmup": "1"}``: a warm-up frame, contracts.envelope.WARMUP_HEADER)."""
    items = list_images(folder)
    if interleave:  # good and defect frames mixed, deterministic
        items = sorted(items, key=lambda it: (zlib.crc32(it.path.name.encode() + it.path.parent.name.encode()), str(it.path)))
    if limit:
        items = items[:limit]
    cameras = cameras or ["cam-1"]
    blobs = {it.path: it.path.read_bytes() for it in items}
    sent: list[Sent] = []
    period = 1.0 / fps if fps and fps > 0 else 0.0
    t_start = time.monotonic()
    k = 0
    async with Producer(bootstrap, settings=settings) as prod:
        for _ in range(max(1, loops)):
            for it in items:
                recs = []
                for cam in cameras:
                    ts = int(time.time() * 1000)
                    f = Frame(frame_id=new_frame_id(), camera_id=cam, ts_ms=ts, image=blobs[it.path], line_id=line,
                              product=product, content_type=mimetypes.guess_type(it.path.name)[0],
                              extra={**{k2: v for k2, v in (("gt_label", it.gt_label), ("gt_defect", it.gt_defect),
                                                            ("source", it.path.name)) if v}, **(extra or {})})
                    recs.append(encode_frame(f))
                    sent.append(Sent(f.frame_id, cam, str(it.path), it.gt_label, it.gt_defect, ts))
                await prod.send_many(topic, recs)
                k += 1
                if period:
                    delay = t_start + k * period - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
    log.info("replay_done", frames=len(sent), cameras=cameras, seconds=round(time.monotonic() - t_start, 2))
    return sent
