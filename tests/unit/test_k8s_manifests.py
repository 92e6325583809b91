"""Offline validation of k8s/: render every kustomization with a real kustomize, validate every
rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate) and the vendored
Strimzi/KEDA CRD schemas (k8s/schemas/, jsonschema), then check what matters for operating it.

Renderer: `kustomize build` if a kustomize binary is on PATH, else `kubectl kustomize` (kubectl's
embedded kustomize; Debian: `apt-get install -y kubernetes-client`). No cluster, no network.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from contracts.config import Settings, env_names
from tests.harness.k8s import (
    ENV_NAMES,
    K8S_VERSION,
    KUSTOMIZATIONS,
    SCHEMAS,
    SERVICE,
    all_workloads,
    by_kind,
    needs_renderer,
    render,
)
from tests.harness.requires import require_module

jsonschema = require_module("jsonschema", "jsonschema is not installed (the [dev] extra: make venv)")
kubernetes_validate = require_module("kubernetes_validate",
                                     "kubernetes-validate is not installed (the [dev] extra: make venv)")


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
            ("apps/", "batch/", "policy/", "networking.k8s.io/", "rbac.authorization.k8s.io/", "autoscaling/",
             "admissionregistration.k8s.io/")
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
    # auto.create.topics.enable is off (below): every topic the code uses (one list: Settings.topics) is declared
    assert set(Settings().topics()) <= set(topics)
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] in by_kind(docs, "Kafka")
        assert "retention.ms" in t["spec"]["config"] or "compact" in t["spec"]["config"]["cleanup.policy"]
    # no Faust tables (nothing would write a declared changelog); the drift state is a compacted topic of its
    # own, co-partitioned with frames so a worker reads back only its partitions' cameras
    assert not [n for n in topics if re.fullmatch(r"linewatch-worker-.+-changelog", n)]
    assert topics["drift-state"]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics["drift-state"]["spec"]["partitions"] == topics["frames"]["spec"]["partitions"]
    assert "compact" in topics["model-events"]["spec"]["config"]["cleanup.policy"]
    assert topics["serving-state"]["spec"]["config"]["cleanup.policy"] == "compact"
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
    # nothing loads by itself: only the rollout controller loads verified copies (issue #15 item 5)
    assert not any(a.startswith("--load-model") for a in c["args"]), c["args"]
    # model control needs the key of Secret linewatch-triton-control, over gRPC and HTTP
    env = {e["name"]: e for e in c.get("env", [])}
    key_ref = env["TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == "linewatch-triton-control"
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        assert f"{flag}=model-repository:linewatch-control-key=$(TRITON_CONTROL_KEY)" in c["args"], c["args"]
    # only the rollout controller holds the same key; the worker has no model control and no model volume
    (ctl,) = by_kind(docs, "Deployment")["linewatch-controller"]["spec"]["template"]["spec"]["containers"]
    cenv = {e["name"]: e for e in ctl["env"]}
    assert cenv["LINEWATCH_TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"] == key_ref
    wspec = by_kind(docs, "Deployment")["linewatch-worker"]["spec"]["template"]["spec"]
    (w,) = wspec["containers"]
    assert not {"LINEWATCH_TRITON_CONTROL_KEY", "LINEWATCH_MODEL_REPOSITORY"} & {e["name"] for e in w["env"]}
    assert not any("persistentVolumeClaim" in v for v in wspec["volumes"])
    # the controller reaches every Triton pod through the headless Service
    headless = by_kind(docs, "Service")[cenv["LINEWATCH_CONTROLLER_TRITON_SERVICE"]["value"].split(".")[0]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    cdep = by_kind(docs, "Deployment")["linewatch-controller"]["spec"]
    assert cdep["replicas"] == 1 and cdep["strategy"]["type"] == "Recreate"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    store = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert store["model-store"]["persistentVolumeClaim"]["claimName"] in by_kind(docs, "PersistentVolumeClaim")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert any(a == f"--model-repository={p}" for a in c["args"] for p in mounts)
    svc = by_kind(docs, "Service")["linewatch-triton"]
    cm = by_kind(docs, "ConfigMap")["linewatch-config"]["data"]
    grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    if name == "prod":  # every worker round-robins over every Triton pod (the headless Service)
        pods = cenv["LINEWATCH_CONTROLLER_TRITON_SERVICE"]["value"]
        assert cm["LINEWATCH_TRITON_GRPC_URL"] == f"dns:///{pods}" and pods.endswith(f":{grpc}")
    else:
        assert cm["LINEWATCH_TRITON_GRPC_URL"] == f"linewatch-triton.linewatch.svc:{grpc}"


@needs_renderer
def test_prod_triton_has_gpu_and_dev_does_not():
    prod = render("prod")
    spec = by_kind(prod, "Deployment")["linewatch-triton"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # the GPU is used: the controller writes KIND_GPU groups + TensorRT EfficientAD, the pod self-checks CUDA
    cm = by_kind(prod, "ConfigMap")["linewatch-config"]["data"]
    serving = Settings(**{"serving": {"device": cm["LINEWATCH_SERVING__DEVICE"],
                                      "efficientad_backend": cm["LINEWATCH_SERVING__EFFICIENTAD_BACKEND"]}}).serving
    assert serving.device == "gpu" and serving.efficientad_backend == "onnxruntime"
    (check,) = spec["initContainers"]
    assert check["command"][:2] == ["linewatch-models", "selfcheck"] and "--device=gpu" in check["command"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert cm["LINEWATCH_SERVING__TRT_CACHE_DIR"] in mounts  # a writable engine cache
    (train,) = by_kind(render("train"), "Job")["linewatch-train-adapter"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "LINEWATCH_TRAIN_DEVICE", "value": "cuda"} in train["env"]
    assert by_kind(render("prod"), "Deployment")["linewatch-triton"]["spec"]["replicas"] >= 2
    (c,) = by_kind(render("dev"), "Deployment")["linewatch-triton"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_only_workers_and_the_controller_reach_triton(name):
    docs = render(name)
    triton = by_kind(docs, "Deployment")["linewatch-triton"]
    worker = by_kind(docs, "Deployment")["linewatch-worker"]
    controller = by_kind(docs, "Deployment")["linewatch-controller"]
    tlabels = triton["spec"]["template"]["metadata"]["labels"]
    allowed = [d["spec"]["template"]["metadata"]["labels"] for d in (worker, controller)]
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
                assert any(peer["podSelector"]["matchLabels"].items() <= lab.items() for lab in allowed)
            assert {p["port"] for p in rule["ports"]} <= triton_ports
    others = [d for d in by_kind(docs, "Deployment").values() if d not in (worker, triton, controller)]
    for d in others:  # no other workload carries the worker or controller component label
        assert d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") not in ("worker",
                                                                                                        "controller")


def _min_replicas(docs, dep: dict) -> int:
    """The fewest pods a Deployment runs: KEDA's minReplicaCount where a ScaledObject owns it, else replicas."""
    for so in by_kind(docs, "ScaledObject").values():
        if so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]:
            return int(so["spec"]["minReplicaCount"])
    return int(dep["spec"].get("replicas", 1))


