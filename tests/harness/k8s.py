"""Rendering the kustomizations in k8s/ for the offline manifest tests (tests/unit/test_k8s_*.py).

Renderer: `kustomize build` if a kustomize binary is on PATH, else `kubectl kustomize` (kubectl's
embedded kustomize; Debian: `apt-get install -y kubernetes-client`). No cluster, no network.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import yaml

from tests.harness.requires import requires

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
KUSTOMIZATIONS = {"base": K8S / "base", "dev": K8S / "overlays/dev", "prod": K8S / "overlays/prod",
                  "train": K8S / "train"}
SERVICE = ("base", "dev", "prod")
K8S_VERSION = "1.30.0"  # oldest Kubernetes minor we support (policy/v1 PDB, batch/v1 Job TTL, ...)
ENV_NAMES = {"LINEWATCH_KAFKA_BOOTSTRAP", "LINEWATCH_KAFKA_SECURITY_PROTOCOL", "LINEWATCH_KAFKA_SASL_MECHANISM",
             "LINEWATCH_KAFKA_SASL_USERNAME", "LINEWATCH_KAFKA_SASL_PASSWORD", "LINEWATCH_KAFKA_SSL_CAFILE",
             "LINEWATCH_TRITON_GRPC_URL", "LINEWATCH_DEV_BROKER", "LINEWATCH_WORKER_DATA_DIR"}


def _renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    return None


RENDERER = _renderer()
RENDERER_MISSING = ("no kustomize renderer: install one (Debian: apt-get install -y kubernetes-client, "
                    "or a kustomize binary on PATH; make venv does)")
# skipped where missing, a failure under CI=true (tests/harness/requires.py)
needs_renderer = requires(RENDERER is not None, RENDERER_MISSING)


@cache
def render(name: str) -> tuple[dict, ...]:
    proc = subprocess.run([*RENDERER, str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kustomize failed for {name}:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{name} rendered nothing"
    return docs


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(obj: dict) -> dict | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def all_workloads(names=tuple(KUSTOMIZATIONS)):
    for name in names:
        for obj in render(name):
            spec = pod_spec(obj)
            if spec is not None:
                yield name, obj, spec
