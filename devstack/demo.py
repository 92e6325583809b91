"""``linewatch demo``: the whole service on one laptop, end to end, then a summary.

1. make sure a bottle detector exists in ``triton_repo/`` (else train + export a short-schedule one:
   the first registered detector's quick recipe (models/registry.py), run through the models CLI as a
   *subprocess*; ``stream`` never imports torch);
2. start the embedded stack (Tansu broker + tritonserver, :class:`devstack.stack.LocalStack`) and load it;
3. start the Faust worker (subprocess, like production), replay MVTec ``bottle/test`` as a camera;
4. collect every result / DLQ record, print frames in/out, flagged, streamed image AUROC vs the
   ground-truth labels, p50/p99 end-to-end latency, and write a PNG grid of flagged frames with
   their heat maps; stop everything.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import orjson

from contracts.config import Settings
from contracts.detectors import DETECTORS, detector_info
from contracts.envelope import decode_defect_event, decode_heatmap, decode_result, dlq_reason
from contracts.logs import get_logger
from devstack.stack import LocalStack
from devstack.worker_process import WorkerProcess

log = get_logger("devstack.demo")
REPO_ROOT = Path(__file__).resolve().parents[1]


def model_ready(repo: Path, name: str) -> bool:
    d = repo / name
    if not (d / "config.pbtxt").is_file():
        return False
    return any(p.is_dir() and p.name.isdigit() and (p / "model.py").is_file() and len(list(p.iterdir())) > 1
               for p in d.iterdir())


def find_model(repo: Path, product: str = "bottle", detector: str | None = None) -> str | None:
    """The model for ``product`` of ``detector``, else of the first registered detector (contracts/detectors.py)
    that has one exported in ``repo``."""
    for det in ([detector_info(detector)] if detector else DETECTORS.values()):
        if model_ready(repo, name := det.model_name(product)):
            return name
    return None


def models_cli() -> list[str]:
    exe = Path(sys.executable).with_name("linewatch-models")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "models.cli"]


def _run(cmd: list[str]) -> None:
    log.info("demo_subprocess", cmd=" ".join(cmd))
    t0 = time.monotonic()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"command failed (rc={r.returncode}): {' '.join(cmd)}")
    log.info("demo_subprocess_done", seconds=round(time.monotonic() - t0, 1))


def train_and_export(repo: Path, workdir: Path, settings: Settings, product: str = "bottle",
                     detector: str | None = None, max_images: int | None = None) -> str:
    """Short-schedule training + export into ``repo``: the detector's quick recipe (models/registry.py,
    default: the first registered detector), each step a models CLI subprocess. Returns the model name.
    ``max_images``: cap the training images (a small slice; None: the recipe's own)."""
    from models.registry import get

    recipe = get(detector or next(iter(DETECTORS))).quick_recipe(
        data_dir=Path(settings.data_dir), product=product, workdir=workdir, repository=repo,
        steps=settings.demo_steps, max_images=max_images)
    (workdir / "artifacts").mkdir(parents=True, exist_ok=True)
    for step in recipe.steps:
        _run([*models_cli(), *step])
    return recipe.model


@dataclass
class Summary:
    frames_in: int
    results: int
    dlq: int
    flagged: int
    auroc: float | None
    p50_ms: float | None
    p99_ms: float | None
    infer_p50_ms: float | None
    fps: float
    model: str
    grid_png: str | None
    dlq_reasons: dict[str, int]

    def print(self, out=sys.stdout) -> None:
        a = f"{self.auroc:.4f}" if self.auroc is not None else "n/a"
        print("\n=== linewatch demo summary ===", file=out)
        print(f"model            : {self.model}", file=out)
        print(f"frames in        : {self.frames_in}", file=out)
        print(f"results out      : {self.results}   DLQ: {self.dlq} {self.dlq_reasons or ''}", file=out)
        print(f"flagged anomalous: {self.flagged}", file=out)
        print(f"image AUROC      : {a} (streamed scores vs MVTec ground truth)", file=out)
        if self.p50_ms is not None:
            print(f"latency e2e      : p50 {self.p50_ms:.1f} ms   p99 {self.p99_ms:.1f} ms   (Triton batch call p50 "
                  f"{self.infer_p50_ms:.1f} ms; e2e includes queueing when --fps exceeds the model's rate)", file=out)
        print(f"throughput       : {self.fps:.1f} frames/s", file=out)
        if self.grid_png:
            print(f"flagged grid     : {self.grid_png}", file=out)


def summarize(sent, recs: dict[str, list], model: str, elapsed_s: float, grid_path: Path | None) -> Summary:
    from sklearn.metrics import roc_auc_score

    by_id = {s.frame_id: s for s in sent}
    results = {}
    for r in recs.get("inspection-results", []):
        res = decode_result(r.value)
        if res.frame_id in by_id:
            results[res.frame_id] = res  # idempotent: last copy wins
    dlq: dict[str, int] = {}
    for r in recs.get("frames-dlq", []):
        reason, _ = dlq_reason(r.headers)
        dlq[reason or "?"] = dlq.get(reason or "?", 0) + 1
    labelled = [(1 if by_id[f].gt_label == "defect" else 0, r.score) for f, r in results.items() if by_id[f].gt_label]
    auroc = None
    if labelled and len({y for y, _ in labelled}) == 2:
        auroc = float(roc_auc_score([y for y, _ in labelled], [s for _, s in labelled]))
    e2e = np.array([r.latency_ms.get("e2e", np.nan) for r in results.values()], dtype=float)
    e2e = e2e[np.isfinite(e2e)]
    inf = np.array([r.latency_ms.get("infer", np.nan) for r in results.values()], dtype=float)
    inf = inf[np.isfinite(inf)]
    flagged = [r for r in results.values() if r.is_anomaly]
    grid = None
    if grid_path is not None:
        defects = {}
        for r in recs.get("defect-events", []):
            try:
                ev = decode_defect_event(r.value)
            except Exception:
                continue
            if ev.result.frame_id in by_id:
                defects[ev.result.frame_id] = ev
        if defects:
            grid = str(write_grid(grid_path, list(defects.values()), by_id))
    return Summary(frames_in=len(sent), results=len(results), dlq=sum(dlq.values()), flagged=len(flagged), auroc=auroc,
                   p50_ms=float(np.percentile(e2e, 50)) if len(e2e) else None,
                   p99_ms=float(np.percentile(e2e, 99)) if len(e2e) else None,
                   infer_p50_ms=float(np.percentile(inf, 50)) if len(inf) else None,
                   fps=len(results) / max(elapsed_s, 1e-6), model=model, grid_png=grid, dlq_reasons=dlq)


def write_grid(path: Path, events, by_id, *, tile: int = 192, cols: int = 6, max_tiles: int = 24) -> Path:
    """Flagged frames with their heat map overlaid and boxes drawn, highest score first."""
    events = sorted(events, key=lambda e: e.result.score, reverse=True)[:max_tiles]
    tiles = []
    for ev in events:
        s = by_id[ev.result.frame_id]
        img = cv2.imread(s.path, cv2.IMREAD_COLOR)
        if img is None:
            img = np.zeros((tile, tile, 3), np.uint8)
        img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        hm = cv2.resize(decode_heatmap(ev.heatmap_png_b64), (tile, tile), interpolation=cv2.INTER_LINEAR)
        over = cv2.addWeighted(img, 0.55, cv2.applyColorMap(hm, cv2.COLORMAP_JET), 0.45, 0)
        for b in ev.boxes:
            x, y, w, h = (int(round(v * tile)) for v in (b["x"], b["y"], b["w"], b["h"]))
            cv2.rectangle(over, (x, y), (x + w, y + h), (255, 255, 255), 1)
        gt = s.gt_defect or s.gt_label or "?"
        cv2.rectangle(over, (0, 0), (tile, 18), (0, 0, 0), -1)
        cv2.putText(over, f"{ev.result.score:.3g} gt:{gt}"[:28], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 255) if s.gt_label == "good" else (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(over)
    rows = []
    for i in range(0, len(tiles), cols):
        row = tiles[i:i + cols]
        row += [np.zeros_like(tiles[0])] * (cols - len(row))
        rows.append(np.hstack(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def start_console(boot: str, workdir: Path, settings: Settings):
    """`linewatch console` as a child for the demo's duration, on ``console_port`` (or a free port when that one
    is taken). Returns (process, url); nothing is opened: the URL is printed."""
    import socket

    from devstack.processes import ChildProcess, free_port

    port = settings.console_port
    with socket.socket() as sock:
        try:
            sock.bind((settings.console_host, port))
        except OSError:
            port = free_port(settings.console_host)
    proc = ChildProcess([sys.executable, "-m", "stream.ops.cli", "console", "--bootstrap", boot, "--host",
                         settings.console_host, "--port", str(port)], workdir / "console.log").start()
    host = "127.0.0.1" if settings.console_host in ("0.0.0.0", "") else settings.console_host
    return proc, f"http://{host}:{port}/"


def load_model(grpc_url: str, name: str, timeout_s: float = 180.0, *, control_key: str | None = None) -> None:
    """Explicit-mode load, sending Triton's model-control key (contracts/triton_control.py)."""
    import tritonclient.grpc as grpcclient

    from contracts.triton_control import grpc_headers

    c = grpcclient.InferenceServerClient(grpc_url)
    c.load_model(name, headers=grpc_headers(control_key))
    t0 = time.monotonic()
    while not c.is_model_ready(name):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"model {name} not ready after {timeout_s}s")
        time.sleep(0.2)
    c.close()


def run_demo(*, settings: Settings, workdir: str | Path | None = None, model_repository: str | Path | None = None,
             fps: float = 10.0, cameras: list[str] | None = None, retrain: bool = False,
             out_dir: str | Path | None = None, timeout_s: float = 150.0, bootstrap: str | None = None,
             triton_grpc_url: str | None = None, model: str | None = None, detector: str | None = None,
             limit: int | None = None, max_images: int | None = None) -> Summary:
    """Run the demo (``settings``: the entry point's, stream/ops/cli.py). With ``bootstrap`` +
    ``triton_grpc_url`` an already running stack is used (e.g. ``linewatch stack up``) and left running;
    otherwise the embedded stack is started and stopped. ``detector``: the one to train when no model
    exists (default: the first registered). ``limit``: replay only that many test frames (good and defective
    mixed); ``max_images``: training images of a model trained here (a small slice; None: the recipe's)."""
    from stream.kafka.clients import ensure_topics, read_topics
    from stream.ops.replay import replay

    t_all = time.monotonic()
    workdir = Path(workdir or Path(settings.stack_workdir) / "demo").resolve()
    repo = Path(model_repository or settings.model_repository).resolve()
    out_dir = Path(out_dir or workdir).resolve()
    if retrain and workdir.exists():
        shutil.rmtree(workdir / "artifacts", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    test_dir = Path(settings.data_dir) / "mvtec" / "bottle" / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"MVTec bottle test set not found at {test_dir} (set LINEWATCH_DATA_DIR)")
    model = model or (None if retrain else find_model(repo, detector=detector))
    trained_s = 0.0
    if model is None:
        t0 = time.monotonic()
        print("no bottle model in triton_repo/: training a short-schedule one (subprocess)...", flush=True)
        model = train_and_export(repo, workdir, settings, detector=detector, max_images=max_images)
        trained_s = time.monotonic() - t0
    print(f"model: {model}; starting embedded stack...", flush=True)
    own_stack = not (bootstrap and triton_grpc_url)
    stack = LocalStack(workdir / "stack", repo) if own_stack else None
    worker = console = None
    try:
        if stack is not None:
            stack.start()
        boot, grpc_url = (stack.kafka_bootstrap, stack.triton_grpc_url) if own_stack else (bootstrap, triton_grpc_url)
        key = stack.control_key if stack is not None else (
            settings.triton_control_key.get_secret_value() if settings.triton_control_key else None)
        load_model(grpc_url, model, control_key=key)
        asyncio.run(ensure_topics(boot))
        worker = WorkerProcess(boot, grpc_url, workdir, app_id=f"linewatch-demo-{int(time.time())}").start()
        console, console_url = start_console(boot, workdir, settings)
        print(f"console: {console_url}  (live while the demo runs: camera wall, defects, drift, models, "
              f"throughput; log {workdir / 'console.log'})", flush=True)
        print(f"worker pid {worker.proc.pid}, metrics http://127.0.0.1:{worker.web_port}/metrics; replaying "
              f"{test_dir} at {fps} fps...", flush=True)

        async def go():
            # warm-up frame: waits out the consumer-group join and the first Triton call (not counted)
            warm = await replay(boot, test_dir, cameras=["warmup"], fps=0, product="bottle", limit=1,
                                extra={"warmup": "1"})
            wid = warm[0].frame_id
            await read_topics(boot, ["inspection-results", "frames-dlq"], timeout_s=120,
                              until=lambda o: any(decode_result(r.value).frame_id == wid for r in o["inspection-results"]))
            t0 = time.monotonic()
            sent = await replay(boot, test_dir, cameras=cameras or ["cam-bottle-1"], fps=fps, product="bottle",
                                line="line-1", limit=limit)
            ids = {s.frame_id for s in sent}

            def done(o):
                seen = {decode_result(r.value).frame_id for r in o["inspection-results"]}
                seen |= {(dict(r.headers).get("frame_id") or b"").decode() for r in o["frames-dlq"]}
                return ids <= seen

            recs = await read_topics(boot, ["inspection-results", "frames-dlq", "defect-events"], until=done,
                                     timeout_s=timeout_s)
            return sent, recs, time.monotonic() - t0

        sent, recs, elapsed = asyncio.run(go())
        summary = summarize(sent, recs, model, elapsed, out_dir / "flagged_grid.png")
    finally:
        if worker is not None:
            worker.stop()
        if console is not None:
            console.stop()
        if stack is not None:
            stack.stop()
    summary.print()
    print(f"demo wall time   : {time.monotonic() - t_all:.1f} s" + (f" (training {trained_s:.0f} s)" if trained_s else ""))
    (out_dir / "summary.json").write_bytes(orjson.dumps({**summary.__dict__, "wall_s": time.monotonic() - t_all,
                                                         "train_s": trained_s}, option=orjson.OPT_INDENT_2))
    return summary
