"""Throughput and latency of the whole streaming pipeline vs the same model on bare Triton, same run.

pipeline : replay N frames (MVTec bottle test, unthrottled) -> Kafka -> Faust worker (subprocess)
           -> Triton -> results; frames/s = N / (last result - first send); latency = per-frame
           end-to-end (result produced - frame ts) from the results.
bare     : the same JPEG/PNG bytes decoded + preprocessed once, then the exported model called
           directly over Triton gRPC in batches of the worker's batch size (no Kafka, no Faust).
latency  : added latency on loopback, measured without queueing (``paired_latency``): one frame at a
           time, interleaved with the same work done in-process (decode + preprocess + one batch-1
           Triton request) and with a plain aiokafka produce -> fetch of the same bytes (the broker
           leg alone). added p50 = pipeline e2e p50 (result produced - frame timestamp) - bare p50;
           worker overhead = added - broker leg.

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

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.config import process_settings  # noqa: E402
from contracts.envelope import decode_result  # noqa: E402
from contracts.image import decode_image, sniff_image  # noqa: E402
from contracts.spec import parse_spec, to_tensor  # noqa: E402
from devstack.demo import (  # noqa: E402
    find_model,
    load_model,
)
from devstack.stack import LocalStack  # noqa: E402
from devstack.worker_process import WorkerProcess  # noqa: E402
from stream.kafka.clients import ensure_topics, read_topics  # noqa: E402
from stream.ops.replay import replay  # noqa: E402
from stream.sources.inputs import list_images  # noqa: E402

DATA_DIR = process_settings().data_dir  # this script's settings (LINEWATCH_DATA_DIR)


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else None


class BareTriton:
    """The exported model called directly over Triton gRPC (no Kafka, no Faust): its spec from the
    model config, and a batch call with the same inputs the worker sends."""

    def __init__(self, url: str, model: str):
        import tritonclient.grpc as grpcclient

        self.grpc, self.model = grpcclient, model
        self.client = grpcclient.InferenceServerClient(url)
        cfg = self.client.get_model_config(model, as_json=True)["config"]
        self.spec = parse_spec(cfg["parameters"]["linewatch_spec"]["string_value"])
        self.has_task = any(i["name"] == "task" for i in cfg.get("input", []))

    def __call__(self, x: np.ndarray):
        inp = self.grpc.InferInput(self.spec.input.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        ins = [inp]
        if self.has_task:
            t = np.array([[b""]] * len(x), dtype=np.object_)
            ti = self.grpc.InferInput("task", list(t.shape), "BYTES")
            ti.set_data_from_numpy(t)
            ins.append(ti)
        return self.client.infer(self.model, ins)

    def close(self) -> None:
        self.client.close()


def bare_triton(url: str, model: str, blobs: list[bytes], batch: int) -> dict:
    call = BareTriton(url, model)
    spec = call.spec
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
    call.close()
    return {"frames": len(blobs), "fps": len(blobs) / wall, "batch": batch, "request_ms_p50": pct(lat, 50),
            "request_ms_p99": pct(lat, 99), "decode_preprocess_ms_per_frame": float(np.mean(pre_ms)),
            "per_frame_ms_p50": pct(np.array(lat) / batch, 50)}


def paired_latency(boot: str, url: str, model: str, blobs: list[bytes], gap_s: float, workdir: Path,
                   fetch_wait_ms: int | None = None) -> dict:
    """Added latency without queueing, measured as interleaved triples under the same conditions.

    For each frame, in turn and ``gap_s`` apart: (1) bare: decode + preprocess + one batch-1 Triton
    request in this process; (2) broker leg: the same bytes produced to a scratch topic and fetched
    back by a plain aiokafka consumer with the worker's fetch wait (no Faust: what the broker alone
    costs); (3) pipeline: the same bytes as a frame through a batch-1 Faust worker subprocess; its
    e2e (result produced - frame timestamp) comes from the result, and ``delivered`` is when this
    process received the result from Kafka. Interleaving cancels drift in machine load."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from contracts.envelope import Frame, encode_frame, new_frame_id
    from stream.kafka.clients import Producer, client_kwargs

    wait = fetch_wait_ms or process_settings().worker_fetch_max_wait_ms
    fmt = sniff_image(blobs[0])[0]
    bare_call = BareTriton(url, model)

    def bare_one(b: bytes) -> dict:
        t0 = time.perf_counter()
        img = decode_image(b)
        t1 = time.perf_counter()
        x = to_tensor(img, bare_call.spec)[None]
        t2 = time.perf_counter()
        bare_call(x)
        t3 = time.perf_counter()
        return {"bare_ms": (t3 - t0) * 1000, "bare_decode": (t1 - t0) * 1000, "bare_preprocess": (t2 - t1) * 1000,
                "bare_infer": (t3 - t2) * 1000}

    t = {k: f"lat-{uuid.uuid4().hex[:6]}-{k}" for k in ("frames", "results", "defects", "dlq", "probe")}
    asyncio.run(ensure_topics(boot, t.values()))
    w = WorkerProcess(boot, url, workdir, batch_max=1, batch_within=0.0, app_id=f"lw-lat-{uuid.uuid4().hex[:6]}",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"],
                                  "--fetch-max-wait-ms", str(wait)]).start()

    async def run() -> dict:
        cons = {}
        for name in ("results", "probe"):
            cons[name] = AIOKafkaConsumer(bootstrap_servers=boot, enable_auto_commit=False, group_id=None,
                                          fetch_max_wait_ms=wait, **client_kwargs("consumer"))
            await cons[name].start()
            tp = TopicPartition(t[name], 0)
            cons[name].assign([tp])
            await cons[name].seek_to_beginning(tp)

        async def await_record(name: str, match, timeout_s: float = 120.0):
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                for recs in (await cons[name].getmany(timeout_ms=1000)).values():
                    for r in recs:
                        if match(r):
                            return r, time.time() * 1000
            raise TimeoutError(f"no record on {name}")

        rows = []
        async with Producer(boot) as prod:
            for i, b in enumerate([blobs[0], *blobs]):  # the first triple warms every path, not kept
                bare = await asyncio.to_thread(bare_one, b)
                await asyncio.sleep(gap_s)
                ts = time.time() * 1000
                await prod.send_many(t["probe"], [(b"probe", b, [("ts", repr(ts).encode())])])
                r, got = await await_record("probe", lambda r, ts=ts: dict(r.headers).get("ts") == repr(ts).encode())
                leg = got - ts
                await asyncio.sleep(gap_s)
                f = Frame(frame_id=new_frame_id(), camera_id="lat", ts_ms=int(time.time() * 1000), image=b,
                          product="bottle", content_type=f"image/{sniff_image(b)[0]}")
                await prod.send_many(t["frames"], [encode_frame(f)])
                fid = f.frame_id.encode()
                r, got = await await_record("results", lambda r, fid=fid: fid in r.value)
                res = decode_result(r.value)
                if i:
                    rows.append({**bare, "broker_leg_ms": leg, "e2e_ms": res.latency_ms["e2e"],
                                 "delivered_ms": got - f.ts_ms, **{k: res.latency_ms.get(k) for k in
                                                                    ("queue", "decode", "preprocess", "infer", "batch_total")}})
                await asyncio.sleep(gap_s)
        for x in cons.values():
            await x.stop()
        return rows

    try:
        rows = asyncio.run(run())
    finally:
        bare_call.close()
        w.stop()
    col = {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}
    p50 = {k: pct(v, 50) for k, v in col.items()}
    added = p50["e2e_ms"] - p50["bare_ms"]
    return {"frames": len(rows), "gap_s": gap_s, "frame_format": fmt, "batch_max": 1, "fetch_max_wait_ms": wait,
            "frame_bytes_p50": pct([len(b) for b in blobs], 50), "p50_ms": p50,
            "p99_ms": {k: pct(v, 99) for k, v in col.items()},
            "added_p50_ms": added,
            "added_paired_median_ms": pct(col["e2e_ms"] - col["bare_ms"], 50),
            "added_delivered_p50_ms": p50["delivered_ms"] - p50["bare_ms"],
            "broker_leg_p50_ms": p50["broker_leg_ms"],
            "worker_overhead_p50_ms": added - p50["broker_leg_ms"]}


