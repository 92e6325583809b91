import json

import pytest

from contracts.envelope import EnvelopeError, Frame
from stream.inference.routing import Route, Router, RoutingConfig


def F(camera="cam-1", line=None, product=None, task=None):
    return Frame(frame_id="f", camera_id=camera, ts_ms=0, image=b"x", line_id=line, product=product, task=task)


CFG = RoutingConfig.from_dict({"cameras": {"cam-1": "bottle", "cam-2": "cable"}, "lines": {"line-a": "screw"},
                               "products": {"pill": "custom_pill"}})


def test_camera_line_header_precedence():
    r = Router(CFG, {"efficientad_bottle", "efficientad_screw", "efficientad_cable", "efficientad_hazelnut"})
    assert r.route(F("cam-1")) == Route("efficientad_bottle", "", "bottle", False)
    assert r.route(F("cam-9", line="line-a")).model == "efficientad_screw"
    assert r.route(F("cam-1", product="hazelnut")).model == "efficientad_hazelnut"  # header wins
    assert r.route(F("cam-2", line="line-a")).model == "efficientad_cable"  # camera beats line


def test_explicit_product_model():
    r = Router(CFG, {"custom_pill", "efficientad_pill"})
    assert r.route(F("x", product="pill")).model == "custom_pill"


def test_unknown_product_to_moleflow_task_agnostic():
    r = Router(CFG, {"efficientad_bottle": (), "moleflow": ("bottle", "cable")})
    assert r.route(F("cam-77")) == Route("moleflow", "", None, True)
    assert r.route(F("cam-77", product="wood")) == Route("moleflow", "", "wood", True)
    # product known to moleflow but no efficientad model -> moleflow with that task, not routed
    assert r.route(F("cam-2")) == Route("moleflow", "cable", "cable", False)
    # efficientad preferred when loaded
    assert r.route(F("cam-1")).model == "efficientad_bottle"


def test_unknown_product_without_moleflow_is_dlq():
    r = Router(CFG, {"efficientad_bottle"})
    with pytest.raises(EnvelopeError) as ei:
        r.route(F("cam-77"))
    assert ei.value.reason == "unknown_product" and "cam-77" in ei.value.detail
    with pytest.raises(EnvelopeError) as ei:
        r.route(F("cam-2"))
    assert ei.value.reason == "unknown_product" and "cable" in ei.value.detail


def test_update_models():
    r = Router(CFG, set())
    with pytest.raises(EnvelopeError):
        r.route(F("cam-1"))
    r.update_models({"efficientad_bottle"})
    assert r.route(F("cam-1")).model == "efficientad_bottle"


def test_load_from_file_and_inline(tmp_path):
    p = tmp_path / "routing.json"
    p.write_text(json.dumps({"cameras": {"a": "bottle"}}))
    assert RoutingConfig.load(p).cameras == {"a": "bottle"}
    assert RoutingConfig.load('{"lines": {"l": "x"}}').lines == {"l": "x"}
    assert RoutingConfig.load(None) == RoutingConfig()
    with pytest.raises(ValueError, match="unknown keys"):
        RoutingConfig.load({"camera": {}})
    with pytest.raises(ValueError, match="cameras"):
        RoutingConfig.load({"cameras": {"a": 1}})
    with pytest.raises(ValueError, match="does not exist"):
        RoutingConfig.load(tmp_path / "nope.json")


def test_any_moleflow_model_serves_its_tasks_but_never_a_rollout_candidate():
    # a MoLE-Flow model under another name is found by its tasks (what Triton reports), on every replica
    r = Router(CFG, {"line7_moleflow": ("bottle", "cells"), "line7_moleflow__candidate": ("bottle", "cells", "wood")})
    assert r.route(F("x", product="cells")) == Route("line7_moleflow", "cells", "cells", False)
    # only the candidate knows "wood": not routed there (shadow only) -> no model for it
    with pytest.raises(EnvelopeError) as e:
        r.route(F("x", product="wood"))
    assert e.value.reason == "unknown_product"
    # an explicit product -> MoLE-Flow model mapping picks the product's adapter
    r2 = Router(RoutingConfig.from_dict({"products": {"pill": "line7_moleflow"}}), {"line7_moleflow": ("pill",)})
    assert r2.route(F("x", product="pill")) == Route("line7_moleflow", "pill", "pill", False)


def test_model_names_come_from_the_detector_registry():
    from contracts.detectors import DETECTORS

    per_product = [d for d in DETECTORS.values() if not d.multi_task]
    multi = [d for d in DETECTORS.values() if d.multi_task]
    assert per_product and multi
    r = Router(CFG, {per_product[0].model_name("bottle"): (), multi[0].model_name(): ("bottle",)})
    # a per-product model beats the multi-task model's task for the same product (registry order irrelevant)
    assert r.route(F("cam-1")) == Route(per_product[0].model_name("bottle"), "", "bottle", False)
    assert r.route(F("cam-77")) == Route(multi[0].model_name(), "", None, True)
    assert per_product[0].product_of(per_product[0].model_name("bottle")) == "bottle"


def test_detector_models_override_names():
    cfg = RoutingConfig.from_dict({"cameras": {"c": "bottle"},
                                   "detector_models": {"efficientad": "ead-{product}-v2", "moleflow": "line7_mf"}})
    r = Router(cfg, {"ead-bottle-v2", "efficientad_bottle"})
    assert r.route(F("c")).model == "ead-bottle-v2"
    r.update_models({"line7_mf": ("bottle",), "moleflow": ("bottle",)})
    assert r.route(F("c")) == Route("line7_mf", "bottle", "bottle", False)
    assert r.route(F("x")) == Route("line7_mf", "", None, True)  # task-agnostic fallback: the configured name
    with pytest.raises(ValueError, match="unknown detector"):
        RoutingConfig.from_dict({"detector_models": {"nope": "x"}})
    with pytest.raises(ValueError, match="product"):
        RoutingConfig.from_dict({"detector_models": {"efficientad": "fixed_name"}})
