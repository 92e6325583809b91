"""Throughput and latency of the whole streaming pipeline vs the same model on bare Triton, same run.

pipeline : replay N frames (MVTec bottle test, unthrottled) -> Kafka -> Faust worker (subprocess)
           -> Triton -> results; frames/s = N / (last result - first send); latency = per-frame
           end-to-end (result produced - frame ts) from the results.
bare     : the same JPEG/PNG bytes decoded + preprocessed once, then the exported model called
           directly over Triton gRPC in batches of the worker's batch size (no Kafka, no Faust).
latency  : added latency on loopback, measured without queueing: a second worker with batch size 1
           gets frames replayed at a low rate (--latency-fps, well below capacity); its per-frame
           end-to-end p50 (result produced - frame timestamp) minus the bare p50 of the same work done
           in-process (decode + preprocess + one batch-1 Triton request) is the pipeline's added p50.

Writes benchmarks/results/pipeline_throughput.json and .png.

    .venv/bin/python benchmarks/pipeline_throughput.py [--frames 120] [--batch 8]
        [--bootstrap H:P --triton H:P]   # use a running stack instead of starting LocalStack
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.demo import (  # noqa: E402
    WorkerProcess,
    close_stack,
    data_dir,
    find_model,
    load_model,
    open_stack,
)
from stream.envelope import decode_result  # noqa: E402
from stream.preprocess import decode_image, parse_spec, to_tensor  # noqa: E402
from stream.publish import ensure_topics, read_topics  # noqa: E402
from stream.replay import list_images, replay  # noqa: E402


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else None


def bare_triton(url: str, model: str, blobs: list[bytes], batch: int) -> dict:
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    c = grpcclient.InferenceServerClient(url)
    cfg = c.get_model_config(model, as_json=True)["config"]
    spec = parse_spec(cfg["parameters"]["linewatch_spec"]["string_value"])
    has_task = any(i["name"] == "task" for i in cfg.get("input", []))

    def call(x):
        inp = grpcclient.InferInput(spec.input.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        ins = [inp]
        if has_task:
            t = np.array([[b""]] * len(x), dtype=np.object_)
            ti = grpcclient.InferInput("task", list(t.shape), "BYTES")
            ti.set_data_from_numpy(t)
            ins.append(ti)
        return c.infer(model, ins)

    x0 = np.stack([to_tensor(decode_image(blobs[0]), spec)] * min(batch, len(blobs)))
    call(x0)  # warm-up
    lat, t0 = [], time.perf_counter()
    pre_ms = []
    for s in range(0, len(blobs), batch):
        tp = time.perf_counter()
        x = np.stack([to_tensor(decode_image(b), spec) for b in blobs[s:s + batch]])
        pre_ms.append((time.perf_counter() - tp) * 1000 / len(x))
        ti = time.perf_counter()
        call(x)
        lat.append((time.perf_counter() - ti) * 1000)
    wall = time.perf_counter() - t0
    c.close()
    return {"frames": len(blobs), "fps": len(blobs) / wall, "batch": batch, "request_ms_p50": pct(lat, 50),
            "request_ms_p99": pct(lat, 99), "decode_preprocess_ms_per_frame": float(np.mean(pre_ms)),
            "per_frame_ms_p50": pct(np.array(lat) / batch, 50)}


def bare_b1_latency(url: str, model: str, blobs: list[bytes]) -> dict:
    """Per-frame decode + preprocess + batch-1 Triton request, in-process (the work the worker does)."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    c = grpcclient.InferenceServerClient(url)
    cfg = c.get_model_config(model, as_json=True)["config"]
    spec = parse_spec(cfg["parameters"]["linewatch_spec"]["string_value"])
    has_task = any(i["name"] == "task" for i in cfg.get("input", []))

    def one(b: bytes):
        x = to_tensor(decode_image(b), spec)[None]
        inp = grpcclient.InferInput(spec.input.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        ins = [inp]
        if has_task:
            ti = grpcclient.InferInput("task", [1, 1], "BYTES")
            ti.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
            ins.append(ti)
        return c.infer(model, ins)

    one(blobs[0])
    lat = []
    for b in blobs:
        t = time.perf_counter()
        one(b)
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(0.05)  # same idle gaps as the throttled stream (no back-to-back CPU contention)
    c.close()
    return {"frames": len(blobs), "ms_p50": pct(lat, 50), "ms_p99": pct(lat, 99)}


def pipeline_latency(boot: str, url: str, n: int, fps: float, workdir: Path, fetch_wait_ms: int | None = None) -> dict:
    """Throttled replay through a batch-1 worker: e2e latency with no queueing behind other frames."""
    t = {k: f"lat-{uuid.uuid4().hex[:6]}-{k}" for k in ("frames", "results", "defects", "dlq")}
    asyncio.run(ensure_topics(boot, t.values()))
    w = WorkerProcess(boot, url, workdir, batch_max=1, batch_within=0.0, app_id=f"lw-lat-{uuid.uuid4().hex[:6]}",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"],
                                  *(["--fetch-max-wait-ms", str(fetch_wait_ms)] if fetch_wait_ms else [])]).start()
    test = data_dir() / "mvtec" / "bottle" / "test"
    try:
        warm = asyncio.run(replay(boot, test, topic=t["frames"], fps=0, product="bottle", limit=1, cameras=["warm"]))
        asyncio.run(read_topics(boot, [t["results"]], until=lambda o: len(o[t["results"]]) >= 1, timeout_s=120))
        sent = asyncio.run(replay(boot, test, topic=t["frames"], fps=fps, product="bottle", cameras=["lat"],
                                  limit=n))
        ids = {x.frame_id for x in sent}
        recs = asyncio.run(read_topics(boot, [t["results"], t["dlq"]], timeout_s=300,
                                       until=lambda o: len(o[t["results"]]) + len(o[t["dlq"]]) >= len(ids) + len(warm)))
        res = [r for r in (decode_result(v.value) for v in recs[t["results"]]) if r.frame_id in ids]
        e2e = np.array([r.latency_ms["e2e"] for r in res])
        stages = {k: pct([r.latency_ms.get(k, np.nan) for r in res], 50)
                  for k in ("decode", "preprocess", "queue", "infer", "batch_total")}
        return {"frames": len(sent), "results": len(res), "fps": fps, "batch_max": 1,
                "fetch_max_wait_ms": fetch_wait_ms or "worker default", "e2e_ms_p50": pct(e2e, 50),
                "e2e_ms_p99": pct(e2e, 99), "worker_stage_ms_p50": stages}
    finally:
        w.stop()


