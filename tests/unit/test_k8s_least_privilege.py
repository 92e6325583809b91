"""Least privilege in k8s/ (issue #26 item 7), on the rendered manifests (a real kustomize):

- the console's ServiceAccount may create Jobs, but admission (ValidatingAdmissionPolicy, its CEL evaluated here
  with cel-python) admits only the training Job its onboarding runner renders: a Job labelled like the
  controller, mounting the model-control Secret, running another image or ServiceAccount is refused;
- Triton's NetworkPolicy selects its clients by ``linewatch.io/triton-access``, a label admission lets only the
  controller's (``control``) and the workers' (``infer``) ServiceAccounts carry;
- the console's port is open to the ingress controller's and Prometheus's namespaces only, not every namespace.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from stream.lifecycle.onboard_runner import JOB_TEMPLATE, render_job, train_image
from tests.harness.k8s import SERVICE, by_kind, needs_renderer, render
from tests.harness.requires import require_module

celpy = require_module("celpy", "cel-python is not installed (the [dev] extra: make venv)")

CONSOLE = "system:serviceaccount:linewatch:linewatch-console"


def _cel(expr: str, activation: dict):
    env = celpy.Environment()
    try:
        return env.program(env.compile(expr)).evaluate(activation)
    except Exception as e:  # an evaluation error: the policy's failurePolicy Fail refuses
        return e


def _true(x) -> bool:
    """A CEL boolean true (an error or any other value is not)."""
    return isinstance(x, celpy.celtypes.BoolType) and bool(x)


def refusals(policy: dict, obj: dict, username: str = CONSOLE) -> list[str]:
    """The messages of ``policy``'s validations ``obj`` fails ([] = admitted or not matched), as the API server
    evaluates them: matchConditions, then variables, then validations; an evaluation error refuses."""
    spec = policy["spec"]
    act = {"object": celpy.json_to_cel(obj), "request": celpy.json_to_cel({"userInfo": {"username": username}})}
    for mc in spec.get("matchConditions", []):
        if not _true(_cel(mc["expression"], act)):
            return []
    variables: dict = {}
    for v in spec.get("variables", []):
        variables[celpy.celtypes.StringType(v["name"])] = _cel(v["expression"], {**act, "variables":
                                                                                celpy.celtypes.MapType(variables)})
    act["variables"] = celpy.celtypes.MapType(variables)
    return [v["message"] for v in spec["validations"] if not _true(_cel(v["expression"], act))]


def _policies(name: str = "base") -> dict[str, dict]:
    return by_kind(render(name), "ValidatingAdmissionPolicy")


def _runner_job() -> dict:
    """The Job ``linewatch onboard --k8s`` (the console's runner) creates."""
    image = train_image(JOB_TEMPLATE.with_name("kustomization.yaml"))
    return yaml.safe_load(render_job(JOB_TEMPLATE.read_text(), product="elpv", detector="moleflow",
                                     train_dir="/data/capture/elpv/good", image=image, run="r1"))


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_every_policy_is_bound_to_deny(name):
    docs = render(name)
    bindings = {b["spec"]["policyName"]: b for b in by_kind(docs, "ValidatingAdmissionPolicyBinding").values()}
    assert set(_policies(name)) == {"linewatch-train-jobs-only", "linewatch-triton-access"} == set(bindings)
    for b in bindings.values():
        assert b["spec"]["validationActions"] == ["Deny"]
    for p in _policies(name).values():
        assert p["spec"]["failurePolicy"] == "Fail"
    assert bindings["linewatch-triton-access"]["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "linewatch"}


@needs_renderer
def test_the_console_may_create_the_training_job_and_nothing_else():
    pol = _policies()["linewatch-train-jobs-only"]
    job = _runner_job()
    assert refusals(pol, job) == [], "the onboarding runner's own Job is refused"
    (role,) = [r for r in by_kind(render("base"), "Role").values()
               if r["metadata"]["name"] == "linewatch-console-train-jobs"]
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list",
                                                                                       "watch"]}]

    def mutated(fn) -> dict:
        j = copy.deepcopy(job)
        fn(j)
        return j

    (train,) = _pod(job)["containers"]
    attacks = {
        # the finding: a Job pod labelled like the controller that mounts the model-control Secret
        "labelled like the controller": lambda j: j["spec"]["template"]["metadata"]["labels"].update(
            {"app.kubernetes.io/name": "linewatch-controller", "app.kubernetes.io/component": "controller"}),
        "carries the triton-access label": lambda j: j["spec"]["template"]["metadata"]["labels"].update(
            {"linewatch.io/triton-access": "control"}),
        "mounts the model-control Secret": lambda j: _pod(j)["volumes"].append(
            {"name": "key", "secret": {"secretName": "linewatch-triton-control"}}),
        "reads the model-control key in its env": lambda j: _pod(j)["containers"][0]["env"].append(
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "linewatch-triton-control", "key": "key"}}}),
        "envFrom a Secret": lambda j: _pod(j)["containers"][0]["envFrom"].append(
            {"secretRef": {"name": "linewatch-triton-control"}}),
        "a projected volume": lambda j: _pod(j)["volumes"].append({"name": "p", "projected": {"sources": []}}),
        "another image": lambda j: _pod(j)["containers"][0].update(image="busybox:1.36"),
        "a second container": lambda j: _pod(j)["containers"].append({**train, "name": "x", "image": "busybox"}),
        "an init container": lambda j: _pod(j).update(initContainers=[{**train, "name": "i"}]),
        "the controller's ServiceAccount": lambda j: _pod(j).update(serviceAccountName="linewatch-controller"),
        "a mounted token": lambda j: _pod(j).update(automountServiceAccountToken=True),
        "the host network": lambda j: _pod(j).update(hostNetwork=True),
        "a privileged container": lambda j: _pod(j)["containers"][0]["securityContext"].update(privileged=True),
        "a hostPath volume": lambda j: _pod(j)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "not a training Job": lambda j: j["metadata"].update(labels={"app.kubernetes.io/name": "anything"}),
    }
    for what, fn in attacks.items():
        assert refusals(pol, mutated(fn)), f"a Job that {what} was admitted"
    # the policy is about the console's identity: a cluster admin's Job is not its business
    assert refusals(pol, mutated(attacks["another image"]), username="kubernetes-admin") == []


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_triton_admits_its_clients_by_a_label_only_their_service_accounts_may_carry(name):
    docs = render(name)
    pol = _policies(name)["linewatch-triton-access"]
    deps = by_kind(docs, "Deployment")
    net = by_kind(docs, "NetworkPolicy")["linewatch-triton-ingress"]
    peers = [peer["podSelector"]["matchLabels"] for rule in net["spec"]["ingress"] for peer in rule["from"]]
    # every peer needs the triton-access label; its other labels are kustomize's commonLabels, which every pod has
    assert [p.get("linewatch.io/triton-access") for p in peers] == ["infer", "control"]
    common = set.intersection(*(set(d["spec"]["template"]["metadata"]["labels"].items()) for d in deps.values()))
    assert all(set(p.items()) - {("linewatch.io/triton-access", p["linewatch.io/triton-access"])} <= common
               for p in peers)
    for dep, access in (("linewatch-worker", "infer"), ("linewatch-controller", "control")):
        tpl = deps[dep]["spec"]["template"]
        pod = {"metadata": tpl["metadata"], "spec": tpl["spec"]}
        assert tpl["metadata"]["labels"]["linewatch.io/triton-access"] == access
        assert refusals(pol, pod) == [], f"{dep}'s own pods are refused"
        for sa in ("default", "linewatch-console", "linewatch-worker" if access == "control" else "linewatch-controller"):
            assert refusals(pol, {"metadata": tpl["metadata"], "spec": {**tpl["spec"], "serviceAccountName": sa}}), \
                f"a pod of ServiceAccount {sa} labelled triton-access={access} was admitted"
    for d in deps.values():  # no other workload asks for the label (it would be refused)
        if d["metadata"]["name"] not in ("linewatch-worker", "linewatch-controller"):
            assert "linewatch.io/triton-access" not in d["spec"]["template"]["metadata"]["labels"]
    assert refusals(pol, {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}}) == []
    assert refusals(pol, {"metadata": {}, "spec": {"containers": []}}) == []


@needs_renderer
@pytest.mark.parametrize("name", SERVICE)
def test_the_console_is_reachable_from_the_ingress_and_prometheus_namespaces_only(name):
    pol = by_kind(render(name), "NetworkPolicy")["linewatch-console-ingress"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    for rule in pol["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every namespace"
        assert [set(peer) for peer in rule["from"]] == [{"namespaceSelector"}] * len(rule["from"])
        assert {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"]} == \
            {"ingress-nginx", "monitoring"}
        assert rule["ports"] == [{"protocol": "TCP", "port": 8090}]
