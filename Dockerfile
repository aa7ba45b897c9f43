# syntax=docker/dockerfile:1
# Two targets, both built in two stages (build tools stay out of the image that runs):
#   docker build --target cpu -t appliance:cpu .   the embedded CPU engine (no GPU, no weights)
#   docker build --target gpu -t appliance:gpu .   CUDA runtime + cuDNN for the GPU engines
# Run (the watcher; data, models and config on one volume, owned by uid 10001):
#   docker run -d --name appliance -v /srv/appliance:/var/lib/appliance appliance:cpu
#   docker run -d --gpus all -v /srv/appliance:/var/lib/appliance appliance:gpu
# Nothing is downloaded at run time; models are installed into the volume's models/ folder.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---- CPU -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
# Point pip at a CPU-only torch wheel index to keep the image small (the default is PyPI's build).
ARG TORCH_INDEX_URL=""
WORKDIR /opt/appliance
COPY pyproject.toml constraints.txt README.md ./
COPY appliance ./appliance
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 \
    APPLIANCE_HOME=/var/lib/appliance APPLIANCE_CACHE=/var/lib/appliance/cache \
    APPLIANCE_KNOWLEDGE_BASE=/opt/appliance/knowledge_base
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/appliance \
        --shell /usr/sbin/nologin appliance \
 && install -d -o appliance -g appliance -m 0750 /var/lib/appliance
COPY --from=cpu-build /opt/venv /opt/venv
COPY knowledge_base /opt/appliance/knowledge_base
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/appliance-entrypoint
USER appliance
WORKDIR /var/lib/appliance
VOLUME ["/var/lib/appliance"]
HEALTHCHECK --interval=1m --timeout=30s --start-period=10m --retries=3 \
    CMD ["appliance-entrypoint", "healthcheck"]
ENTRYPOINT ["appliance-entrypoint"]
CMD ["watch"]

# ---- GPU -------------------------------------------------------------------------------------
# Built on the CUDA devel image (compilers, headers for wheels that build extensions), run on
# the runtime image with cuDNN (onnxruntime-gpu needs it for the mask model).
FROM ${CUDA_DEVEL_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/appliance
COPY pyproject.toml constraints.txt README.md ./
COPY appliance ./appliance
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[gpu]"

FROM ${CUDA_RUNTIME_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 \
    APPLIANCE_HOME=/var/lib/appliance APPLIANCE_CACHE=/var/lib/appliance/cache \
    APPLIANCE_KNOWLEDGE_BASE=/opt/appliance/knowledge_base
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/appliance \
        --shell /usr/sbin/nologin appliance \
 && install -d -o appliance -g appliance -m 0750 /var/lib/appliance
COPY --from=gpu-build /opt/venv /opt/venv
COPY knowledge_base /opt/appliance/knowledge_base
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/appliance-entrypoint
USER appliance
WORKDIR /var/lib/appliance
VOLUME ["/var/lib/appliance"]
HEALTHCHECK --interval=1m --timeout=30s --start-period=15m --retries=3 \
    CMD ["appliance-entrypoint", "healthcheck"]
ENTRYPOINT ["appliance-entrypoint"]
CMD ["watch"]
