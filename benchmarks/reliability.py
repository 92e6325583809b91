"""Reliability under faults: the tests/harness/chaos.py scenarios against a real stack this script starts.

For each fault (worker SIGKILL mid-batch + restart, broker unreachable, Triton killed + restarted,
Triton crash loop, model unloaded + reloaded, Triton stalled), a fresh Faust worker on fresh topics
gets N real MVTec bottle frames at a steady rate, the fault is injected while they flow, and
`linewatch account`'s logic counts what happened to every frame.

Columns: frames sent, lost (no result and no DLQ record), duplicated (result records beyond the
first per frame: at-least-once redelivery), DLQ'd, recovery (fault end -> first result record
seen on the results topic after it), fault duration, the worker's peak RSS growth over its
pre-fault level, and the retries the worker logged.

Then the failure-safety scenarios of issue #15 (Triton down at start, a fatal produce error, an
exception in the batch, SIGTERM with the broker stopped, a DLQ record over the topic limit, poison
task headers, a retry budget running out, Triton down behind the circuit breaker, decode bombs just
under the pixel cap, a tampered model.py released while frames flow, and frames from librdkafka under
each compression codec), and those of issue #26 (a 4K camera, capture quotas, the Onboard runner's
progress, Triton restarted empty under traffic, a broker blip mid-promotion, a rollout longer than the
controller's poll interval, two controllers with the active one killed mid-rollout). Each is the integration test that guards the fix, run here by pytest with
``--reliability-out``: the test records its ``linewatch account`` report (tests/harness/reliability.py)
and passes only if nothing was lost. A row is ok when the test passed, nothing is lost, every topic was
read to its end and the DLQ holds exactly the records the scenario must produce (the poison frames).

Writes benchmarks/results/reliability.json and reliability.md.

    .venv/bin/python benchmarks/reliability.py [--frames 200] [--fps 20] [--fault-s 8]
        [--faults worker_sigkill,broker_pause,...] [--model-dir triton_repo/efficientad_bottle]
        [--safety | --no-safety]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import bottle_test_dir, command, git_state, machine, require_model_dir  # noqa: E402
from contracts.config import Settings  # noqa: E402
from devstack.stack import LocalStack  # noqa: E402
from tests.harness.chaos import FAULTS, load_images, run_scenario  # noqa: E402
from tests.harness.probe_model import write_probe_model  # noqa: E402

DATA_DIR = Settings().data_dir  # this script's settings (LINEWATCH_DATA_DIR)

COLUMNS = [("fault", "fault injected"), ("fault_s", "fault s"), ("frames_sent", "frames sent"),
           ("sent_during_fault", "sent during fault"), ("lost", "lost"),
           ("duplicated", "duplicated"), ("dlq", "DLQ'd"), ("recovery_s", "recovery s"),
           ("rss_growth_mb", "worker RSS growth MB"), ("retries", "worker retries"), ("ok", "ok")]

DESCRIBE = {
    "worker_sigkill": "worker SIGKILLed mid-batch, new worker started at once (same group)",
    "broker_pause": "Tansu broker SIGSTOPped (unreachable, in-memory log kept), SIGCONT after fault s",
    "triton_crash": "tritonserver SIGKILLed, restarted on the same ports after fault s, models re-loaded",
    "triton_flap": "tritonserver killed, back without models, killed again, back with models",
    "model_unload": "model unloaded (explicit model control), loaded back after fault s",
    "triton_stall": "tritonserver SIGSTOPped (hung) for fault s, SIGCONT",
}


# the integration tests that guard each failure-safety fix (issue #15); each records its accounting rows
SAFETY_TESTS = [
    "tests/integration/test_ack_safety.py::test_worker_started_while_triton_down_past_the_ready_wait_loses_nothing",
    "tests/integration/test_ack_safety.py::test_exception_escaping_the_batch_commits_nothing_and_frames_are_redelivered",
    "tests/integration/test_ack_safety.py::test_sigterm_with_the_broker_stopped_exits_within_the_bound",
    "tests/integration/test_ack_safety.py::test_dlq_record_fits_the_dlq_topic_limit",
    "tests/integration/test_retry_safety.py::test_unknown_task_goes_to_dlq_promptly_and_never_stalls_the_batch",
    "tests/integration/test_retry_safety.py::test_frame_failing_transiently_past_its_budget_is_dlq_retry_exhausted",
    "tests/integration/test_retry_safety.py::test_triton_down_opens_breaker_pauses_consumption_and_resumes_without_loss",
    "tests/integration/test_decode_budget.py::test_bombs_under_the_cap_stay_in_budget",
    "tests/integration/test_rollout.py::test_tampered_model_py_refused_while_frames_flow_nothing_lost",
    "tests/integration/test_codecs.py::test_every_compression_codec_from_librdkafka",
    "tests/integration/test_camera_4k.py::test_4k_camera_keeps_publishing_every_frame",
    "tests/integration/test_capture_quota.py::test_rotating_product_camera_stays_within_the_capture_quotas",
    "tests/integration/test_onboard_runner_progress.py::test_onboard_runner_survives_a_megabyte_of_progress",
    "tests/integration/test_triton_restart_empty.py::test_triton_restart_empty_with_traffic_loses_nothing",
    "tests/integration/test_controller_safety.py::test_controller_publish_fails_mid_promotion",
    "tests/integration/test_controller_safety.py::test_controller_rollout_longer_than_poll_interval",
    "tests/integration/test_controller_safety.py::test_two_controllers_one_killed_mid_rollout",
    "tests/unit/test_moleflow_store_lock.py::test_two_onboardings_of_one_model_at_once",
]

SAFETY_DESCRIBE = {
    "triton_down_at_start": "worker started while Triton is down 3x its readiness wait, then Triton starts",
    "fatal_produce_error": "the broker refuses the results topic (authorization): worker stops, exit 1, restarted",
    "exception_in_batch": "an exception escapes the batch body: worker stops, exit 1, restarted",
    "sigterm_broker_stopped": "SIGTERM while the broker is SIGSTOPped; a new worker after the broker is back",
    "dlq_record_over_topic_limit": "an undecodable 2 MiB frame, DLQ topic max.message.bytes 1.5 MiB",
    "poison_task_header": "frames whose task header names no task (some contain 'UNAVAILABLE') among good ones",
    "retry_budget_exhausted": "frames Triton fails transiently for ever (retry budget 2) among good ones",
    "triton_down_breaker": "Triton killed for 12 s under traffic: circuit breaker pauses consumption",
    "decode_bombs_under_cap": "16-bit RGBA PNGs just under the model-derived pixel cap (+1 just over it)",
    "tampered_model_py": "a version whose model.py changed after its manifest, released while frames flow",
    "camera_4k_frames": "linewatch camera on a 3840x2160 video (~2 MB JPEGs) into a topic of max.message.bytes 1 MiB",
    "capture_quota_rotating_products": "1500 unknown-product DLQ records rotating 500 product names against the "
                                       "capture quotas (5 products, 12 images' bytes); lost = neither captured nor "
                                       "refused",
    "onboard_runner_long_progress": "the console's Onboard runner, a child writing 1 MB of \\r progress then exit 0, "
                                    "twice; lost = a run whose exit code was never recorded",
    "triton_restart_empty_with_traffic": "Triton SIGKILLed and restarted empty (explicit mode) under 20 fps, kept "
                                         "empty past the workers' grace (3 s), then the controller reloads the "
                                         "serving version",
    "controller_publish_fails_mid_promotion": "the serving-state write after Triton switched to v2 fails once "
                                              "(broker connection lost): retried, one promoted, committed after it",
    "controller_rollout_longer_than_poll_interval": "v2 waits in shadow for traffic (> 3x the controller's 6 s "
                                                    "max_poll_interval) until the line starts; then a rolled-back "
                                                    "release redelivered (group offset moved back): skipped",
    "two_controllers_one_killed_mid_rollout": "two controllers on one lease; the active one SIGKILLed mid-shadow, "
                                              "the standby takes over: one promotion",
    "worker_cannot_roll_back": "(the line of controller_publish_fails_mid_promotion) a rollback_requested to v1 "
                               "forged on every lifecycle topic the worker's KafkaUser may write, and on "
                               "model-events (the trainer's): no outcome, v2 serves",
    "release_on_idle_line": "(the line of controller_rollout_longer_than_poll_interval) v2 released while no "
                            "camera publishes waits in shadow, then the line starts: promoted on live frames",
    "two_onboardings_one_model": "two MoLE-Flow training jobs (real processes) add a task to one model at once; "
                                 "lost = an onboarding whose task the newest version does not hold",
}
SAFETY_COLUMNS = [("scenario", "scenario"), ("frames_sent", "frames sent"), ("lost", "lost"),
                  ("duplicated", "duplicated"), ("dlq_reasons", "DLQ'd (reason)"), ("expected_dlq", "DLQ expected"),
                  ("ok", "ok")]


def run_safety(out_json: Path) -> tuple[list[dict], int]:
    """Run the failure-safety integration tests; their accounting rows and pytest's exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--reliability-out", str(out_json),
           *SAFETY_TESTS]
    print("--- failure-safety scenarios: " + " ".join(cmd[3:6]) + " ...", flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    for r in rows:
        r["ok"] = bool(r["ok"] and rc == 0)
        print("    " + "  ".join(f"{h}={_fmt(r.get(k))}" for k, h in SAFETY_COLUMNS), flush=True)
    return rows, rc


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items() if n) or "0"
    return str(v)


