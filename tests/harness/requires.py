"""Prerequisites of a test that ``make`` installs: skip where they are missing, FAIL under ``CI=true``.

A test whose tool, package or data the Makefile / the ``[dev]`` extra provides (kustomize or kubectl,
promtool, hadolint, chromium + chromedriver found on PATH, confluent-kafka, PyYAML, jsonschema,
kubernetes-validate, selenium, elpv-dataset, torch, the shared weights and data under ``../shared/data``)
must not pass silently by skipping where the suite is the evidence: with ``CI=true`` in the environment a
missing prerequisite is a failure. Elsewhere (a laptop without chromium) it stays a skip with the reason.
Conditions no ``make`` target can provide (a GPU: ``torch.cuda.is_available()``, ``nvidia-smi``) stay
plain ``pytest.skip`` / ``skipif`` in their tests.

Three forms, one rule (:func:`require`):

- ``require(condition, reason)`` inside a test (or at module level);
- ``require_module("yaml", reason)`` for an import (``pytest.importorskip``'s place);
- ``@requires(condition, reason)`` / ``pytestmark = [requires(...)]`` for a mark (``skipif``'s place),
  checked before any fixture is set up (tests/conftest.py runs :func:`pytest_runtest_setup`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

MARK = "requires"


def in_ci() -> bool:
    """``CI=true`` (any case): missing prerequisites fail."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(condition: object, reason: str) -> None:
    """Nothing when ``condition`` holds; else ``pytest.fail`` under ``CI=true``, ``pytest.skip`` otherwise."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite `make` installs is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str = "") -> ModuleType:
    """``import name``, or :func:`require` fails/skips with ``reason`` (and the import error)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"{reason or f'python package {name!r} is not installed (the [dev] extra: make venv)'} ({e})")
        raise  # unreachable: require raised


def requires(condition: object, reason: str) -> pytest.MarkDecorator:
    """The mark form of :func:`require`, evaluated (once, at import) where it is written and applied before
    the test's fixtures are set up."""
    return getattr(pytest.mark, MARK)(bool(condition), reason=reason)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{MARK}(condition, reason): a prerequisite `make` installs "
                                       "(tests/harness/requires.py: skipped where missing, failed under CI=true)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers(MARK):
        require(mark.args[0], mark.kwargs["reason"])
