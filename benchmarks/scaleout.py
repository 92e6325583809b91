"""Scale-out: frames/s with 1, 2, 3 Faust workers in one consumer group, and how long a new worker takes load.

One LocalStack (real Tansu broker + tritonserver). For each workload and each K, fresh topics (frames with
``--partitions`` partitions, keyed by camera; the cameras are chosen so that every partition gets the same
number of them), a backlog of N frames published first, then K workers (same ``--app-id``: one consumer
group) started at once. Steady frames/s = result records that arrived after every worker had produced its
first result / (last result - that moment): worker start-up and group joins are excluded. Scaling
efficiency = fps(K) / (K * fps(1)). ``linewatch account`` proves nothing was lost (and counts duplicates).

Workloads:
  decode   : MVTec bottle test images upscaled to --side x --side, JPEG --quality; the probe detector
             (tests/harness/probe_model.py, --probe-size input, --probe-delay-ms per batch): the worker's
             decode + preprocess dominate.
  moleflow : the real MoLE-Flow model (a tiny schedule trained here, or --moleflow-dir), the MVTec bottle
             test PNGs as they are: the model dominates.

Take load (decode workload): one worker consumes a steady line (tests/harness/chaos.py Feeder at
--feed-fps, default 1.5 x fps(1)); a second one is started and its /metrics polled: process start ->
first frame taken (the group rebalanced and gave it partitions) -> first result.

Writes benchmarks/results/scaleout.json and scaleout.png.

    .venv/bin/python benchmarks/scaleout.py [--workloads decode,moleflow] [--workers 1,2,3] [--frames 900]
        [--moleflow-frames 300] [--moleflow-dir triton_repo/moleflow] [--no-take-load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import bottle_test_dir, command, git_state, machine, require_model_dir  # noqa: E402
from contracts.config import Settings  # noqa: E402
from contracts.envelope import Frame, encode_frame, new_frame_id  # noqa: E402
from devstack.stack import LocalStack  # noqa: E402
from devstack.worker_process import WorkerProcess  # noqa: E402
from stream.kafka.clients import Producer, ensure_topics  # noqa: E402
from stream.ops.accounting import account  # noqa: E402
from stream.sources.inputs import list_images  # noqa: E402
from tests.harness.chaos import Feeder, ResultWatch, scrape_metrics  # noqa: E402
from tests.harness.probe_model import write_probe_model  # noqa: E402
from tests.harness.streams import tiny_moleflow, topics  # noqa: E402
from tests.harness.topology import cameras_for_partitions  # noqa: E402

DATA_DIR = Settings().data_dir  # this script's settings (LINEWATCH_DATA_DIR)
WORKLOADS = ("decode", "moleflow")
RESULTS, FRAMES_IN = "linewatch_results_out_total", "linewatch_frames_in_total"
MOLEFLOW = "moleflow_scaleout"


def say(msg: str) -> None:
    print(msg, flush=True)


def large_jpegs(folder: Path, count: int, side: int, quality: int) -> list[bytes]:
    """MVTec images (good and defect, interleaved) upscaled to side x side and JPEG-encoded."""
    items = list_images(folder)
    step = max(1, len(items) // count)
    out = []
    for it in items[::step][:count]:
        img = cv2.resize(cv2.imread(str(it.path), cv2.IMREAD_COLOR), (side, side), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"could not JPEG-encode {it.path}")
        out.append(buf.tobytes())
    return out


def publish(boot: str, topic: str, images: list[bytes], n: int, cameras: tuple[str, ...], ctype: str) -> None:
    async def go():
        async with Producer(boot) as p:
            for s in range(0, n, 24):
                await p.send_many(topic, [encode_frame(Frame(
                    frame_id=new_frame_id(), camera_id=cameras[i % len(cameras)], ts_ms=int(time.time() * 1000),
                    image=images[i % len(images)], product="bottle", content_type=ctype))
                    for i in range(s, min(n, s + 24))])

    asyncio.run(go())


def fresh_topics(boot: str, prefix: str, partitions: int) -> dict[str, str]:
    t = topics(f"{prefix}-{uuid.uuid4().hex[:6]}")
    asyncio.run(ensure_topics(boot, [t["frames"]], partitions=partitions))
    asyncio.run(ensure_topics(boot, [t["results"], t["defects"], t["dlq"]], partitions=1))
    return t


def make_worker(stack: LocalStack, t: dict, work: Path, model: str, a, app_id: str, name: str) -> WorkerProcess:
    env = {"LINEWATCH_JPEG_REDUCED_DECODE": "true" if a.jpeg_reduced else "false"}
    return WorkerProcess(stack.kafka_bootstrap, stack.triton_grpc_url, work, app_id=app_id, batch_max=a.batch,
                         batch_within=0.05, log_path=work / f"{name}.log", env=env,
                         extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                     "--defects-topic", t["defects"], "--dlq-topic", t["dlq"],
                                     "--routing", json.dumps({"products": {"bottle": model}})])


def _check_alive(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if not w.alive():
            raise RuntimeError(f"worker exited ({w.proc.returncode}); log: {w.log_path.read_text(errors='replace')[-2000:]}")


def run_scale(stack: LocalStack, work: Path, workload: str, images: list[bytes], ctype: str, k: int, n: int,
              model: str, a) -> dict:
    """K workers on a backlog of n frames: the steady frames/s once all K produce results, and the accounting."""
    boot = stack.kafka_bootstrap
    t = fresh_topics(boot, f"so-{workload}-k{k}", a.partitions)
    tp = time.monotonic()
    publish(boot, t["frames"], images, n, a.cams, ctype)
    say(f"    backlog of {n} frames published in {time.monotonic() - tp:.1f}s")
    watch = ResultWatch(boot, t["results"])
    watch.start()
    watch.ready.wait(30)
    app = f"lw-so-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    ws = [make_worker(stack, t, work, model, a, app, f"{workload}-k{k}-w{i}").start() for i in range(k)]
    first: list[float | None] = [None] * k
    cpu: list[tuple[float, float]] = []  # (when, % of all cores busy since the previous sample)
    psutil.cpu_percent(None)
    try:
        while len(watch.arrivals) < n:
            if time.monotonic() - t0 > a.timeout_s:
                raise RuntimeError(f"{workload} K={k}: {len(watch.arrivals)}/{n} results after {a.timeout_s}s")
            _check_alive(ws)
            for i, w in enumerate(ws):
                if first[i] is None and scrape_metrics(w.web_port, 1.0).get(RESULTS, 0) > 0:
                    first[i] = time.monotonic()
            time.sleep(0.1)
            cpu.append((time.monotonic(), psutil.cpu_percent(None)))
        rep, per_worker = _settle(boot, t, ws, a)
    finally:
        for w in ws:
            w.stop()
        watch.stop()
    arr = sorted(watch.arrivals)
    t_last = arr[-1]
    window = "all workers active"
    t_a = max(first) if all(x is not None for x in first) else None
    count = sum(x > t_a for x in arr) if t_a is not None else 0
    if t_a is None or count < max(2 * a.batch, n // 5) or t_last - t_a < 1.0:
        window, t_a, count = "first result on (too few results after all workers were active)", arr[0], len(arr) - 1
    secs = t_last - t_a
    busy = [c for when, c in cpu if t_a < when <= t_last + 0.2]
    return {"workload": workload, "workers": k, "frames": n, "results_in_window": count, "seconds": round(secs, 2),
            "fps": round(count / secs, 2) if secs > 0 else None, "window": window,
            "cpu_busy_pct": round(sum(busy) / len(busy), 1) if busy else None,
            "first_result_s": round(arr[0] - t0, 2),
            "all_active_s": round(max(first) - t0, 2) if all(x is not None for x in first) else None,
            "total_s": round(t_last - t0, 2), "per_worker_results": per_worker, "lost": len(rep.missing),
            "duplicated": rep.duplicate_results, "dlq": rep.dlq, "complete": rep.complete}


def _settle(boot: str, t: dict, ws: list[WorkerProcess], a):
    """Account for every frame (waiting up to --settle-s), then each worker's results counter."""
    rep = asyncio.run(account(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"],
                              wait_s=a.settle_s))
    return rep, [int(scrape_metrics(w.web_port).get(RESULTS, 0)) for w in ws]