def _allowed_disruptions(pdb: dict, pods: int) -> int:
    """How many of ``pods`` healthy pods a voluntary eviction (a drain) may take under ``pdb`` (ints only)."""
    spec = pdb["spec"]
    if "minAvailable" in spec:
        return max(0, pods - int(spec["minAvailable"]))
    return min(pods, int(spec["maxUnavailable"]))


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_pdbs_keep_a_pod_and_let_a_drain_proceed(name):
    """Issue #26 item 11: a PDB with ``maxUnavailable: 1`` on a one-replica Deployment protects nothing (a drain
    evicts the only pod) while it claims to. Every PDB must, at the Deployment's fewest replicas, both leave a pod
    running and allow one eviction (a PDB that allows none blocks every drain); a one-replica Deployment has no PDB
    (it cannot be both); a Deployment that runs >= 2 pods (prod's workers and Tritons) has one."""
    docs = render(name)
    pdbs = list(by_kind(docs, "PodDisruptionBudget").values())
    for dep in by_kind(docs, "Deployment").values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        pods = _min_replicas(docs, dep)
        assert len(covering) <= 1, (name, dep["metadata"]["name"], "several PDBs")
        for pdb in covering:  # a PDB in another namespace (an overlay resource misses base's namespace) protects nothing
            assert pdb["metadata"].get("namespace") == dep["metadata"]["namespace"], (name, pdb["metadata"])
            allowed = _allowed_disruptions(pdb, pods)
            assert pods - allowed >= 1, (name, dep["metadata"]["name"], pods, pdb["spec"], "a drain evicts every pod")
            assert allowed >= 1, (name, dep["metadata"]["name"], pods, pdb["spec"], "the PDB blocks every drain")
        if dep["metadata"]["name"] in ("linewatch-worker", "linewatch-triton") and pods >= 2:
            assert covering, (name, dep["metadata"]["name"], "runs >= 2 pods and has no PDB")
    for pdb in pdbs:  # no PDB selects nothing
        sel = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(sel <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in by_kind(docs, "Deployment").values()), pdb["metadata"]["name"]
    if name == "prod":
        assert {p["metadata"]["name"] for p in pdbs} == {"linewatch-worker", "linewatch-triton"}


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


@needs_renderer
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_images_are_pinned(name):
    for _, _obj, spec in all_workloads((name,)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
