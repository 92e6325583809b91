"""tests/harness/requires.py: a missing prerequisite `make` installs is a skip, and a failure under CI=true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.requires import require, require_module

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ci", ["", "false", "1"])
def test_missing_prerequisite_skips_outside_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    require(True, "present")  # nothing
    with pytest.raises(pytest.skip.Exception, match="no such tool"):
        require(False, "no such tool")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_module("linewatch_no_such_module_xyz")


@pytest.mark.parametrize("ci", ["true", "TRUE", " true "])
def test_missing_prerequisite_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    require(True, "present")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*no such tool"):
        require(False, "no such tool")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*linewatch_no_such_module_xyz"):
        require_module("linewatch_no_such_module_xyz")
    assert require_module("json").dumps([1]) == "[1]"


def test_requires_mark_fails_before_fixtures_under_ci(tmp_path):
    """The mark form, through a real pytest run: skipped without CI, an error under CI=true, and in both cases
    the test's fixture never ran (the check is before setup)."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "from tests.harness.requires import requires\n"
        "@pytest.fixture\n"
        "def costly():\n"
        "    raise AssertionError('fixture set up')\n"
        "@requires(False, 'no such tool')\n"
        "def test_needs_tool(costly):\n"
        "    pass\n"
        "@requires(True, 'present')\n"
        "def test_has_tool():\n"
        "    pass\n")

    def run(ci: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CI": ci}
        return subprocess.run([sys.executable, "-m", "pytest", "-c", "/dev/null", "--rootdir", str(tmp_path),
                               "-p", "tests.harness.requires", "-p", "no:cacheprovider", "-q", "-rs",
                               str(tmp_path / "test_x.py")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    local = run("")
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 passed, 1 skipped" in local.stdout and "no such tool" in local.stdout
    ci = run("true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "1 passed, 1 error" in ci.stdout and "CI=true" in ci.stdout and "fixture set up" not in ci.stdout