def write_markdown(path: Path, rows: list[dict], meta: dict, safety: list[dict] | None = None) -> None:
    lines = ["# Reliability under faults", "",
             f"{meta['when']} on {meta['machine']}; detector `{meta['model']}`; {meta['frames']} frames per scenario "
             f"at {meta['fps']} fps (+1 warm-up frame), batch {meta['batch']}; fault injected once the worker was "
             "keeping up. Lost = no result and no DLQ record (`linewatch account`); duplicated = result records beyond "
             "the first per frame (at-least-once); recovery = fault end to the first result record seen after it.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "Faults:", ""] + [f"- `{k}`: {DESCRIBE[k]}" for k in meta["faults"]]
    lines += ["", "Notes: worker RSS growth = peak after the fault minus the worker's level before it (for "
              "`worker_sigkill`, the replacement worker against the killed one). Sent during fault = frames the broker "
              "acknowledged while the fault lasted (0 for `broker_pause`: the line's producer was blocked too). Recovery after `broker_pause` is "
              "near 0 because results computed during the outage were waiting in the worker's producer. "
              f"Wall time {meta['wall_s']} s."]
    if safety is not None:
        lines += ["", "## Failure-safety scenarios (issue #15)", "",
                  f"Each row is the integration test that guards the fix (pytest exit code {meta.get('safety_rc')}); "
                  "DLQ'd records are the poison frames the scenario must reject, by reason.", "",
                  "| " + " | ".join(h for _, h in SAFETY_COLUMNS) + " | what |", "|" + "---|" * (len(SAFETY_COLUMNS) + 1)]
        for r in safety:
            what = SAFETY_DESCRIBE.get(r["scenario"], "librdkafka producer, compression.type " + r["scenario"].split("_", 1)[-1])
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in SAFETY_COLUMNS) + f" | {what} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/reliability.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200, help="frames per scenario")
    ap.add_argument("--fps", type=float, default=20.0, help="publish rate of the line")
    ap.add_argument("--fault-s", type=float, default=8.0, help="how long each timed fault lasts")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma list from {','.join(FAULTS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model-dir", help="an exported Triton model dir to serve instead of the probe detector")
    ap.add_argument("--probe-delay-ms", type=int, default=100, help="probe detector time per batch")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--safety", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the failure-safety scenarios (issue #15) through their integration tests")
    a = ap.parse_args(argv)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad or not faults:
        ap.error(f"unknown fault(s) {bad or a.faults!r}; choose from {', '.join(FAULTS)}")
    if a.frames < 10 or a.fps <= 0 or a.fault_s <= 0 or a.batch < 1:
        ap.error("--frames must be >= 10 and --fps, --fault-s, --batch positive")
    require_model_dir(ap, "--model-dir", a.model_dir)
    test_dir = bottle_test_dir(DATA_DIR)
    if test_dir is None:
        return 2
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(test_dir, limit=16)
    root = Path(tempfile.mkdtemp(prefix="lw-reliability-"))
    repo = root / "model_repository"
    if a.model_dir:
        model = Path(a.model_dir).name
        shutil.copytree(a.model_dir, repo / model)
    else:
        model = write_probe_model(repo, delay_ms=a.probe_delay_ms, max_batch=a.batch)
    rows: list[dict] = []
    t0 = time.monotonic()
    stack = LocalStack(root / "work", repo, load_models=[model], start_timeout_s=120)
    stack.start()
    try:
        for f in faults:
            print(f"--- {f}: {DESCRIBE[f]}", flush=True)
            r = run_scenario(stack, f, images, root / f, model=model, n=a.frames, fps=a.fps, fault_s=a.fault_s,
                             batch_max=a.batch)
            d = r.to_dict()
            d["rss_growth_mb"] = round(r.rss_peak_mb - r.rss_base_mb, 1)
            d["report"] = {k: v for k, v in r.report.items() if k != "duplicated"}
            rows.append(d)
            print("    " + "  ".join(f"{h}={_fmt(d.get(k))}" for k, h in COLUMNS[1:]), flush=True)
    finally:
        stack.stop()
    safety, safety_rc = run_safety(root / "safety.json") if a.safety else (None, None)
    shutil.rmtree(root, ignore_errors=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
            "model": model if a.model_dir else f"{model} (probe detector, {a.probe_delay_ms} ms per batch)",
            "frames": a.frames, "fps": a.fps, "fault_s": a.fault_s, "batch": a.batch, "faults": faults,
            "wall_s": round(time.monotonic() - t0, 1), **git_state(), "command": command("benchmarks/reliability.py", argv),
            "safety_rc": safety_rc}
    doc = {"meta": meta, "scenarios": rows}
    if safety is not None:
        doc["safety_scenarios"] = safety
    (out / "reliability.json").write_text(json.dumps(doc, indent=2))
    write_markdown(out / "reliability.md", rows, meta, safety)
    print((out / "reliability.md").read_text())
    return 0 if all(r["ok"] for r in rows + (safety or [])) and not safety_rc else 1


if __name__ == "__main__":
    sys.exit(main())
