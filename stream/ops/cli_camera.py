"""`linewatch camera|capture|onboard` verbs (issue 18), registered into stream/ops/cli.py's parser.

camera    a video file, RTSP/HTTP stream, /dev/videoN or image folder -> JPEG frames on ``frames`` at --fps
          (stream/sources/camera.py: pacing, bounded in-flight window, drops counted, reconnect with backoff)
capture   the capture service (stream/lifecycle/capture.py): unknown-product DLQ frames and route-OOD products'
          frames -> ``<capture_dir>/<product>/good`` + manifest.json (layout: stream/lifecycle/onboarding.py)
onboard   captured images -> training job (local subprocess, or the k8s Job with --k8s) -> released ->
          the controller's outcome (stream/lifecycle/onboard_runner.py)
Bad arguments: one line on stderr, exit 2 (contracts/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from contracts.cli import UsageError, non_negative_int, positive_float, positive_int


def _quality(v: str) -> int:
    q = positive_int(v)
    if q > 100:
        raise argparse.ArgumentTypeError(f"must be 1..100: {v}")
    return q


def _stopper(stop: asyncio.Event, *also) -> None:
    loop = asyncio.get_running_loop()

    def fire() -> None:
        stop.set()
        for f in also:
            f()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fire)


def _cmd_camera(a) -> int:
    from contracts.names import is_safe_name
    from stream.ops.cli_worker import _bootstrap
    from stream.sources.camera import CameraConfig, camera, check_config, open_source

    s = a.settings
    for what, v in (("--product", a.product), ("--task", a.task)):
        if v is not None and not is_safe_name(v):
            raise UsageError(f"{what} {v[:80]!r} is not a name ([A-Za-z0-9_.-], 1-128 chars)")
    cfg = CameraConfig(camera_id=a.camera_id, line_id=a.line_id, product=a.product, task=a.task, fps=a.fps,
                       jpeg_quality=a.jpeg_quality, max_frames=a.max_frames,
                       max_inflight=a.max_inflight or s.camera_max_inflight)
    check_config(cfg)  # the worker's own header checks (exit 2 before anything is opened)
    source = open_source(a.source, loop=a.loop, backoff_s=s.camera_reconnect_backoff_s,
                         backoff_max_s=s.camera_reconnect_backoff_max_s, max_reconnects=a.max_reconnects)
    topic = a.topic or s.topic_frames

    async def run():
        stop = asyncio.Event()
        _stopper(stop, getattr(source, "interrupt", lambda: None))
        try:
            return await camera(_bootstrap(a), source, cfg, topic=topic, settings=s, stop=stop)
        finally:
            await asyncio.to_thread(source.close)

    st = asyncio.run(run())
    print(f"camera {cfg.camera_id}: published {st.published} frames to {topic}, dropped {st.dropped} "
          f"(late {st.dropped_late}, window {st.dropped_window}), failed {st.failed}, re-encoded {st.reencoded}, "
          f"too large {st.too_large}, reconnects {st.reconnects}")
    return 0


def _cmd_capture(a) -> int:
    from stream.lifecycle.capture import CaptureService, policy_of
    from stream.ops.cli_worker import _bootstrap

    over = {"kafka_bootstrap": _bootstrap(a), "capture_dir": a.capture_dir, "capture_group": a.group,
            "capture_policy": a.policy, "capture_every_n": a.every_n, "capture_max_per_product": a.max_per_product}
    s = a.settings.with_overrides(**over)
    svc = CaptureService(s, policy_of(s, set(a.select or ())))

    async def run():
        stop = asyncio.Event()
        _stopper(stop)
        await svc.run(stop)

    asyncio.run(run())
    return 0


def _cmd_onboard(a) -> int:
    from stream.lifecycle.onboard_runner import Onboarding
    from stream.ops.cli_worker import _bootstrap

    a.extra = [x for x in (a.extra or []) if x != "--"]
    a.min_images = a.min_images or a.settings.onboard_min_images
    if a.dry_run and not a.k8s:
        raise UsageError("--dry-run prints the k8s Job: it needs --k8s")
    boot = _bootstrap(a)
    return asyncio.run(Onboarding(a, a.settings.with_overrides(kafka_bootstrap=boot), boot).run())


def register(sub: argparse._SubParsersAction) -> None:
    from contracts.detectors import detector_names

    p = sub.add_parser("camera", help="publish a camera (video file, rtsp://, /dev/videoN, image folder) as JPEG "
                                      "frames at a fixed fps")
    p.add_argument("--source", required=True, help="FILE.mp4 | rtsp://... | http(s)://... | /dev/videoN | FOLDER")
    p.add_argument("--camera-id", required=True)
    p.add_argument("--line-id")
    p.add_argument("--product")
    p.add_argument("--task", help="MoLE-Flow task header")
    p.add_argument("--fps", type=positive_float, default=10.0, help="frames per second (default 10)")
    p.add_argument("--jpeg-quality", type=_quality, default=90, help="1..100 (default 90)")
    p.add_argument("--max-frames", type=positive_int, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="a file or folder: start again at its end")
    p.add_argument("--max-inflight", type=positive_int, help="sends awaiting an ack (default: settings "
                                                             "camera_max_inflight); a full window drops frames")
    p.add_argument("--max-reconnects", type=non_negative_int,
                   help="a stream: give up (exit 1) after this many failures in a row (default: never)")
    p.add_argument("--bootstrap")
    p.add_argument("--topic", help="default: settings topic_frames")
    p.set_defaults(func=_cmd_camera)

    p = sub.add_parser("capture", help="capture unknown-product and out-of-distribution frames into a dataset "
                                       "for onboarding")
    p.add_argument("--bootstrap")
    p.add_argument("--capture-dir", help="default: settings capture_dir")
    p.add_argument("--group", help="consumer group (default: settings capture_group)")
    p.add_argument("--policy", choices=["every_n", "select"], help="default: settings capture_policy")
    p.add_argument("--every-n", type=positive_int, help="every_n: keep one of every N candidates per product")
    p.add_argument("--max-per-product", type=positive_int)
    p.add_argument("--select", action="append", metavar="FRAME_ID", help="capture this frame id (repeat)")
    p.set_defaults(func=_cmd_capture)

    p = sub.add_parser("onboard", help="train, release and roll out a new product from its captured images")
    p.add_argument("--product", required=True)
    p.add_argument("--detector", choices=detector_names(), default=detector_names()[0])
    p.add_argument("--model", help="model name (default: the detector's model serving now / the registry's)")
    p.add_argument("--min-images", type=positive_int, help="default: settings onboard_min_images")
    p.add_argument("--capture-wait", type=positive_float, metavar="SECONDS",
                   help="wait this long for --min-images captured images")
    p.add_argument("--wait", action="store_true", help="wait for the rollout outcome (exit 1 unless promoted)")
    p.add_argument("--timeout", type=positive_float, default=900.0, help="--wait: seconds (default 900)")
    p.add_argument("--train-timeout", type=positive_float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--store", help="model store the job exports to (default: settings onboard_model_store)")
    p.add_argument("--base-store", help="multi-task training store (default: <onboard_training_store>/<detector>)")
    p.add_argument("--k8s", action="store_true", help="run the training as the k8s Job (kubectl apply)")
    p.add_argument("--dry-run", action="store_true", help="--k8s: print the Job manifest only")
    p.add_argument("--job-template", help="default: k8s/train/train-job.yaml")
    p.add_argument("--bootstrap")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: args for the detector's train verb")
    p.set_defaults(func=_cmd_onboard)
