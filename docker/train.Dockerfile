# syntax=docker/dockerfile:1.7
# linewatch training job (GPU): `linewatch-models moleflow train-task ...` then `linewatch release ...`.
# CUDA PyTorch base; the project's pinned torch/torchvision/timm/FrEIA are installed over it.
# Build from the repo root:  docker build -f docker/train.Dockerfile -t linewatch/train:0.1.0 .
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${TORCH_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image's conda Python is 3.11 (the project requires >=3.11,<3.12).
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
 && python -m venv --system-site-packages /opt/linewatch
ENV PATH=/opt/linewatch/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY stream ./stream
COPY models ./models
# torch/torchvision at the pyproject pins from PyTorch's index for the same CUDA as the Triton image (cu126;
# PyPI's 2.14.1 is a CUDA 13 build needing driver R580+), then the project's own extra (its pins live in
# pyproject.toml, torch already satisfied); the build fails when torch is not a CUDA ${TORCH_CUDA} build.
ARG TORCH_CUDA=cu126
# hadolint ignore=DL3013
RUN pip install --upgrade "pip==24.3.1" "setuptools==75.6.0" "wheel==0.45.1" \
 && pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==2.14.1" "torchvision==0.29.1" \
 && pip install ".[models,worker]" \
 && python -c "import torch, timm, FrEIA, models, stream; assert torch.version.cuda and 'cu' + torch.version.cuda.replace('.', '') == '${TORCH_CUDA}', torch.version.cuda; print(torch.__version__)"

FROM ${TORCH_IMAGE}
LABEL org.opencontainers.image.title="linewatch-train" \
      org.opencontainers.image.source="https://github.com/linewatch/linewatch" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/linewatch /opt/linewatch
ENV PATH=/opt/linewatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LINEWATCH_DEV_BROKER=false \
    LINEWATCH_DATA_DIR=/data
RUN groupadd --system --gid 10001 linewatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/linewatch --create-home --shell /usr/sbin/nologin linewatch
WORKDIR /home/linewatch
USER 10001:10001
ENTRYPOINT ["linewatch-models"]
CMD ["--help"]
