"""`linewatch camera` (pacing, drops, in-flight window, reconnects, a real mp4 through cv2.VideoCapture), the
capture store / policy / service steps and the onboarding Job rendering (issue 18 items 1 and 3). No broker."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest
from aiokafka import errors as ke

from contracts.cli import RuntimeFailure
from contracts.envelope import Frame, decode_frame, dlq_record, encode_frame
from contracts.model_events import ModelEvent
from stream.lifecycle.capture import CaptureService
from stream.lifecycle.onboard_runner import JOB_TEMPLATE, job_name, render_job, train_image
from stream.lifecycle.onboarding import (
    CapturePolicy,
    CaptureStore,
    OnboardEvent,
    OnboardEventError,
    decode_event,
    file_stem,
)
from stream.ops.cli import main
from stream.sources.camera import CameraConfig, Pacer, run_camera
from stream.sources.inputs import FileSource, FolderSource, StreamSource, open_source

# ----------------------------------------------------------------------------- fakes


class Clock:
    def __init__(self):
        self.t = 100.0
        self.hooks = []  # (time, fn): run once the clock passes time

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt
        for when, fn in list(self.hooks):
            if self.t >= when:
                self.hooks.remove((when, fn))
                fn()

    async def sleep(self, dt: float) -> None:
        self.advance(dt)
        await asyncio.sleep(0)  # delivery callbacks run, as they would while really sleeping


class Frames:
    """A source of ``n`` small frames; each read costs ``cost`` seconds of the fake clock."""

    live = False

    def __init__(self, n: int, clock: Clock, cost: float = 0.0):
        self.n, self.clock, self.cost, self.i, self.reconnects, self.skipped = n, clock, cost, 0, 0, []

    def read(self):
        from stream.sources.inputs import Shot

        if self.i >= self.n:
            return None
        self.clock.advance(self.cost)
        self.i += 1
        return Shot(np.full((8, 8, 3), self.i, np.uint8), 1_000 + self.i, {"source": f"f{self.i}"})

    def skip(self, n: int) -> int:
        n = min(n, self.n - self.i)
        self.skipped.append(n)
        self.i += n
        return n


class Broker:
    """send() -> a delivery future: acked at once, held (``hold``) or failed with ``error``."""

    def __init__(self):
        self.sent, self.held, self.hold, self.error = [], [], False, None

    async def send(self, rec):
        self.sent.append(rec)
        fut = asyncio.get_running_loop().create_future()
        if self.error is not None:
            fut.set_exception(self.error)
        elif self.hold:
            self.held.append(fut)
        else:
            fut.set_result(None)
        return fut

    def release(self) -> None:
        self.hold = False
        for f in self.held:
            f.set_result(None)
        self.held.clear()


async def direct(fn, *args):
    return fn(*args)


def _run(source, broker, cfg, clock):
    return asyncio.run(run_camera(source, broker.send, cfg, clock=clock, sleep=clock.sleep, offload=direct))


# ----------------------------------------------------------------------------- pacing and drops


def test_pacer_ticks_and_skips_whole_missed_periods():
    p = Pacer(10, now=0.0)
    assert p.delay(0.0) == 0.0 and p.advance(0.01) == 0 and p.delay(0.01) == pytest.approx(0.09)
    assert p.advance(0.15) == 0  # tick 2 is due at 0.2: on time
    assert p.advance(0.52) == 2  # ticks 3 (0.3) and 4 (0.4) are whole periods gone: skipped
    assert p.delay(0.52) == 0.0 and p.advance(0.53) == 0  # tick 5 (0.5) is taken at once, 0.02 s late
    assert p.delay(0.53) == pytest.approx(0.07)  # then tick 6 at 0.6
    with pytest.raises(ValueError):
        Pacer(0, now=0.0)


def test_on_time_camera_publishes_every_frame_at_its_pace():
    clock, broker = Clock(), Broker()
    st = _run(Frames(20, clock), broker, CameraConfig("cam-1", fps=10), clock)
    assert (st.read, st.sent, st.published, st.dropped) == (20, 20, 20, 0)
    assert st.seconds == pytest.approx(2.0)  # 20 ticks at 10 fps; the 21st (t0 + 2.0 s) finds the end
    k, v, h = broker.sent[0]
    f = decode_frame(k, v, h)
    assert f.camera_id == "cam-1" and f.content_type == "image/jpeg" and f.extra["source"] == "f1"
    assert cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_COLOR).shape == (8, 8, 3)


def test_falling_behind_the_pace_drops_frames_instead_of_queueing(capsys):
    clock, broker = Clock(), Broker()
    src = Frames(40, clock, cost=0.25)  # reading + encoding takes 2.5 periods at 10 fps
    st = _run(src, broker, CameraConfig("cam-slow", fps=10, drop_log_s=0.0), clock)
    assert st.dropped_late > 0 and st.dropped_window == 0
    assert st.published + st.dropped_late == 40 and sum(src.skipped) == st.dropped_late  # the file skipped them
    assert st.published <= 40 * 0.1 / 0.25 + 1  # what the time allows, not more
    assert '"event":"camera_frames_dropped"' in capsys.readouterr().err.replace(" ", "")


def test_a_full_in_flight_window_drops_frames_and_counts_them():
    clock, broker = Clock(), Broker()
    broker.hold = True
    clock.hooks.append((100.45, broker.release))  # the broker acks everything after ~4.5 ticks
    st = _run(Frames(10, clock), broker, CameraConfig("cam-w", fps=10, max_inflight=2), clock)
    assert st.dropped_window == 3 and st.sent == 7 and st.published == 7  # ticks 2, 3, 4 found the window full
    assert st.dropped_late == 0 and st.read == 10


def test_send_failures_counted_and_fatal_errors_stop_the_camera():
    clock, broker = Clock(), Broker()
    broker.error = ke.KafkaTimeoutError()
    st = _run(Frames(5, clock), broker, CameraConfig("cam-f", fps=10), clock)
    assert (st.failed, st.published) == (5, 0)
    broker.error = ke.TopicAuthorizationFailedError()
    with pytest.raises(RuntimeFailure, match="TopicAuthorizationFailed"):
        _run(Frames(5, Clock()), broker, CameraConfig("cam-f", fps=10), Clock())


def test_max_frames_stops_the_camera():
    clock, broker = Clock(), Broker()
    st = _run(Frames(50, clock), broker, CameraConfig("cam-m", fps=100, max_frames=7), clock)
    assert st.sent == st.published == 7 and len(broker.sent) == 7


# ----------------------------------------------------------------------------- real sources


@pytest.fixture(scope="module")
def bottle_images(shared_data):
    files = sorted((shared_data / "mvtec" / "bottle" / "test" / "good").glob("*.png"))[:5]
    return [cv2.resize(cv2.imread(str(f)), (256, 256), interpolation=cv2.INTER_AREA) for f in files]


def test_real_mp4_read_back_through_videocapture(tmp_path, bottle_images):
    path = tmp_path / "line.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (256, 256))
    assert w.isOpened()
    for img in bottle_images:
        w.write(img)
    w.release()
    broker, clock = Broker(), Clock()
    cfg = CameraConfig("cam-mp4", line_id="line-1", product="bottle", fps=50, jpeg_quality=80)
    src = open_source(str(path))
    assert isinstance(src, FileSource)
    st = _run(src, broker, cfg, clock)
    src.close()
    assert st.published == len(bottle_images) == 5 and st.dropped == 0
    for (k, v, h), ref in zip(broker.sent, bottle_images, strict=True):
        f = decode_frame(k, v, h)
        assert (f.product, f.line_id, f.extra["source"], k) == ("bottle", "line-1", "line.mp4", b"cam-mp4")
        img = cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (256, 256, 3)
        assert float(np.abs(img.astype(int) - ref.astype(int)).mean()) < 12  # mp4v + JPEG q80 of the same frame
    looped = _run(FileSource(path, loop=True), Broker(), CameraConfig("cam-mp4", fps=50, max_frames=8), Clock())
    assert looped.published == 8  # past the file's end: from its start again


def test_folder_source_in_order_with_mvtec_labels(tmp_path, bottle_images):
    for sub in ("good", "broken"):
        (tmp_path / sub).mkdir()
        for i, img in enumerate(bottle_images[:2]):
            cv2.imwrite(str(tmp_path / sub / f"{i:03d}.png"), img)
    (tmp_path / "good" / "zzz.png").write_bytes(b"not a png")  # unreadable: skipped, logged
    src = FolderSource(tmp_path)
    shots = [src.read() for _ in range(4)]
    assert src.read() is None
    assert [s.extra["gt_label"] for s in shots] == ["defect", "defect", "good", "good"]  # sorted folders
    assert shots[0].extra["gt_defect"] == "broken" and shots[0].image.shape == (256, 256, 3)
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "missing")


class FakeCap:
    def __init__(self, frames: int, opened: bool = True):
        self.frames, self.opened = frames, opened

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self):
        if self.frames <= 0:
            return False, None
        self.frames -= 1
        return True, np.zeros((4, 4, 3), np.uint8)

    def release(self):
        self.opened = False


def test_stream_reconnects_with_capped_exponential_backoff():
    caps = iter([FakeCap(0, opened=False), FakeCap(2), FakeCap(0, opened=False), FakeCap(0, opened=False),
                 FakeCap(10**9)])
    delays = []
    src = StreamSource("rtsp://cam", backoff_s=0.5, backoff_max_s=1.5, capture=lambda _t: next(caps),
                       sleep=delays.append)
    got = [src.read() for _ in range(3)]
    src.close()
    assert all(s is not None for s in got)
    # open failed (1st) -> 2 frames then a read failure (failures reset by the good reads) -> 2 failed opens
    assert delays == [0.5, 0.5, 1.0, 1.5] and src.reconnects == 4


def test_stream_gives_up_after_max_reconnects():
    delays = []
    src = StreamSource("/dev/video9", backoff_s=0.5, backoff_max_s=1.5, max_reconnects=3,
                       capture=lambda _t: FakeCap(0, opened=False), sleep=delays.append)
    assert src.read() is None and src.gave_up
    src.close()
    assert delays == [0.5, 1.0, 1.5]
    with pytest.raises(RuntimeFailure, match="gave up"):
        asyncio.run(run_camera(src, Broker().send, CameraConfig("c", fps=10), offload=direct))


def test_unreachable_rtsp_camera_retries_through_opencv_then_gives_up():
    src = open_source("rtsp://user:secret@127.0.0.1:9/line", backoff_s=0.01, backoff_max_s=0.02, max_reconnects=2)
    assert isinstance(src, StreamSource) and "secret" not in src.name  # credentials never reach the logs
    assert src.read() is None and src.gave_up and src.reconnects == 2
    src.close()


@pytest.mark.parametrize("argv, needle", [
    (["camera", "--source", "/nonexistent.mp4", "--camera-id", "c"], "does not exist"),
    (["camera", "--source", ".", "--camera-id", "c", "--fps", "0"], "--fps"),
    (["camera", "--source", ".", "--camera-id", "c", "--jpeg-quality", "101"], "--jpeg-quality"),
    (["camera", "--source", ".", "--camera-id", "c", "--product", "../x"], "--product"),
    (["camera", "--source", ".", "--camera-id", "bad id"], "camera_id"),
    (["onboard", "--product", "p", "--dry-run"], "--k8s"),
    (["capture", "--policy", "sometimes"], "--policy"),
])
def test_bad_arguments_are_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (OneLineParser) exit 2 themselves
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- capture


def _frame(fid: str, product: str | None = "elpv", camera: str = "cam-e") -> Frame:
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 7, np.uint8))
    return Frame(fid, camera, 123, buf.tobytes(), line_id="l1", product=product, content_type="image/jpeg")


def test_policy_every_n_cap_and_operator_selection():
    p = CapturePolicy("every_n", every_n=3, max_per_product=2, buffer=4)
    picks = [p.want("a", _frame(f"f{i}"), count=0, trigger="t") for i in range(7)]
    assert picks == [True, False, False, True, False, False, True]
    assert not p.want("a", _frame("f9"), count=2, trigger="t")  # at max_per_product
    sel = CapturePolicy("select", buffer=2)
    assert not any(sel.want("a", _frame(f"s{i}"), 0, "t") for i in range(3))
    now = sel.select(["s2", "s0", "later"])  # s2 is buffered; s0 fell out of the 2-frame buffer
    assert [(prod, f.frame_id, trig) for prod, f, trig in now] == [("a", "s2", "selected")]
    assert sel.want("a", _frame("later"), 0, "t") and sel.want("a", _frame("s0"), 0, "t")


def test_store_layout_manifest_and_unsafe_ids(tmp_path):
    store = CaptureStore(tmp_path)
    f = _frame("a/../b:1")
    assert store.add("elpv", f, "unknown_product") and not store.add("elpv", f, "unknown_product")
    assert file_stem("a/../b:1").startswith("id-") and file_stem("abc123") == "abc123"
    assert store.flush("elpv") == 1
    m = json.loads((tmp_path / "elpv" / "manifest.json").read_text())
    e = m["frames"]["a/../b:1"]
    assert m["count"] == 1 and e["file"].startswith("good/id-") and e["file"].endswith(".jpg")
    assert (tmp_path / "elpv" / e["file"]).read_bytes() == f.image and e["trigger"] == "unknown_product"
    (tmp_path / "elpv" / e["file"]).unlink()  # curated away: not counted, never captured again
    assert CaptureStore(tmp_path).count("elpv") == 0 and CaptureStore(tmp_path).has("elpv", "a/../b:1")
    with pytest.raises(ValueError):
        store.good_dir("../etc")


def test_service_captures_unknown_product_dlq_records_with_their_original_bytes(tmp_path, settings):
    s = settings.with_overrides(capture_dir=tmp_path, capture_every_n=2)
    svc = CaptureService(s)
    frames = [_frame(f"dlq-{i}") for i in range(4)] + [_frame("noprod", product=None)]
    for f in frames:
        k, v, h = encode_frame(f)
        svc.on_dlq(*dlq_record(k, v, h, "unknown_product", "no loaded model for product 'elpv'"))
    k, v, h = encode_frame(_frame("bad-image"))
    svc.on_dlq(*dlq_record(k, v, h, "undecodable_image", "x"))  # not a capture trigger
    ev = svc.flush()
    assert [e.type for e in ev] == ["captured"] and ev[0].detail["count"] == 2 and ev[0].detail["new"] == 2
    assert sorted(p.name for p in (tmp_path / "elpv" / "good").iterdir()) == ["dlq-0.jpg", "dlq-2.jpg"]
    assert (tmp_path / "elpv" / "good" / "dlq-0.jpg").read_bytes() == frames[0].image
    assert svc.stats["no_product"] == 1 and svc.stats["not_selected"] == 2
    assert decode_event(ev[0].to_json()).detail["frame_ids"] == ["dlq-0", "dlq-2"]


def test_retrain_requested_arms_live_capture_and_selection_commands(tmp_path, settings):
    svc = CaptureService(settings.with_overrides(capture_dir=tmp_path, capture_every_n=1))
    ev = ModelEvent("retrain_requested", "moleflow", 0, product="cells", reasons=["route_ood: 90%"],
                    detail={"camera": "cam-9", "task": "bottle"})
    armed = svc.on_model_event(ev.to_json())
    assert armed.type == "capture_armed" and armed.product == "cells" and armed.detail["camera"] == "cam-9"
    for f in (_frame("live-1", product="cells"), _frame("other", product="bottle")):
        svc.on_live_frame(*encode_frame(f))
    assert [p.name for p in (tmp_path / "cells" / "good").iterdir()] == ["live-1.jpg"]
    sel = CaptureService(settings.with_overrides(capture_dir=tmp_path, capture_policy="select"))
    k, v, h = encode_frame(_frame("pick-me"))
    sel.on_dlq(*dlq_record(k, v, h, "unknown_product", "x"))
    assert not (tmp_path / "elpv").exists()
    sel.on_onboarding(OnboardEvent("capture_select", "elpv", {"frame_ids": ["pick-me"]}).to_json())
    assert (tmp_path / "elpv" / "good" / "pick-me.jpg").is_file()


def test_onboarding_event_schema():
    e = OnboardEvent("training_finished", "elpv", {"rc": 0}, run_id="r1")
    back = decode_event(e.to_json())
    assert (back.type, back.product, back.detail, back.run_id, back.schema) == ("training_finished", "elpv",
                                                                                {"rc": 0}, "r1", 1)
    for bad in (b"{}", b"nope", json.dumps({"schema": 1, "type": "nope", "product": "p"}).encode()):
        with pytest.raises(OnboardEventError):
            decode_event(bad)


# ----------------------------------------------------------------------------- the k8s Job


def test_train_job_rendered_for_a_product():
    import yaml
    doc = yaml.safe_load(render_job(JOB_TEMPLATE.read_text(), product="elpv", detector="moleflow",
                                    train_dir="/models/datasets/elpv/good", model="line7_moleflow",
                                    image=train_image(JOB_TEMPLATE.with_name("kustomization.yaml")), run="abc123ff"))
    assert doc["kind"] == "Job" and doc["metadata"]["name"] == "linewatch-train-elpv-abc123"
    assert doc["metadata"]["namespace"] == "linewatch"
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/linewatch/train:0.1.0"
    assert {"--detector=moleflow", "--product=elpv", "--train-dir=/models/datasets/elpv/good",
            "--base-store=/models/training/moleflow", "--model=line7_moleflow"} <= set(c["args"])
    assert not any("$(TRAIN_" in a for a in c["args"])
    assert {"configMapRef": {"name": "linewatch-train-params"}} not in c["envFrom"]
    assert job_name("Cells_A").startswith("linewatch-train-cells-a-") and len(job_name("x" * 128, "f" * 32)) <= 63


def test_onboard_k8s_dry_run_prints_the_job_without_a_cluster(tmp_path, monkeypatch, capsys):
    good = tmp_path / "caps" / "elpv" / "good"
    good.mkdir(parents=True)
    for i in range(4):
        (good / f"{i}.jpg").write_bytes(_frame(str(i)).image)
    monkeypatch.setenv("LINEWATCH_CAPTURE_DIR", str(tmp_path / "caps"))
    rc = main(["onboard", "--product", "elpv", "--model", "lw_mf", "--min-images", "4", "--k8s", "--dry-run",
               "--bootstrap", "127.0.0.1:1"])
    out = capsys.readouterr().out
    assert rc == 0 and "name: linewatch-train-elpv-" in out and f"--train-dir={good}" in out
    monkeypatch.setenv("LINEWATCH_CAPTURE_DIR", str(tmp_path / "none"))
    assert main(["onboard", "--product", "elpv", "--min-images", "4"]) == 2  # checked before any broker
    assert "only 0 captured images" in capsys.readouterr().err
