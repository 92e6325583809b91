"""Every linewatch container in k8s/ starts: its args parse with the real CLI parsers, its environment
loads into Settings, what it writes is on a writable mount, and the probe dials a served port."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from contracts.config import Settings
from tests.harness.k8s import KUSTOMIZATIONS, SERVICE, all_workloads, by_kind, needs_renderer, render

# ---------------------------------------------------------------- every container starts


ENTRYPOINTS = {"linewatch/worker": ["linewatch"], "linewatch/train": ["linewatch-models"]}


def _containers():
    base = {n: d.get("data", {}) for n, d in by_kind(render("base"), "ConfigMap").items()}
    for name in KUSTOMIZATIONS:
        # the training Job is applied next to the service: it reads the service's linewatch-config
        cms = {**base, **{n: d.get("data", {}) for n, d in by_kind(render(name), "ConfigMap").items()}}
        for _, obj, spec in all_workloads((name,)):
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield name, obj, spec, c, cms


def _env(c: dict, cms: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets as placeholders)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", "secret-placeholder")
    return env


def _argv(c: dict, env: dict[str, str]) -> tuple[str, list[str]] | None:
    """(program, args) of a linewatch container with $(VAR) expanded as Kubernetes does, else None."""
    image = re.sub(r"^ghcr\.io/", "", c["image"].rsplit(":", 1)[0])
    command = c.get("command") or ENTRYPOINTS.get(image)
    if not command or command[0] not in ("linewatch", "linewatch-models"):
        return None
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in [*command[1:], *c.get("args", [])]]
    return command[0], args


@needs_renderer
def test_every_linewatch_container_parses_its_args_and_settings(monkeypatch):
    """Each container's command line is parsed by the real CLI parser and its environment loads into
    Settings (unknown LINEWATCH_* names, bad values or a SASL protocol without credentials fail here,
    not in the pod)."""
    from models.cli import build_parser as models_parser
    from stream.ops.cli import build_parser as linewatch_parser

    parsers = {"linewatch": linewatch_parser(), "linewatch-models": models_parser()}
    checked = set()
    for name, obj, _spec, c, cms in _containers():
        env = _env(c, cms)
        cmd = _argv(c, env)
        if cmd is None:
            continue
        prog, args = cmd
        try:
            parsers[prog].parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{name}: {obj['metadata']['name']}/{c['name']}: `{prog} {' '.join(args)}` exits {e.code}")
        for k in [k for k in os.environ if k.startswith("LINEWATCH_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            if k.startswith("LINEWATCH_"):
                monkeypatch.setenv(k, v)
        Settings()
        checked.add((obj["metadata"]["name"], c["name"]))
    assert {("linewatch-worker", "worker"), ("linewatch-controller", "controller"),
            ("linewatch-train-adapter", "train")} <= checked


@needs_renderer
def test_every_path_a_container_writes_is_on_a_writable_mount(monkeypatch):
    """readOnlyRootFilesystem: the worker's data dir and the train job's stores must be writable mounts."""
    for name, obj, _spec, c, cms in _containers():
        env = _env(c, cms)
        cmd = _argv(c, env)
        if cmd is None or not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
            continue
        writes = []
        if cmd[1][:1] == ["worker"]:
            writes.append(env.get("LINEWATCH_WORKER_DATA_DIR", str(Settings.model_fields["worker_data_dir"].default)))
        if cmd[1][:1] == ["controller"]:  # the controller materialises verified versions into Triton's repository
            writes.append(env.get("LINEWATCH_MODEL_REPOSITORY", str(Settings.model_fields["model_repository"].default)))
        writes += [a.split("=", 1)[1] for a in cmd[1] if a.startswith(("--store=", "--base-store=", "--out="))]
        writable = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
        for path in writes:
            assert any(Path(path).is_relative_to(m) for m in writable), \
                f"{name}: {obj['metadata']['name']}/{c['name']} writes {path}, not on a writable mount {writable}"


@needs_renderer
def test_worker_web_port_is_served_where_the_probe_dials():
    for name in SERVICE:
        docs = render(name)
        cms = {n: d.get("data", {}) for n, d in by_kind(docs, "ConfigMap").items()}
        (c,) = by_kind(docs, "Deployment")["linewatch-worker"]["spec"]["template"]["spec"]["containers"]
        env = _env(c, cms)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        probe = c["livenessProbe"]["tcpSocket"]["port"]
        port = ports.get(probe, probe)
        assert int(env.get("LINEWATCH_WORKER_WEB_PORT", Settings.model_fields["worker_web_port"].default)) == port
        # the probe dials the pod IP: the web server must bind all interfaces, not loopback
        assert env.get("LINEWATCH_WORKER_WEB_HOST") == "0.0.0.0", name
