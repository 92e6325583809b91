"""The pure counting behind `linewatch account` (stream/ops/accounting.py: Ledger, Report) and its CLI wiring."""

from __future__ import annotations

import orjson
import pytest

from contracts.envelope import Frame, InspectionResult, dlq_record, encode_frame
from stream.ops.accounting import Ledger, _frame_key
from stream.ops.cli import build_parser


def _frame(fid: str, cam: str = "cam-1", image: bytes = b"\x89PNG..."):
    return encode_frame(Frame(frame_id=fid, camera_id=cam, ts_ms=1, image=image, product="bottle"))


def _result(fid: str) -> bytes:
    return InspectionResult(frame_id=fid, camera="cam-1", line=None, model="m", model_version="1", task="",
                            routed=False, route_distance=None, score=0.1, threshold=0.5, is_anomaly=False).to_json()


def test_every_frame_with_a_result_or_dlq_record_is_accounted():
    led = Ledger()
    for fid in ("a", "b", "c"):
        led.add_frame(*_frame(fid))
    led.add_result(_result("a"))
    led.add_result(_result("b"))
    k, v, h = _frame("c")
    led.add_dlq(*dlq_record(k, v, h, "undecodable_image", "bad png"))
    rep = led.report()
    assert (rep.produced, rep.accounted, rep.missing) == (3, 3, [])
    assert rep.results == 2 and rep.dlq == 1 and rep.dlq_reasons == {"undecodable_image": 1}
    assert rep.duplicated == {} and rep.duplicate_results == 0 and rep.in_both == []
    assert rep.ok


def test_missing_frames_are_listed_and_fail_the_report():
    led = Ledger()
    for fid in ("a", "b", "c", "d"):
        led.add_frame(*_frame(fid))
    led.add_result(_result("b"))
    rep = led.report()
    assert rep.missing == ["a", "c", "d"]  # in produce order
    assert rep.accounted == 1 and not rep.ok


def test_duplicate_results_are_counted_per_frame_not_as_extra_frames():
    led = Ledger()
    for fid in ("a", "b"):
        led.add_frame(*_frame(fid))
    for fid in ("a", "a", "a", "b"):  # at-least-once redelivery after a crash
        led.add_result(_result(fid))
    rep = led.report()
    assert rep.ok and rep.accounted == 2
    assert rep.results == 4 and rep.duplicated == {"a": 3} and rep.duplicate_results == 2


def test_order_of_topics_does_not_matter():
    led = Ledger()
    led.add_result(_result("late"))  # result read before its frame
    led.add_frame(*_frame("late"))
    assert led.report().missing == []


def test_results_for_unknown_frames_and_unreadable_records_do_not_count_as_accounted():
    led = Ledger()
    led.add_frame(*_frame("a"))
    led.add_result(_result("someone-else"))
    led.add_result(b"not json")
    led.add_result(orjson.dumps({"frame_id": 7}))
    led.add_result(orjson.dumps([1, 2]))
    rep = led.report()
    assert rep.missing == ["a"]
    assert rep.unexpected == 1 and rep.unreadable_results == 3 and rep.results == 0


def test_frame_without_frame_id_is_matched_to_its_dlq_record_by_fingerprint():
    k, v, h = _frame("x")
    h = [(a, b) for a, b in h if a != "frame_id"]
    k2, v2, h2 = _frame("y", image=b"other bytes")
    h2 = [(a, b) for a, b in h2 if a != "frame_id"]
    led = Ledger()
    fid = led.add_frame(k, v, h)
    led.add_frame(k2, v2, h2)
    assert fid.startswith("anon:")
    led.add_dlq(*dlq_record(k, v, h, "missing_header", "frame header 'frame_id' is missing"))
    rep = led.report()
    assert rep.produced == 2 and rep.dlq == 1
    assert rep.missing == [_frame_key(k2, v2, h2)]  # the other anonymous frame is still unaccounted


def test_oversized_anonymous_frame_matches_its_dlq_record_by_original_sha256():
    import hashlib

    k, v, h = _frame("big", image=b"\x89PNG" + b"\0" * 5000)
    h = [(a, b) for a, b in h if a != "frame_id"]
    led = Ledger()
    led.add_frame(k, v, h)
    # the worker drops an oversized value from the DLQ record and keeps its size + sha256
    dlq_h = h + [("error_original_bytes", str(len(v)).encode()),
                 ("error_original_sha256", hashlib.sha256(v).hexdigest().encode()), ("error", b"too_large")]
    led.add_dlq(k, b"", dlq_h)
    rep = led.report()
    assert rep.ok and rep.dlq == 1 and rep.dlq_reasons == {"too_large": 1} and rep.unexpected == 0


def test_dlq_record_that_lost_its_frame_id_header_matches_by_content():
    k, v, h = _frame("x" * 300)  # an over-long frame_id: the DLQ record leaves such a header out
    led = Ledger()
    led.add_frame(k, v, h)
    led.add_frame(*_frame("ok"))
    led.add_result(_result("ok"))
    led.add_dlq(k, v, [(a, b) for a, b in h if a != "frame_id"] + [("error", b"bad_header")])
    rep = led.report()
    assert rep.ok and rep.accounted == 2 and rep.dlq == 1


def test_dlq_record_for_no_produced_frame_is_unexpected_not_accounted():
    led = Ledger()
    led.add_frame(*_frame("a"))
    led.add_dlq(*dlq_record(*_frame("zzz", image=b"other"), "undecodable_image", "x"))
    rep = led.report()
    assert rep.missing == ["a"] and rep.dlq == 0 and rep.unexpected == 1


def test_dlq_and_result_for_the_same_frame_is_flagged():
    led = Ledger()
    k, v, h = _frame("a")
    led.add_frame(k, v, h)
    led.add_result(_result("a"))
    led.add_dlq(*dlq_record(k, v, h, "inference_error", "boom"))
    rep = led.report()
    assert rep.ok and rep.in_both == ["a"] and rep.dlq == 1


def test_frame_published_twice_is_one_frame_two_records():
    led = Ledger()
    led.add_frame(*_frame("a"))
    led.add_frame(*_frame("a"))
    led.add_result(_result("a"))
    rep = led.report()
    assert rep.produced == 1 and rep.frame_records == 2 and rep.ok


def test_incomplete_read_fails_even_without_missing_frames():
    led = Ledger()
    led.add_frame(*_frame("a"))
    led.add_result(_result("a"))
    rep = led.report(complete=False, end_offsets={"frames": 1})
    assert not rep.missing and not rep.ok
    d = rep.to_dict()
    assert d["ok"] is False and d["end_offsets"] == {"frames": 1}


def test_cli_registers_account_verb_with_topic_flags():
    a = build_parser().parse_args(["account", "--frames-topic", "f", "--results-topic", "r", "--dlq-topic", "d",
                                   "--bootstrap", "127.0.0.1:1", "--json", "--wait", "5"])
    assert (a.frames_topic, a.results_topic, a.dlq_topic, a.bootstrap, a.json, a.wait) == ("f", "r", "d",
                                                                                           "127.0.0.1:1", True, 5.0)


def test_cli_bad_args_are_one_line_errors(capsys):
    from stream.ops.cli import main

    with pytest.raises(SystemExit) as e:
        main(["account", "--wait", "soon"])
    assert e.value.code == 2
    assert main(["account", "--bootstrap", "127.0.0.1:1", "--wait", "-1"]) == 2  # a bad value is a usage error (contracts.cli convention)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "linewatch: error: --wait must be >= 0"
