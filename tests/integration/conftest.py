"""Fixtures shared by the streaming integration tests (the session stack is in tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devstack.demo import load_model, model_ready
from models.locks import store_lock
from tests.harness.streams import tiny_efficientad


@pytest.fixture(scope="session")
def stack(local_stack):
    """tests/conftest.py's session ``local_stack`` (real Tansu + tritonserver)."""
    return local_stack


@pytest.fixture(scope="session")
def bottle_test(shared_data) -> Path:
    return shared_data / "mvtec" / "bottle" / "test"


@pytest.fixture(scope="session")
def detector(stack, shared_data, tmp_path_factory, pytestconfig) -> str:
    """Name of a real exported detector loaded in the session Triton: ``--it-model-dir`` when given,
    else a tiny-schedule EfficientAD trained into a temporary directory (trained once per session)."""
    given = pytestconfig.getoption("--it-model-dir")
    if given and not model_ready(Path(given).parent, Path(given).name):
        pytest.fail(f"--it-model-dir {given} is not an exported Triton model directory")
    src = Path(given) if given else _shared_tiny_efficientad(tmp_path_factory, shared_data)
    dst = Path(stack.model_repository) / src.name
    if dst.resolve() != src.resolve():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    load_model(stack.triton_grpc_url, src.name, control_key=stack.control_key)
    return src.name


def _shared_tiny_efficientad(tmp_path_factory, shared_data: Path) -> Path:
    """The tiny EfficientAD, trained once per test session: under pytest-xdist (``make test``) the worker
    processes share it through the session's base directory, the first one training it under a file lock
    while the others wait (each would otherwise spend ~1 CPU-minute training the same model)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tiny_efficientad(tmp_path_factory.mktemp("it-model"), shared_data)
    cache = tmp_path_factory.getbasetemp().parent / "it-model"  # pytest-N/: this session's, shared by its workers
    with store_lock(cache, what="tiny EfficientAD"):
        done = cache / "done"
        if not done.is_file():
            src = tiny_efficientad(cache, shared_data)
            done.write_text(str(src))
        return Path(done.read_text())
