# tformer with its CUDA extension compiled for TORCH_CUDA_ARCH_LIST, running the main job.
#
#   docker build -t tformer --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" .
#   docker run --gpus all tformer              # the main job on a GPU: tformer train --config ds.json
#   docker run tformer                         # the same on the CPU
#   docker run tformer env                     # what the image holds (archs, backends, versions)
#
# The devel image carries nvcc, which the extension's build needs; its CUDA (13.0) matches the
# cu130 build of torch 2.14.1 that pip installs below.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    WANDB_MODE=offline

# Python for the venv; g++ for the extension and for Triton's launcher stubs at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with a fixed numeric id (uid 1000 is the base image's "ubuntu").
RUN groupadd --gid 10001 tformer \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/tformer tformer \
    && python3 -m venv /opt/venv && chown -R 10001:10001 /opt/venv

USER 10001:10001
WORKDIR /home/tformer/src

# The README's install: torch first, then tformer without build isolation so the extension is
# compiled against that torch (TFORMER_BUILD_CUDA=1: a missing toolkit fails the build).
RUN pip install torch==2.14.1 setuptools==80.9.0 wheel==0.45.1
COPY --chown=10001:10001 . .
# The local checkout cannot be pinned by version (DL3013); torch above is.
# hadolint ignore=DL3013
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" TFORMER_BUILD_CUDA=1 \
    pip install --no-build-isolation ".[train]" \
    && tformer env

# Runs (checkpoints, metrics, the export) go to /home/tformer/runs; mount a volume there to keep them.
WORKDIR /home/tformer
ENTRYPOINT ["tformer"]
CMD ["train", "--config", "ds.json"]
