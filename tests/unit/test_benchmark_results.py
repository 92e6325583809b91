"""Every committed benchmark result can be reproduced from this checkout: it names the command that made it
(a script that exists here), the commit it ran at (an ancestor of HEAD) and a clean tree at that commit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _field(doc: dict, key: str):
    """``key`` at the top level or in the ``meta`` block."""
    return doc[key] if key in doc else (doc.get("meta") or {}).get(key)


def test_there_are_results():
    assert len(RESULTS) >= 4, RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_result_names_a_command_a_clean_commit_of_this_history(path: Path):
    doc = json.loads(path.read_text())
    command, commit, dirty = _field(doc, "command"), _field(doc, "commit"), _field(doc, "dirty")
    assert isinstance(command, str) and command.split()[0].startswith("benchmarks/"), command
    assert (ROOT / command.split()[0]).is_file(), f"{path.name}: {command.split()[0]} is not in this checkout"
    assert dirty is False, f"{path.name}: measured on a dirty tree ({dirty!r})"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("git history is needed to check the commit (a clone, not an export)")
    r = subprocess.run(["git", "merge-base", "--is-ancestor", str(commit), "HEAD"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, f"{path.name}: commit {commit!r} is not an ancestor of HEAD ({r.stderr.decode()[:200]})"
