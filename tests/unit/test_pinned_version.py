"""stream.lifecycle.repository.pinned_version reads the version a config pins through Triton's schema, in any
layout Triton accepts: what the controller writes now (contracts.pbtxt, protobuf text format), the older
one-line layout and a hand-edited config. The controller's restore after an empty broker depends on it
(test_stack_down_up_restores_serving_versions failed when it only matched the old one-line layout)."""

from __future__ import annotations

import pytest

from contracts.pbtxt import rewrite_config
from stream.lifecycle.repository import pinned_version

BASE = 'name: "m"\nbackend: "python"\nmax_batch_size: 8\n'


def _write(tmp_path, text: str):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.pbtxt").write_text(text)
    return tmp_path


def test_the_layout_the_controller_writes(tmp_path):
    text = rewrite_config(BASE, "m", [3])
    assert "versions: [3]" not in text  # protobuf's text format, not the old one-line layout
    assert pinned_version(_write(tmp_path, text), "m") == 3


@pytest.mark.parametrize(("policy", "want"), [
    ("version_policy: { specific: { versions: [2] } }", 2),  # the older one-line layout
    ("version_policy {\n  # pinned by hand\n  specific { versions: 7 }\n}", 7),
    ("version_policy: { specific: { versions: [1, 2] } }", None),  # two versions: nothing pinned
    ("version_policy: { latest: { num_versions: 1 } }", None),
    ("", None),
])
def test_other_layouts_and_policies(tmp_path, policy, want):
    assert pinned_version(_write(tmp_path, BASE + policy + "\n"), "m") == want


def test_missing_or_unparsable_config_pins_nothing(tmp_path):
    assert pinned_version(tmp_path, "m") is None
    assert pinned_version(_write(tmp_path, BASE + "no_such_field: 1\n"), "m") is None
