"""`linewatch --version`: the installed distribution's version, which is pyproject.toml's."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from stream.ops import cli

REPO = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_package_version_and_exits_0(capsys):
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"linewatch {want}\n"
    assert cli.version() == want


def test_version_without_an_installed_distribution(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli, "_dist_version", missing)
    assert cli.version() == "unknown (not installed)"
