# syntax=docker/dockerfile:1.7
# NVIDIA Triton (official NGC image) + torch + the linewatch package, for the Python-backend
# models in triton_repo/ (their model.py imports `models.<detector>.serving`).
#
# Python version: the project needs CPython 3.11; the 24.10 image ships Ubuntu 22.04's 3.10.
# We install a standalone CPython 3.11 (python-build-standalone via uv, glibc 2.17+), put the
# project in a 3.11 venv and replace the Python backend stub with the 3.11 stub of the same
# Triton release (2.51 == NGC 24.10), taken from the pinned nvidia-pytriton wheel.
# Build from the repo root:  docker build -f docker/triton.Dockerfile -t linewatch/triton:0.1.0 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m pip install --no-cache-dir "uv==0.5.11" \
 && uv python install 3.11.11 \
 && uv venv --python 3.11.11 /opt/linewatch
ENV PATH=/opt/linewatch/bin:$PATH \
    VIRTUAL_ENV=/opt/linewatch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY models ./models
# torch/torchvision at the pyproject pins but from PyTorch's index for the Triton image's CUDA (24.10: CUDA
# 12.6): PyPI's torch 2.14.1 is a CUDA 13 build that needs driver R580+ and, on an older node, silently sees
# no GPU. The build fails unless torch's CUDA major equals the image's (CUDA_VERSION is set by NGC images).
# Then the [models] extra (the pins already satisfied) and nvidia-pytriton only for its Python 3.11 backend
# stub (copied below; pytriton itself is not in the image).
ARG TORCH_CUDA=cu126
RUN uv pip install --no-cache --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==2.14.1" "torchvision==0.29.1" \
 && uv pip install --no-cache ".[models]" "nvidia-pytriton==0.7.0" \
 && python -c "import os, torch; assert torch.version.cuda.split('.')[0] == os.environ['CUDA_VERSION'].split('.')[0], (torch.version.cuda, os.environ['CUDA_VERSION']); print(torch.__version__)" \
 && cp "$(python -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent)')/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" /opt/triton_python_backend_stub

FROM ${TRITON_IMAGE}
LABEL org.opencontainers.image.title="linewatch-triton" \
      org.opencontainers.image.source="https://github.com/linewatch/linewatch" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/linewatch /opt/linewatch
COPY --from=build /opt/triton_python_backend_stub /opt/tritonserver/backends/python/triton_python_backend_stub
# The stub links libpython3.11 from the standalone CPython; the venv's bin first on PATH makes the
# Python backend run model.py with the venv's interpreter and packages.
ENV PATH=/opt/linewatch/bin:/opt/tritonserver/bin:$PATH \
    VIRTUAL_ENV=/opt/linewatch \
    LD_LIBRARY_PATH=/opt/python/cpython-3.11.11-linux-x86_64-gnu/lib:$LD_LIBRARY_PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1
# The NGC image ships the non-root user triton-server (uid 1000).
USER 1000:1000
WORKDIR /home/triton-server
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models", "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true", "--exit-on-error=false"]