def pipeline(boot: str, url: str, n: int, batch: int, workdir: Path) -> dict:
    t = {k: f"bench-{uuid.uuid4().hex[:6]}-{k}" for k in ("frames", "results", "defects", "dlq")}
    asyncio.run(ensure_topics(boot, t.values()))
    w = WorkerProcess(boot, url, workdir, batch_max=batch, batch_within=0.02, app_id=f"lw-bench-{uuid.uuid4().hex[:6]}",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()
    try:
        # warm-up: one frame through (group join + model spec fetch), not measured
        warm = asyncio.run(replay(boot, DATA_DIR / "mvtec" / "bottle" / "test", topic=t["frames"], fps=0,
                                  product="bottle", limit=1, cameras=["warm"]))
        asyncio.run(read_topics(boot, [t["results"]], until=lambda o: len(o[t["results"]]) >= 1, timeout_s=120))
        test = DATA_DIR / "mvtec" / "bottle" / "test"
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    if out["pipeline"]:
        names = ["bare Triton", "Kafka+Faust pipeline"]
        ax[0].bar(names, [out["bare_triton"]["fps"], out["pipeline"]["fps"]], color=["#888", "#2a7"])
        ax[0].set_ylabel("frames / s")
        ax[0].set_title(f"throughput ({out['model']}, batch {out['batch']}): "
                        f"{out['pipeline_over_bare_fps']:.2f}x")
    else:
        ax[0].set_axis_off()
    # latency: stacked p50 parts per fetch-wait setting (bare work, broker leg, worker overhead)
    labels = [f"{lt['frame_format'].upper()} {lt['frame_bytes_p50'] / 1e3:.0f} KB\nfetch wait {lt['fetch_max_wait_ms']} ms"
              for lt in out["latency"]]
    x = np.arange(len(labels))
    bare = np.array([lt["p50_ms"]["bare_ms"] for lt in out["latency"]])
    leg = np.array([lt["broker_leg_p50_ms"] for lt in out["latency"]])
    over = np.array([lt["worker_overhead_p50_ms"] for lt in out["latency"]])
    ax[1].bar(x, bare, 0.5, label="bare in-process (decode+prep+Triton b1)", color="#888")
    ax[1].bar(x, leg, 0.5, bottom=bare, label="broker leg (aiokafka, no Faust)", color="#d84")
    ax[1].bar(x, over, 0.5, bottom=bare + leg, label="worker overhead", color="#2a7")
    ax[1].set_xticks(x, labels, fontsize=7)
    ax[1].set_ylabel("p50 ms per frame")
    ax[1].set_title("pipeline e2e p50, decomposed")
    ax[1].legend(fontsize=7, loc="lower right")
    added = [lt["added_p50_ms"] for lt in out["latency"]]
    ax[2].bar(x - 0.2, added, 0.4, label="added p50 (e2e - bare)", color="#2a7")
    ax[2].bar(x + 0.2, leg, 0.4, label="broker leg p50", color="#d84")
    ax[2].axhline(10, color="r", ls="--", lw=1, label="target 10 ms")
    ax[2].set_xticks(x, labels, fontsize=7)
    ax[2].set_ylabel("ms")
    ax[2].set_title("added p50 latency vs the broker leg alone")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latency-frames", type=int, default=40)
    ap.add_argument("--latency-gap-s", type=float, default=0.2, help="idle time between the interleaved calls")
    ap.add_argument("--fetch-max-wait-ms", type=int, action="append",
                    help="fetch wait cap of the latency worker and probe consumer (repeat to compare; default: the worker's)")
    ap.add_argument("--latency-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--latency-format", choices=("source", "jpeg"), action="append",
                    help="latency frames as the dataset's files (PNG) and/or re-encoded as JPEG q95, as cameras "
                         "send (repeat to compare; default: source)")
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
            stack = LocalStack(workdir / "stack", Path(a.model_repository))
            stack.start()
            boot, url = stack.kafka_bootstrap, stack.triton_grpc_url
        load_model(url, model, control_key=stack.control_key if stack is not None else None)
        test = DATA_DIR / "mvtec" / "bottle" / "test"
        items = list_images(test)
        blobs = [items[i % len(items)].path.read_bytes() for i in range(a.frames)]
        bare = pipe = None
        if not a.latency_only:
            bare = bare_triton(url, model, blobs, a.batch)
            pipe = pipeline(boot, url, a.frames, a.batch, workdir)
        lat = []
        for fmt in a.latency_format or ["source"]:
            lat_blobs = blobs[: a.latency_frames]
            if fmt == "jpeg":
                lat_blobs = [cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                          [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for b in lat_blobs]
            lat += [paired_latency(boot, url, model, lat_blobs, a.latency_gap_s, workdir, w)
                    for w in (a.fetch_max_wait_ms or [None])]
    finally:
        if stack is not None:
            stack.stop()
    out = {"model": model, "batch": a.batch, "frames": a.frames, "bare_triton": bare, "pipeline": pipe,
           "pipeline_over_bare_fps": pipe["fps"] / bare["fps"] if pipe else None,
           "latency": lat,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (outdir / "pipeline_throughput.json").write_text(json.dumps(out, indent=2))
    plot(out, outdir / "pipeline_throughput.png")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
