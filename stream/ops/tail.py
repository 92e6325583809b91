"""Pretty-print inspection results (and optionally defect events / DLQ records) as they arrive."""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer

from contracts.config import Settings
from contracts.envelope import EnvelopeError, decode_result, dlq_reason, headers_to_dict
from stream.kafka.clients import client_kwargs
from stream.kafka.codecs import require_codecs

_RED, _GREEN, _YELLOW, _RESET = "\033[31m", "\033[32m", "\033[33m", "\033[0m"


def format_result(value: bytes, color: bool = False) -> str:
    try:
        r = decode_result(value)
    except EnvelopeError as e:
        return f"<undecodable result: {e}>"
    flag = "ANOMALY" if r.is_anomaly else "ok"
    if color:
        flag = f"{_RED if r.is_anomaly else _GREEN}{flag:7s}{_RESET}"
    gt = f" gt={r.gt_label}{'/' + r.gt_defect if r.gt_defect else ''}" if r.gt_label else ""
    routed = f" (routed d={r.route_distance:.2f})" if r.routed and r.route_distance is not None else ""
    task = f" task={r.task or '-'}{routed}"
    lat = r.latency_ms
    # the normalised score (0.5 = threshold) first; the raw score and threshold after it
    sc = (f"score={r.score_normalized:.2f} (thr 0.5) raw={r.score:.4g} thr={r.threshold:.4g}"
          if r.score_normalized is not None else f"score={r.score:9.4f} thr={r.threshold:.4f}")
    warm = " warmup" if r.warmup else ""
    return (f"{time.strftime('%H:%M:%S', time.localtime(r.processed_ts_ms / 1000 or time.time()))} "
            f"{r.camera:<10s} {r.frame_id[:12]:<12s} {flag:7s} {sc}{warm} "
            f"{r.model}:v{r.model_version}{task} infer={lat.get('infer', 0):.1f}ms e2e={lat.get('e2e', 0):.1f}ms{gt}")


def format_dlq(headers, color: bool = False) -> str:
    reason, detail = dlq_reason(headers)
    h = headers_to_dict(headers)
    fid = h.get("frame_id", b"?").decode("utf-8", "replace")
    cam = h.get("camera_id", b"?").decode("utf-8", "replace")
    tag = f"{_YELLOW}DLQ{_RESET}" if color else "DLQ"
    return f"{tag} {cam:<10s} {fid[:12]:<12s} {reason}: {detail}"


async def tail(bootstrap: str, *, results_topic: str = "inspection-results", dlq_topic: str | None = "frames-dlq",
               defects_topic: str | None = None, from_beginning: bool = False, limit: int | None = None,
               as_json: bool = False, timeout_s: float | None = None, out=sys.stdout,
               settings: Settings | None = None) -> int:
    require_codecs()
    topics = [t for t in (results_topic, dlq_topic, defects_topic) if t]
    c = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest" if from_beginning else "latest", **client_kwargs("consumer", settings))
    await c.start()
    color = out.isatty() if hasattr(out, "isatty") else False
    n = 0
    t0 = time.monotonic()
    try:
        while limit is None or n < limit:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                break
            batch = await c.getmany(timeout_ms=500)
            for tp, recs in batch.items():
                for r in recs:
                    if as_json:
                        d = {"topic": tp.topic, "key": (r.key or b"").decode("utf-8", "replace")}
                        if tp.topic == dlq_topic:
                            d["headers"] = {k: v.decode("utf-8", "replace") for k, v in headers_to_dict(r.headers).items()}
                            d["value_bytes"] = len(r.value or b"")
                        else:
                            d["value"] = orjson.loads(r.value)
                            d["value"].pop("heatmap_png_b64", None)
                        line = orjson.dumps(d).decode()
                    elif tp.topic == dlq_topic:
                        line = format_dlq(r.headers, color)
                    elif tp.topic == defects_topic:
                        d = orjson.loads(r.value)
                        line = f"DEFECT {d.get('camera')} {d.get('frame_id', '')[:12]} boxes={len(d.get('boxes', []))}"
                    else:
                        line = format_result(r.value, color)
                    print(line, file=out, flush=True)
                    n += 1
                    if limit is not None and n >= limit:
                        return n
    finally:
        await c.stop()
    return n


def run(bootstrap: str, **kw) -> int:
    try:
        return asyncio.run(tail(bootstrap, **kw))
    except KeyboardInterrupt:
        return 0
