"""A candidate's shadow window: score probe images and offered live frames, then decide (pure policy).

The candidate (``<model>__candidate``, loaded on every replica) scores (a) the good validation images
shipped with the artifact (``metadata.probe``, only sha-verified files) and (b) the live frames queued
on the rollout by :meth:`stream.lifecycle.controller.RolloutController.offer`. Each round feeds
:func:`stream.lifecycle.policy.decide`; a candidate inference error is evidence, never a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from contracts.artifact import Artifact
from contracts.image import decode_image
from contracts.operating_point import operating_point_of
from contracts.spec import parse_spec, to_pixels
from stream.inference.triton_client import TritonInfer
from stream.lifecycle.policy import Decision, HealthPolicy, calibration_of, decide

OnShadow = Callable[[dict[str, Any]], Awaitable[None]] | None


def probe_images(art: Artifact) -> list[bytes]:
    """The probe images the artifact ships, restricted to files its manifest hashes."""
    probe = art.metadata.get("probe") or {}
    files = probe.get("files", []) if isinstance(probe, dict) else []
    out = []
    for rel in files:
        p = art.path / rel
        if p.is_file() and rel in (art.metadata.get("artifacts") or {}):
            out.append(p.read_bytes())
    return out


async def run_shadow(ro, task: str | None, url: str, policy: HealthPolicy, on_result: OnShadow) -> Decision:
    """Score until :func:`decide` returns promote or roll back (``ro`` is the controller's Rollout)."""
    pol = policy
    spec = parse_spec(ro.artifact.metadata)
    cal, thr = calibration_of(ro.artifact.metadata, task)  # thr: the candidate's operating point (per task)
    op = operating_point_of(ro.artifact.metadata, task)
    infer = TritonInfer(url, max_retries=2)
    probes = [(b, False) for b in probe_images(ro.artifact)]
    if ro.previous_version is None or task:
        # a new model/product or a MoLE-Flow adapter: the serving model may never see (or route) its frames
        # yet, so the shipped probe images are enough evidence; do not idle until the timeout waiting for
        # live traffic that may not come (live frames of its own product still count when they do)
        pol = dataclasses.replace(pol, shadow_frames=min(pol.shadow_frames, max(len(probes), pol.min_frames)))
    t0 = time.monotonic()
    s = ro.stats
    try:
        await infer.refresh()
        while True:
            items = []
            while probes and len(items) < pol.batch:
                items.append(probes.pop(0))
            while ro.queue and len(items) < pol.batch:
                items.append(ro.queue.popleft())
            if items:
                good = [not f for _, f in items]
                try:
                    x = np.stack([to_pixels(decode_image(b), spec) for b, _ in items])
                    out = await infer.infer(ro.candidate, x, [task] * len(items) if task else None)
                    sc = out.scores.astype(np.float64)
                    s.frames += len(items)
                    s.scores.extend(float(v) for v, g in zip(sc, good, strict=True) if g)
                    s.flagged_good += int(sum(1 for v, g in zip(sc, good, strict=True) if g and op.is_anomaly(v)))
                    if on_result is not None:
                        for v in sc:
                            await on_result({"model": ro.candidate, "model_version": str(ro.version),
                                             "score": float(v), "threshold": thr,
                                             "score_normalized": op.normalised(float(v)),
                                             "is_anomaly": op.is_anomaly(float(v)), "shadow": True})
                except Exception as e:  # a candidate error is evidence, not a crash
                    s.errors += len(items)
                    s.last_error = f"{type(e).__name__}: {e}"
            d = decide(s, cal, thr, pol, timed_out=time.monotonic() - t0 > pol.shadow_timeout_s)
            if d.action != "wait":
                return d
            if not items:
                await asyncio.sleep(0.1)
    finally:
        await infer.close()
