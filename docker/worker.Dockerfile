# syntax=docker/dockerfile:1.7
# linewatch stream worker (Faust). No torch: `stream` never imports it (import-linter contract in
# pyproject), the image installs only the `[worker]` extra, and only contracts/ + stream/ are copied
# (no models/, devstack/ or tests/: tests/unit/test_dockerfiles.py checks the file set).
# The same image runs `linewatch console`, whose `linewatch onboard --k8s` child creates the training Job
# with `kubectl apply` from k8s/train/train-job.yaml (stream/lifecycle/onboard_runner.py JOB_TEMPLATE, next to the
# installed packages): both are in the image (k8s/base/console.yaml).
# Build from the repo root:  docker build -f docker/worker.Dockerfile -t linewatch/worker:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# kubectl only (/bin/kubectl); within one minor of the oldest supported cluster (tests/harness/k8s.py)
FROM registry.k8s.io/kubectl:v1.31.0 AS kubectl

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/linewatch
ENV PATH=/opt/linewatch/bin:$PATH
WORKDIR /src
RUN pip install --upgrade "pip==24.3.1" "setuptools==75.6.0" "wheel==0.45.1"
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY stream ./stream
COPY k8s/train/train-job.yaml k8s/train/kustomization.yaml ./k8s/train/
# the train Job template where the installed `linewatch onboard` looks for it (-I: not the sources in /src)
# the [worker] extra only: torch/timm (the [models] extra) are never resolved in this image
# the project's own extra (its pins live in pyproject.toml), not an unpinned package:
# hadolint ignore=DL3013
RUN pip install ".[worker]" \
 && python -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)" \
 && python -c "import stream.worker.app, stream.ops.cli; stream.ops.cli.build_parser()" \
 && python -I -c "import shutil, stream.lifecycle.onboard_runner as o; o.JOB_TEMPLATE.parent.mkdir(parents=True); [shutil.copy(f'k8s/train/{n}', o.JOB_TEMPLATE.parent) for n in ('train-job.yaml', 'kustomization.yaml')]; assert o.train_image(o.JOB_TEMPLATE.with_name('kustomization.yaml'))"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="linewatch-worker" \
      org.opencontainers.image.source="https://github.com/linewatch/linewatch" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/linewatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LINEWATCH_DEV_BROKER=false
RUN groupadd --system --gid 10001 linewatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/linewatch --create-home --shell /usr/sbin/nologin linewatch
COPY --from=build /opt/linewatch /opt/linewatch
COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl
WORKDIR /home/linewatch
USER 10001:10001
# Faust web (health + metrics)
EXPOSE 6066
ENTRYPOINT ["linewatch"]
CMD ["worker"]
