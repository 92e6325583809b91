"""Offline validation of k8s/: render every kustomization with a real kustomize, validate every
rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate) and the vendored
Strimzi/KEDA CRD schemas (k8s/schemas/, jsonschema), then check what matters for operating it.

Renderer: `kustomize build` if a kustomize binary is on PATH, else `kubectl kustomize` (kubectl's
embedded kustomize; Debian: `apt-get install -y kubernetes-client`). No cluster, no network.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from contracts.config import Settings, env_names

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
KUSTOMIZATIONS = {"base": K8S / "base", "dev": K8S / "overlays/dev", "prod": K8S / "overlays/prod",
                  "train": K8S / "train"}
SERVICE = ("base", "dev", "prod")
K8S_VERSION = "1.30.0"  # oldest Kubernetes minor we support (policy/v1 PDB, batch/v1 Job TTL, ...)
TOPICS = {"frames", "inspection-results", "defect-events", "drift-alerts", "model-events", "frames-dlq"}
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
needs_renderer = pytest.mark.skipif(
    RENDERER is None,
    reason="no kustomize renderer: install one (Debian: apt-get install -y kubernetes-client, "
    "or a kustomize binary on PATH)",
)


@cache
def render(name: str) -> tuple[dict, ...]:
    proc = subprocess.run([*RENDERER, str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kustomize failed for {name}:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{name} rendered nothing"
    return docs


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _strict(schema):
    """Reject unknown fields where the CRD schema is structural (like --validate=strict)."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if s.get("type") == "object" and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s.setdefault("additionalProperties", False)
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    return schema


