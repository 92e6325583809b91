"""Exports claim their version directory atomically (models.artifacts.claim_version_dir): two onboardings of
one product at once (issue #26, the per-product detectors' side of item 9) never write into the same version."""

from __future__ import annotations

import threading

import pytest

from contracts.artifact import ArtifactError
from models.artifacts import claim_version_dir


def test_exports_at_once_get_distinct_versions(tmp_path):
    model_dir = tmp_path / "efficientad_bottle"
    (model_dir / "1").mkdir(parents=True)  # an earlier version
    n, go, got, lock = 12, threading.Barrier(12), [], threading.Lock()

    def export():
        go.wait()  # every export lists the model dir at the same moment
        v = claim_version_dir(model_dir, None)
        with lock:
            got.append(int(v.name))

    threads = [threading.Thread(target=export) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == list(range(2, 2 + n))  # each its own version, none lost, none shared


def test_an_explicit_version_with_files_is_refused(tmp_path):
    model_dir = tmp_path / "m"
    assert claim_version_dir(model_dir, 3) == model_dir / "3"
    assert claim_version_dir(model_dir, 3) == model_dir / "3"  # empty: reused (an export that failed early)
    (model_dir / "3" / "model.pt").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not empty"):
        claim_version_dir(model_dir, 3)
