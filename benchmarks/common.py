"""What every benchmark script records about where it ran (the commit, the machine)."""

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
    except OSError:
        return "unknown"


def machine() -> str:
    gpu = "GPU" if shutil.which("nvidia-smi") else "no GPU"
    return f"{platform.node()} ({os.cpu_count()} CPU, {platform.machine()}, {gpu})"
