"""Session fixtures: the real embedded stack (Tansu broker + tritonserver), started once.

If the stack cannot start, every integration test FAILS with the log tail (never skips):
the integration suite exists to prove the real components work. A prerequisite `make` installs
(a tool, a [dev] package, the shared data) is checked by tests/harness/requires.py: skipped where
missing, failed under ``CI=true``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.config import Settings
from tests.harness.reliability import ReliabilityLog
from tests.harness.requires import (  # noqa: F401 - hooks: the ``requires`` mark, checked before fixtures
    pytest_configure,
    pytest_runtest_setup,
)


def pytest_addoption(parser):
    parser.addoption("--it-model-dir", default=None,
                     help="an exported Triton model dir for the streaming integration tests (default: train a tiny one)")
    parser.addoption("--reliability-out", default=None,
                     help="write the failure-safety scenarios' accounting rows here (benchmarks/reliability.py)")


def pytest_collection_modifyitems(config, items):
    """Modules with a ``slow`` test first, then integration modules, then the rest (a stable sort: each module's
    tests stay together and in order). ``make test`` runs two pytest-xdist processes that take one module at a
    time in this order; the longest modules start early instead of ending the run on one process."""
    def rank(module: str) -> int:
        marks = {m.name for it in by_module[module] for m in it.iter_markers()}
        return 0 if "slow" in marks else 1 if "integration" in marks else 2

    by_module: dict[str, list] = {}
    for it in items:
        by_module.setdefault(it.nodeid.split("::")[0], []).append(it)
    ranks = {m: rank(m) for m in by_module}
    items.sort(key=lambda it: ranks[it.nodeid.split("::")[0]])


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """In-process torch work uses this process's share of the cores (tests/harness/cpu.py)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        from tests.harness.cpu import cpu_threads

        torch.set_num_threads(cpu_threads(cap=os.cpu_count() or 1))


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The test session's config root (environment + LINEWATCH_CONFIG), built once."""
    return Settings()


@pytest.fixture(scope="session")
def shared_data(settings) -> Path:
    d = Path(settings.data_dir).resolve()  # absolute: tests symlink images into temporary folders
    if not (d / "mvtec" / "bottle" / "train" / "good").is_dir():
        pytest.fail(f"real data not found at {d} (set LINEWATCH_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    from devstack.stack import LocalStack

    root = tmp_path_factory.mktemp("stack")
    stack = LocalStack(root / "work", root / "model_repository", start_timeout_s=90)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_stack) -> str:
    return local_stack.kafka_bootstrap


@pytest.fixture(scope="session")
def triton_grpc_url(local_stack) -> str:
    return local_stack.triton_grpc_url


@pytest.fixture(scope="session")
def reliability_log(pytestconfig):
    """Failure-safety tests (integration, and the unit tests that run real processes) record their
    ``linewatch account`` report per scenario; with ``--reliability-out FILE`` the rows are written there
    (benchmarks/reliability.py reads them)."""
    rows = ReliabilityLog()
    yield rows
    out = pytestconfig.getoption("--reliability-out")
    if out:
        rows.write(Path(out))


@pytest.fixture
def reliability(reliability_log, request):
    return reliability_log.bind(request.node.nodeid)