def _rate(arrivals: list[float], lo: float, hi: float) -> float | None:
    return round(sum(lo <= x < hi for x in arrivals) / (hi - lo), 2) if hi > lo else None


def run_take_load(stack: LocalStack, work: Path, images: list[bytes], model: str, rate: float, a) -> dict:
    """One worker on a steady line at ``rate``; start a second, time its web/metrics, first frame, first result."""
    boot = stack.kafka_bootstrap
    t = fresh_topics(boot, "so-takeload", a.partitions)
    app = f"lw-so-{uuid.uuid4().hex[:6]}"
    watch = ResultWatch(boot, t["results"])
    watch.start()
    watch.ready.wait(30)
    feeder = Feeder(boot, t["frames"], images, n=int(rate * 600), fps=rate, cameras=a.cams)  # stopped below
    ws = [make_worker(stack, t, work, model, a, app, "takeload-w0").start()]
    ev: dict[str, float] = {}
    try:
        feeder.start()
        t0 = time.monotonic()
        while not watch.arrivals:
            if feeder.error or time.monotonic() - t0 > a.timeout_s:
                raise RuntimeError(f"no result from the first worker (feeder error {feeder.error!r})")
            _check_alive(ws)
            time.sleep(0.1)
        t_one = time.monotonic() + 2.0  # worker 1's own start-up backlog drained a little first
        time.sleep(2.0 + a.phase_s)
        tb = time.monotonic()
        ws.append(make_worker(stack, t, work, model, a, app, "takeload-w1").start())
        while "first_result" not in ev:
            if time.monotonic() - tb > a.timeout_s:
                raise RuntimeError(f"second worker took no load within {a.timeout_s}s")
            _check_alive(ws)
            m = scrape_metrics(ws[1].web_port, 1.0)
            now = time.monotonic()
            if m:
                ev.setdefault("metrics_up", now)
            if m.get(FRAMES_IN, 0) > 0:
                ev.setdefault("first_frame", now)
            if m.get(RESULTS, 0) > 0:
                ev.setdefault("first_frame", now)
                ev["first_result"] = now
            time.sleep(0.05)
        time.sleep(1.0 + a.phase_s)
        t_end = time.monotonic()
        feeder.stop()
        rep, per_worker = _settle(boot, t, ws, a)
    finally:
        for w in ws:
            w.stop()
        feeder.stop()
        watch.stop()
    arr = list(watch.arrivals)
    return {"feed_fps": round(rate, 2), "frames_sent": len(feeder.sent),
            "start_to_metrics_s": round(ev["metrics_up"] - tb, 2) if "metrics_up" in ev else None,
            "start_to_first_frame_s": round(ev["first_frame"] - tb, 2),
            "start_to_first_result_s": round(ev["first_result"] - tb, 2),
            "fps_one_worker": _rate(arr, t_one, tb), "fps_two_workers": _rate(arr, ev["first_result"] + 1.0, t_end),
            "per_worker_results": per_worker, "lost": len(rep.missing), "duplicated": rep.duplicate_results,
            "dlq": rep.dlq, "complete": rep.complete}