def pipeline(boot: str, url: str, n: int, batch: int, workdir: Path) -> dict:
    t = {k: f"bench-{uuid.uuid4().hex[:6]}-{k}" for k in ("frames", "results", "defects", "dlq")}
    asyncio.run(ensure_topics(boot, t.values()))
    w = WorkerProcess(boot, url, workdir, batch_max=batch, batch_within=0.02, app_id=f"lw-bench-{uuid.uuid4().hex[:6]}",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()
    try:
        # warm-up: one frame through (group join + model spec fetch), not measured
        warm = asyncio.run(replay(boot, data_dir() / "mvtec" / "bottle" / "test", topic=t["frames"], fps=0,
                                  product="bottle", limit=1, cameras=["warm"]))
        asyncio.run(read_topics(boot, [t["results"]], until=lambda o: len(o[t["results"]]) >= 1, timeout_s=120))
        test = data_dir() / "mvtec" / "bottle" / "test"
        loops = max(1, -(-n // len(list_images(test))))

        async def go():
            t0 = time.time()
            sent = await replay(boot, test, topic=t["frames"], fps=0, product="bottle", loops=loops, cameras=["bench"],
                                limit=min(n, len(list_images(test))))
            ids = {s.frame_id for s in sent}
            recs = await read_topics(boot, [t["results"], t["dlq"]], timeout_s=600,
                                     until=lambda o: len(o[t["results"]]) + len(o[t["dlq"]]) >= len(ids) + len(warm))
            return t0, sent, recs

        t0, sent, recs = asyncio.run(go())
        ids = {s.frame_id for s in sent}
        res = [decode_result(r.value) for r in recs[t["results"]]]
        res = [r for r in res if r.frame_id in ids]
        t_last = max(r.processed_ts_ms for r in res) / 1000
        e2e = np.array([r.latency_ms["e2e"] for r in res])
        infer = np.array([r.latency_ms["infer"] for r in res])
        return {"frames": len(sent), "results": len(res), "dlq": len(recs[t["dlq"]]), "fps": len(res) / (t_last - t0),
                "e2e_ms_p50": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99), "infer_ms_p50": pct(infer, 50),
                "note": "unthrottled replay: e2e includes time queued in Kafka behind earlier frames"}
    finally:
        w.stop()


def plot(out: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    names = ["bare Triton", "Kafka+Faust pipeline"]
    fps = [out["bare_triton"]["fps"], out["pipeline"]["fps"]]
    ax[0].bar(names, fps, color=["#888", "#2a7"])
    ax[0].set_ylabel("frames / s")
    ax[0].set_title(f"throughput ({out['model']}, batch {out['batch']})")
    lat = [out["bare_triton"]["request_ms_p50"], out["pipeline"]["e2e_ms_p50"]]
    lat99 = [out["bare_triton"]["request_ms_p99"], out["pipeline"]["e2e_ms_p99"]]
    x = np.arange(2)
    ax[1].bar(x - 0.2, lat, 0.4, label="p50")
    ax[1].bar(x + 0.2, lat99, 0.4, label="p99")
    ax[1].set_xticks(x, ["bare: per request", "pipeline: e2e/frame"])
    ax[1].set_ylabel("ms")
    ax[1].set_yscale("log")
    ax[1].legend()
    ax[1].set_title("latency")
    lt = out["latency"]
    ax[2].bar(["bare in-process\n(batch 1)", f"pipeline\n({lt['pipeline_throttled']['fps']:g} fps, batch 1)"],
              [lt["bare_batch1"]["ms_p50"], lt["pipeline_throttled"]["e2e_ms_p50"]], color=["#888", "#2a7"])
    ax[2].set_ylabel("p50 ms per frame")
    ax[2].set_title(f"added p50 latency: {lt['added_p50_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latency-frames", type=int, default=40)
    ap.add_argument("--latency-fps", type=float, default=2.0)
    ap.add_argument("--fetch-max-wait-ms", type=int, help="the latency worker's fetch wait cap")
    ap.add_argument("--bootstrap")
    ap.add_argument("--triton")
    ap.add_argument("--model", help="Triton model name (default: the bottle model in triton_repo/)")
    ap.add_argument("--model-repository", default=str(ROOT / "triton_repo"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / ".stack" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    stack = None
    model = a.model or find_model(Path(a.model_repository))
    if model is None:
        print("error: no exported bottle model in triton_repo/ (run `make demo` or the models CLI export)", file=sys.stderr)
        return 2
    try:
        if a.bootstrap and a.triton:
            boot, url = a.bootstrap, a.triton
        else:
            stack = open_stack(workdir / "stack", Path(a.model_repository))
            boot, url = stack.kafka_bootstrap, stack.triton_grpc_url
        load_model(url, model)
        test = data_dir() / "mvtec" / "bottle" / "test"
        items = list_images(test)
        blobs = [items[i % len(items)].path.read_bytes() for i in range(a.frames)]
        bare = bare_triton(url, model, blobs, a.batch)
        pipe = pipeline(boot, url, a.frames, a.batch, workdir)
        bare1 = bare_b1_latency(url, model, blobs[: a.latency_frames])
        lat = pipeline_latency(boot, url, a.latency_frames, a.latency_fps, workdir, a.fetch_max_wait_ms)
    finally:
        if stack is not None:
            close_stack(stack)
    out = {"model": model, "batch": a.batch, "frames": a.frames, "bare_triton": bare, "pipeline": pipe,
           "pipeline_over_bare_fps": pipe["fps"] / bare["fps"],
           "latency": {"bare_batch1": bare1, "pipeline_throttled": lat,
                       "added_p50_ms": lat["e2e_ms_p50"] - bare1["ms_p50"]},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (outdir / "pipeline_throughput.json").write_text(json.dumps(out, indent=2))
    plot(out, outdir / "pipeline_throughput.png")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