@cache
def crd_validators() -> dict[tuple[str, str], object]:
    out = {}
    for f in sorted(SCHEMAS.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        schema = _strict(doc["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        out[(doc["apiVersion"], doc["kind"])] = jsonschema.Draft7Validator(schema)
    return out


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


# ---------------------------------------------------------------- schema validation


def test_vendored_crd_schemas_are_valid_json_schema():
    validators = crd_validators()
    assert {k for _, k in validators} >= {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ScaledObject",
                                          "TriggerAuthentication"}


@needs_renderer
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_rendered_object_validates(name):
    validators = crd_validators()
    errors = []
    for obj in render(name):
        key = (obj["apiVersion"], obj["kind"])
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in validators:
            errs = sorted(validators[key].iter_errors(obj), key=lambda e: list(e.path))
            errors += [f"{ident}: {'.'.join(map(str, e.path))}: {e.message}" for e in errs]
        elif "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].startswith(
            ("apps/", "batch/", "policy/", "networking.k8s.io/", "rbac.authorization.k8s.io/", "autoscaling/")
        ):
            errors.append(f"{ident}: no vendored schema for {key} in k8s/schemas/")
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{ident}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_strict_crd_validation_catches_typos():
    v = crd_validators()[("kafka.strimzi.io/v1beta2", "KafkaTopic")]
    good = {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaTopic", "metadata": {"name": "t"},
            "spec": {"partitions": 3, "replicas": 1, "config": {"retention.ms": 1}}}
    assert not list(v.iter_errors(good))
    bad = copy.deepcopy(good)
    bad["spec"]["partition"] = 3
    bad["spec"]["replicas"] = 0
    assert len(list(v.iter_errors(bad))) == 2


# ---------------------------------------------------------------- semantics


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_topics_declared_with_sane_config(name):
    docs = render(name)
    topics = {t["spec"].get("topicName", n): t for n, t in by_kind(docs, "KafkaTopic").items()}
    assert TOPICS <= set(topics)
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] in by_kind(docs, "Kafka")
        assert "retention.ms" in t["spec"]["config"] or "compact" in t["spec"]["config"]["cleanup.policy"]
    changelogs = [n for n in topics if re.fullmatch(r"linewatch-worker-.+-changelog", n)]
    assert changelogs, "Faust changelog topics must be declared (auto.create.topics.enable is false)"
    for n in changelogs:
        assert topics[n]["spec"]["config"]["cleanup.policy"] == "compact"
        # Faust co-partitioning: table changelogs have the source topic's partition count
        assert topics[n]["spec"]["partitions"] == topics["frames"]["spec"]["partitions"]
    assert "compact" in topics["model-events"]["spec"]["config"]["cleanup.policy"]
    kafka = next(iter(by_kind(docs, "Kafka").values()))
    assert kafka["spec"]["kafka"]["config"]["auto.create.topics.enable"] is False
    pools = by_kind(docs, "KafkaNodePool")
    brokers = sum(p["spec"]["replicas"] for p in pools.values() if "broker" in p["spec"]["roles"])
    for t in topics.values():
        assert t["spec"]["replicas"] <= brokers
        assert t["spec"]["config"]["min.insync.replicas"] <= t["spec"]["replicas"]


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_kafka_is_kraft_with_authenticated_tls_listener(name):
    docs = render(name)
    kafka = next(iter(by_kind(docs, "Kafka").values()))
    ann = kafka["metadata"]["annotations"]
    assert ann["strimzi.io/kraft"] == "enabled" and ann["strimzi.io/node-pools"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    roles = {r for p in by_kind(docs, "KafkaNodePool").values() for r in p["spec"]["roles"]}
    assert roles == {"controller", "broker"}
    for listener in kafka["spec"]["kafka"]["listeners"]:
        assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
    users = by_kind(docs, "KafkaUser")
    assert {"linewatch-worker", "linewatch-trainer"} <= set(users)
    cm = by_kind(docs, "ConfigMap")["linewatch-config"]["data"]
    port = kafka["spec"]["kafka"]["listeners"][0]["port"]
    assert cm["LINEWATCH_KAFKA_BOOTSTRAP"] == f"{kafka['metadata']['name']}-kafka-bootstrap.linewatch.svc:{port}"
    assert cm["LINEWATCH_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["LINEWATCH_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert cm["LINEWATCH_DEV_BROKER"] == "false"


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_keda_max_replicas_within_frames_partitions(name):
    docs = render(name)
    frames = next(t for t in by_kind(docs, "KafkaTopic").values() if t["spec"].get("topicName") == "frames")
    so = by_kind(docs, "ScaledObject")["linewatch-worker"]
    spec = so["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= frames["spec"]["partitions"]
    assert spec["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == "frames"
    assert trigger["metadata"]["consumerGroup"] == "linewatch-worker"
    assert trigger["metadata"]["bootstrapServers"] == by_kind(docs, "ConfigMap")["linewatch-config"]["data"][
        "LINEWATCH_KAFKA_BOOTSTRAP"]
    auth = by_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password", "tls", "ca"} <= params


@needs_renderer
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_container_has_requests_limits_and_runs_as_non_root(name):
    checked = 0
    for _, obj, spec in all_workloads((name,)):
        pod_sc = spec.get("securityContext", {})
        for c in spec.get("initContainers", []) + spec["containers"]:
            ident = f"{name}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            for key in ("cpu", "memory"):
                assert key in res.get("requests", {}), f"{ident}: no {key} request"
                assert key in res.get("limits", {}), f"{ident}: no {key} limit"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{ident}: runAsNonRoot"
            assert sc.get("runAsUser", 0) != 0, f"{ident}: runAsUser 0"
            assert sc.get("allowPrivilegeEscalation") is False, f"{ident}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{ident}: capabilities"
            checked += 1
    assert checked


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_triton_serving_contract(name):
    docs = render(name)
    dep = by_kind(docs, "Deployment")["linewatch-triton"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--model-control-mode=explicit" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    store = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert store["model-store"]["persistentVolumeClaim"]["claimName"] in by_kind(docs, "PersistentVolumeClaim")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert any(a == f"--model-repository={p}" for a in c["args"] for p in mounts)
    svc = by_kind(docs, "Service")["linewatch-triton"]
    cm = by_kind(docs, "ConfigMap")["linewatch-config"]["data"]
    grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert cm["LINEWATCH_TRITON_GRPC_URL"] == f"linewatch-triton.linewatch.svc:{grpc}"


@needs_renderer
def test_prod_triton_has_gpu_and_dev_does_not():
    (c,) = by_kind(render("prod"), "Deployment")["linewatch-triton"]["spec"]["template"]["spec"]["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert by_kind(render("prod"), "Deployment")["linewatch-triton"]["spec"]["replicas"] >= 2
    (c,) = by_kind(render("dev"), "Deployment")["linewatch-triton"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_only_workers_reach_triton(name):
    docs = render(name)
    triton = by_kind(docs, "Deployment")["linewatch-triton"]
    worker = by_kind(docs, "Deployment")["linewatch-worker"]
    tlabels = triton["spec"]["template"]["metadata"]["labels"]
    wlabels = worker["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].items() <= tlabels.items()]
    assert policies, "no NetworkPolicy selects the Triton pods"
    triton_ports = {p["containerPort"] for p in triton["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for pol in policies:
        assert "Ingress" in pol["spec"]["policyTypes"]
        for rule in pol["spec"]["ingress"]:
            assert rule["from"], "an ingress rule without `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{pol['metadata']['name']}: only pod peers allowed"
                assert peer["podSelector"]["matchLabels"].items() <= wlabels.items()
            assert {p["port"] for p in rule["ports"]} <= triton_ports
    others = [d for d in by_kind(docs, "Deployment").values() if d is not worker and d is not triton]
    for d in others:  # no other workload carries the worker component label
        assert d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") != "worker"


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_pdbs_cover_worker_and_triton(name):
    docs = render(name)
    pdbs = by_kind(docs, "PodDisruptionBudget").values()
    for dep in ("linewatch-worker", "linewatch-triton"):
        labels = by_kind(docs, "Deployment")[dep]["spec"]["template"]["metadata"]["labels"]
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), dep


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_worker_wiring(name):
    docs = render(name)
    spec = by_kind(docs, "Deployment")["linewatch-worker"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    cm_names = {e["configMapRef"]["name"] for e in c.get("envFrom", [])}
    env = {e["name"] for e in c.get("env", [])}
    env |= {k for n in cm_names for k in by_kind(docs, "ConfigMap")[n]["data"]}
    assert ENV_NAMES <= env
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert "linewatch-worker" in secret_refs  # Strimzi's KafkaUser secret
    ca_file = by_kind(docs, "ConfigMap")["linewatch-config"]["data"]["LINEWATCH_KAFKA_SSL_CAFILE"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    vol = vols[mounts[str(Path(ca_file).parent)]]
    assert vol["secret"]["secretName"] == "linewatch-cluster-ca-cert"
    assert Path(ca_file).name in {i["path"] for i in vol["secret"]["items"]}


@needs_renderer
def test_every_linewatch_variable_a_container_gets_is_a_setting():
    """contracts.config rejects an unknown LINEWATCH_* variable at startup: a stale name in a manifest
    would stop the pod, so every name a container gets (env + envFrom ConfigMaps) must be a setting."""
    known = env_names(Settings)
    cms = {n: d.get("data", {}) for name in KUSTOMIZATIONS for n, d in by_kind(render(name), "ConfigMap").items()}
    seen = set()
    for _, obj, spec in all_workloads():
        for c in spec.get("initContainers", []) + spec["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            names |= {k for src in c.get("envFrom", []) if "configMapRef" in src for k in cms[src["configMapRef"]["name"]]}
            lw = {n for n in names if n.startswith("LINEWATCH_")}
            assert lw <= known, f"{obj['metadata']['name']}/{c['name']}: not settings: {sorted(lw - known)}"
            seen |= lw
    assert ENV_NAMES <= seen


@needs_renderer
def test_training_job_writes_model_store_and_releases():
    docs = render("train")
    (job,) = by_kind(docs, "Job").values()
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and not spec.get("initContainers")
    (train,) = spec["containers"]
    assert train["command"] == ["linewatch-models"] and train["args"][:2] == ["job", "train"]
    assert int(train["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    vols = {v["name"]: v for v in spec["volumes"]}
    store = [m for m in train["volumeMounts"]
             if vols[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "linewatch-model-store"]
    assert store and not store[0].get("readOnly", False)
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "linewatch-trainer"
               for e in train["env"])  # `job train` publishes `released` as the trainer KafkaUser
    # the job shares the service's namespace, config and PVC (names must match the base)
    base = render("base")
    assert job["metadata"]["namespace"] == next(iter(by_kind(base, "Namespace")))
    assert "linewatch-model-store" in by_kind(base, "PersistentVolumeClaim")
    assert "linewatch-trainer" in by_kind(base, "KafkaUser")


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
        for k in [k for k in __import__("os").environ if k.startswith("LINEWATCH_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            if k.startswith("LINEWATCH_"):
                monkeypatch.setenv(k, v)
        Settings()
        checked.add((obj["metadata"]["name"], c["name"]))
    assert {("linewatch-worker", "worker"), ("linewatch-train-adapter", "train")} <= checked


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
            # the in-worker rollout materialises versions into Triton's repository
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


@needs_renderer
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_images_are_pinned(name):
    for _, _obj, spec in all_workloads((name,)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
