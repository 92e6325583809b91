"""A candidate's shadow window: score probe images and offered live frames, then decide (pure policy).

The candidate (``<model>__candidate``, loaded on every replica) scores (a) the good validation images
shipped with the artifact (``metadata.probe``, only sha-verified files) and (b) the live frames queued
on the rollout by :meth:`stream.lifecycle.controller.RolloutController.offer`. Each round feeds
:func:`stream.lifecycle.policy.decide` with the window's clock (:class:`stream.lifecycle.policy.Window`: a product
nothing serves yet is judged on its probes; a served one on an idle line waits for traffic, up to a deadline);
a candidate inference error is evidence, never a crash.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from contracts.artifact import Artifact
from contracts.image import decode_image
from contracts.operating_point import operating_point_of
from contracts.spec import parse_spec, to_pixels
from stream.inference.triton_client import TritonInfer
from stream.lifecycle.policy import Decision, HealthPolicy, Window, calibration_of, decide

OnShadow = Callable[[dict[str, Any]], Awaitable[None]] | None
OnWaiting = Callable[[Any, Decision], Awaitable[None]] | None


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


async def run_shadow(ro, task: str | None, url: str, policy: HealthPolicy, on_result: OnShadow,
                     on_waiting: OnWaiting = None) -> Decision:
    """Score until :func:`decide` returns promote or roll back (``ro`` is the controller's Rollout). The window's
    rule (stream/lifecycle/policy.py) follows ``ro.new_product``; ``on_waiting`` is awaited once when a served
    product's candidate starts waiting for traffic (an idle line)."""
    pol = policy
    spec = parse_spec(ro.artifact.metadata)
    cal, thr = calibration_of(ro.artifact.metadata, task)  # thr: the candidate's operating point (per task)
    op = operating_point_of(ro.artifact.metadata, task)
    infer = TritonInfer(url, max_retries=2)
    probes = [(b, False) for b in probe_images(ro.artifact)]
    n_probes = len(probes)
    t0 = time.monotonic()
    t_live: float | None = None  # the first live frame
    s = ro.stats
    try:
        await infer.refresh()
        while True:
            items, live = [], 0
            while probes and len(items) < pol.batch:
                items.append(probes.pop(0))
            while ro.queue and len(items) < pol.batch:
                items.append(ro.queue.popleft())
                live += 1
            if live and t_live is None:
                t_live = time.monotonic()
            if items:
                good = [not f for _, f in items]
                try:
                    x = np.stack([to_pixels(decode_image(b), spec) for b, _ in items])
                    out = await infer.infer(ro.candidate, x, [task] * len(items) if task else None)
                    sc = out.scores.astype(np.float64)
                    s.frames += len(items)
                    s.live += live
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
            now = time.monotonic()
            w = Window(new_product=ro.new_product, probes=n_probes, elapsed_s=now - t0,
                       live_s=None if t_live is None else now - t_live)
            d = decide(s, cal, thr, pol, window=w)
            if d.action != "wait":
                return d
            if d.stats.get("waiting_for_traffic") and not ro.waiting:
                ro.waiting = True
                if on_waiting is not None:
                    await on_waiting(ro, d)
            if not items:
                await asyncio.sleep(0.1)
    finally:
        await infer.close()