def add_efficiency(rows: list[dict]) -> None:
    for wl in {r["workload"] for r in rows}:
        base = next((r["fps"] for r in rows if r["workload"] == wl and r["workers"] == 1), None)
        for r in rows:
            if r["workload"] == wl:
                ok = base and r["fps"]
                r["speedup"] = round(r["fps"] / base, 3) if ok else None
                r["efficiency"] = round(r["fps"] / (r["workers"] * base), 3) if ok else None


def plot(path: Path, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 4.2), squeeze=False)
    for ax, wl in zip(axes[0], wls, strict=True):
        rs = sorted((r for r in rows if r["workload"] == wl and r["fps"]), key=lambda r: r["workers"])
        ks = [r["workers"] for r in rs]
        ax.plot(ks, [r["fps"] for r in rs], "o-", label="measured")
        base = next((r["fps"] for r in rs if r["workers"] == 1), None)
        if base:
            ax.plot(ks, [k * base for k in ks], "--", color="gray", label="ideal (K x fps(1))")
        for r in rs:
            if r.get("efficiency") is not None:
                ax.annotate(f"{r['fps']:.1f} fps\n{r['efficiency']:.0%}", (r["workers"], r["fps"]),
                            textcoords="offset points", xytext=(6, -22), fontsize=8)
        ax.set_title(f"{wl}: {meta['workloads'][wl]['model']}", fontsize=8)
        ax.set(xlabel="workers (one consumer group)", ylabel="frames/s (steady)", xticks=ks,
               xlim=(min(ks) - 0.3, max(ks) + 0.6))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"linewatch scale-out, {meta['machine']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/scaleout.py", usage="%(prog)s [options] (see --help)",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="decode,moleflow", help=f"comma list from {','.join(WORKLOADS)}")
    ap.add_argument("--workers", default="1,2,3", help="comma list of worker counts (K)")
    ap.add_argument("--frames", type=int, default=900, help="decode workload: backlog frames per K")
    ap.add_argument("--moleflow-frames", type=int, default=300, help="moleflow workload: backlog frames per K")
    ap.add_argument("--side", type=int, default=2048, help="decode workload: JPEG side (pixels)")
    ap.add_argument("--quality", type=int, default=90, help="decode workload: JPEG quality")
    ap.add_argument("--images", type=int, default=16, help="distinct source images cycled")
    ap.add_argument("--probe-size", type=int, default=224, help="probe detector input side")
    ap.add_argument("--probe-delay-ms", type=int, default=5, help="probe detector time per batch")
    ap.add_argument("--jpeg-reduced", action=argparse.BooleanOptionalAction, default=True,
                    help="workers decode large JPEGs at 1/2..1/8 scale (the production default)")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--cameras", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="worker --batch-max")
    ap.add_argument("--moleflow-dir", help="an exported Triton MoLE-Flow model dir (else a tiny one is trained)")
    ap.add_argument("--take-load", action=argparse.BooleanOptionalAction, default=True,
                    help="measure how long a second worker takes to take load (decode workload)")
    ap.add_argument("--feed-fps", type=float, default=0.0, help="take-load line rate (0: 1.5 x decode fps(1))")
    ap.add_argument("--phase-s", type=float, default=8.0, help="take-load: seconds measured before/after")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    ap.add_argument("--settle-s", type=float, default=120.0, help="accounting: wait this long for missing frames")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    wls = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if not wls or any(w not in WORKLOADS for w in wls):
        ap.error(f"--workloads {a.workloads!r}: choose from {', '.join(WORKLOADS)}")
    try:
        ks = sorted({int(k) for k in a.workers.split(",") if k.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1 or ks[-1] > a.partitions:
        ap.error(f"--workers {a.workers!r}: comma list of integers from 1 to --partitions ({a.partitions})")
    if min(a.frames, a.moleflow_frames) < 10 or a.side < 64 or not 1 <= a.quality <= 100 or a.images < 1:
        ap.error("--frames/--moleflow-frames must be >= 10, --side >= 64, --quality 1..100, --images >= 1")
    if min(a.partitions, a.cameras, a.batch, a.probe_size) < 1 or a.cameras < a.partitions or a.phase_s <= 0:
        ap.error("--partitions, --batch, --probe-size must be >= 1, --cameras >= --partitions, --phase-s > 0")
    if a.feed_fps < 0 or a.timeout_s <= 0 or a.settle_s < 0 or a.probe_delay_ms < 0:
        ap.error("--feed-fps, --settle-s, --probe-delay-ms must be >= 0 and --timeout-s > 0")
    require_model_dir(ap, "--moleflow-dir", a.moleflow_dir)
    test_dir = bottle_test_dir(DATA_DIR)
    if test_dir is None:
        return 2
    a.cams = cameras_for_partitions(a.partitions, per_partition=-(-a.cameras // a.partitions))[:a.cameras]
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_wall = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="lw-scaleout-"))
    repo, work = root / "model_repository", root / "work"
    probe = write_probe_model(repo, size=a.probe_size, delay_ms=a.probe_delay_ms, max_batch=a.batch)
    workloads: dict[str, dict] = {}
    rows: list[dict] = []
    take = None
    stack = LocalStack(root / "stack", repo, load_models=[probe], start_timeout_s=120)
    stack.start()
    try:
        for wl in wls:
            if wl == "decode":
                images, ctype, n, model = large_jpegs(test_dir, a.images, a.side, a.quality), "image/jpeg", a.frames, probe
                workloads[wl] = {"model": f"{probe} (probe detector, {a.probe_size}x{a.probe_size} input, "
                                          f"{a.probe_delay_ms} ms per batch)",
                                 "frames": f"MVTec bottle test upscaled to {a.side}x{a.side}, JPEG q{a.quality}",
                                 "jpeg_bytes_mean": int(sum(map(len, images)) / len(images)),
                                 "jpeg_reduced_decode": a.jpeg_reduced, "frames_per_k": n}
            else:
                tm = time.monotonic()
                if a.moleflow_dir:
                    model = Path(a.moleflow_dir).name
                    shutil.copytree(a.moleflow_dir, repo / model)
                else:
                    say("--- moleflow: training a tiny-schedule MoLE-Flow (8 images, 1 epoch) and exporting it")
                    model = tiny_moleflow(DATA_DIR, root / "moleflow-store", repo, MOLEFLOW)
                stack.load_model(model, timeout_s=600)
                say(f"    {model} ready in Triton after {time.monotonic() - tm:.0f}s")
                items = list_images(test_dir)
                images = [it.path.read_bytes() for it in items[:: max(1, len(items) // a.images)][: a.images]]
                ctype, n = "image/png", a.moleflow_frames
                workloads[wl] = {"model": model + ("" if a.moleflow_dir else " (MoLE-Flow, tiny schedule)"),
                                 "frames": "MVTec bottle test PNGs (900x900) as they are", "frames_per_k": n}
            for k in ks:
                say(f"--- {wl}: K={k} worker(s), {n} frames")
                r = run_scale(stack, work, wl, images, ctype, k, n, model, a)
                rows.append(r)
                say(f"    fps={r['fps']} over {r['seconds']}s ({r['results_in_window']} results, {r['window']}); "
                    f"CPU busy {r['cpu_busy_pct']}% of {os.cpu_count()}; first result {r['first_result_s']}s, "
                    f"all active {r['all_active_s']}s; per worker {r['per_worker_results']}; lost={r['lost']} "
                    f"duplicated={r['duplicated']}")
            if wl == "decode" and a.take_load:
                base = next((r["fps"] for r in rows if r["workload"] == "decode" and r["workers"] == 1), None)
                rate = a.feed_fps or 1.5 * (base or 20.0)
                say(f"--- take load: 1 worker on a line at {rate:.1f} fps, then a 2nd worker")
                take = run_take_load(stack, work, images, model, rate, a)
                say("    " + "  ".join(f"{k}={v}" for k, v in take.items()))
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    add_efficiency(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            **git_state(), "command": command("benchmarks/scaleout.py", argv), "workloads": workloads, "workers": ks, "partitions": a.partitions,
            "cameras": len(a.cams), "batch_max": a.batch, "wall_s": round(time.monotonic() - t_wall, 1),
            "fps_definition": "result records after every worker's first result / (last result - that moment)"}
    doc = {"meta": meta, "rows": rows, "take_load": take}
    (out / "scaleout.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(out / "scaleout.png", rows, meta)
    say("--- summary")
    for r in rows:
        say(f"    {r['workload']:8s} K={r['workers']}  fps={r['fps']}  speedup={r['speedup']}  "
            f"efficiency={r['efficiency']}  CPU busy={r['cpu_busy_pct']}%  lost={r['lost']}  duplicated={r['duplicated']}")
    if take:
        say(f"    take load: first frame {take['start_to_first_frame_s']}s, first result "
            f"{take['start_to_first_result_s']}s after the 2nd worker's start")
    say(f"    wrote {out / 'scaleout.json'} and {out / 'scaleout.png'} (wall {meta['wall_s']}s)")
    bad = [r for r in rows + ([take] if take else []) if r["lost"] or not r["complete"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
