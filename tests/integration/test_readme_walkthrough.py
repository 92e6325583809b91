"""README "Locally: release, watch, prove nothing was lost" runs as written (issue #16 item 6).

The shell block is read from README.md and run by bash -e, the way a new user would paste it, in a
scratch checkout layout (``.venv`` and ``../shared`` linked to the real ones) with the stack's work
directory and model repository pointed there, so nothing of the repository or a running dev stack is
touched. It must release a MoLE-Flow adapter for a new product, see it promoted by the stack's
rollout controller, and account for every replayed frame.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^### {re.escape(title)}\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert m, f"no bash block under '### {title}' in README.md"
    return m.group(1)


def test_readme_local_release_walkthrough(tmp_path, shared_data):
    block = readme_block("Locally: release, watch, prove nothing was lost")
    assert "stack up" in block and "train_job" in block and "account" in block
    home = tmp_path / "main"
    home.mkdir()
    (home / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "shared").symlink_to(shared_data.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update({"LINEWATCH_STACK_WORKDIR": str(home / ".stack"), "LINEWATCH_MODEL_REPOSITORY": str(home / "repo"),
                "LINEWATCH_DATA_DIR": str(shared_data)})
    script = home / "walkthrough.sh"
    script.write_text("set -euo pipefail\nset -x\n" + block)
    try:
        p = subprocess.run(["bash", str(script)], cwd=home, env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([str(ROOT / ".venv" / "bin" / "linewatch"), "stack", "down"], cwd=home, env=env,
                       capture_output=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    status = re.search(r"^(\S+)\s+serving=v(\d+)\s+candidate=(\S+)\s+last=(\w+)", p.stdout, re.M)
    assert status and status.group(3) == "-" and status.group(4) == "promoted", p.stdout[-3000:]
    acc = re.search(r"produced (\d+), accounted (\d+), missing (\d+)", out)
    assert acc and acc.group(1) == acc.group(2) and acc.group(3) == "0" and int(acc.group(1)) > 0, out[-3000:]
    print(f"\nREADME walkthrough: {status.group(0)}; {acc.group(0)}")
