import orjson
import pytest

from contracts.model_events import SCHEMA_VERSION, ModelEvent, ModelEventError, decode, encode, fold_status

SHA = "a" * 64


def test_released_roundtrip():
    ev = ModelEvent("released", "efficientad_bottle", 3, product="bottle", detector="efficientad",
                    artifact_uri="file:///store/efficientad_bottle/3", sha256=SHA)
    key, value = encode(ev)
    assert key == b"efficientad_bottle"
    d = orjson.loads(value)
    assert d["schema"] == SCHEMA_VERSION and d["type"] == "released" and d["sha256"] == SHA
    back = decode(value)
    assert back == ev


@pytest.mark.parametrize("patch,field", [
    ({"schema": 2}, "schema"), ({"type": "exploded"}, "type"), ({"model": "a b"}, "model"),
    ({"version": 0}, "version"), ({"version": "3"}, "version"), ({"sha256": "xyz"}, "sha256"),
    ({"artifact_uri": None}, "artifact_uri"), ({"reasons": "bad"}, "reasons"), ({"detail": []}, "detail"),
])
def test_invalid_fields_named(patch, field):
    d = {"schema": 1, "type": "released", "model": "m", "version": 1, "artifact_uri": "/x", "sha256": SHA}
    d.update(patch)
    with pytest.raises(ModelEventError, match=field):
        decode(orjson.dumps(d))


def test_not_json_and_reasons_required():
    with pytest.raises(ModelEventError, match="not JSON"):
        decode(b"{nope")
    with pytest.raises(ModelEventError, match="reasons"):
        ModelEvent("rolled_back", "m", 2)
    ev = ModelEvent("refused", "m", 2, reasons=["sha256_mismatch: x"])
    assert decode(ev.to_json()).reasons == ["sha256_mismatch: x"]


def test_unknown_fields_ignored_and_retrain_version_zero():
    d = ModelEvent("retrain_requested", "moleflow", 0, product="cells", reasons=["route_ood"]).to_dict()
    d["future_field"] = 1
    assert decode(d).type == "retrain_requested"


def test_fold_status():
    evs = [ModelEvent("promoted", "m", 1),
           ModelEvent("released", "m", 2, artifact_uri="/x", sha256=SHA),
           ModelEvent("rolled_back", "m", 2, previous_version=1, reasons=["score_distribution"]),
           ModelEvent("released", "m", 3, artifact_uri="/x", sha256=SHA),
           ModelEvent("promoted", "m", 3, previous_version=1)]
    s = fold_status(evs)["m"]
    assert s["serving_version"] == 3 and s["candidate_version"] is None and s["last_event"] == "promoted"
    assert s["history"][2]["reasons"] == ["score_distribution"]
