"""What every benchmark script records about where it ran (the commit, uncommitted changes, the machine)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short commit of the checkout the script runs from ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _read_git_state() -> dict:
    try:
        # benchmarks/results/ holds outputs, not code: a result file rewritten by an earlier run does not count
        p = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        p = None
    return {"commit": git_commit(), "dirty": bool(p.stdout.strip()) if p is not None and p.returncode == 0 else None}


_AT_START = _read_git_state()  # read when the script starts: edits made while a long benchmark runs do not count


def git_state() -> dict:
    """``{"commit": ..., "dirty": ...}`` of the checkout when the script started: ``dirty`` says whether
    tracked files had uncommitted changes (staged or not), i.e. whether ``commit`` alone reproduces the
    code measured; None when git cannot tell (outside a checkout). Untracked files are not counted
    (earlier results files, scratch output)."""
    return dict(_AT_START)


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces a run: the script (repo-relative) and its arguments."""
    import sys

    return " ".join([script, *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
    gpu = "GPU" if shutil.which("nvidia-smi") else "no GPU"
    return f"{platform.node()} ({os.cpu_count()} CPU, {platform.machine()}, {gpu})"


def require_model_dir(ap, flag: str, path: str | None) -> None:
    """``ap.error`` unless ``path`` (when given) is an exported Triton model directory."""
    from devstack.demo import model_ready

    if path and not model_ready(Path(path).parent, Path(path).name):
        ap.error(f"{flag} {path} is not an exported Triton model (config.pbtxt + version dir)")


def bottle_test_dir(data_dir: Path) -> Path | None:
    """The MVTec bottle test set, or None after one line on stderr (the caller exits 2)."""
    import sys

    d = Path(data_dir) / "mvtec" / "bottle" / "test"
    if not d.is_dir():
        print(f"error: MVTec bottle test set not found at {d} (set LINEWATCH_DATA_DIR)", file=sys.stderr)
        return None
    return d
