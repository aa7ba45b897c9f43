# syntax=docker/dockerfile:1
# Two targets:
#   docker build --target cpu -t appliance:cpu .     the embedded CPU engine (no GPU, no weights)
#   docker build --target gpu -t appliance:gpu .     CUDA runtime for the GPU engine
# Models and data live on volumes; nothing is downloaded at run time.

FROM python:3.11-slim-bookworm AS cpu
# Point pip at a CPU-only torch wheel index to keep the image small (the default is PyPI's build).
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    APPLIANCE_CACHE=/var/lib/appliance/cache
RUN useradd --system --create-home --home-dir /var/lib/appliance --uid 10001 appliance
WORKDIR /opt/appliance
COPY pyproject.toml constraints.txt README.md ./
COPY appliance ./appliance
COPY knowledge_base ./knowledge_base
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && pip install --no-cache-dir -c constraints.txt .
ENV APPLIANCE_KNOWLEDGE_BASE=/opt/appliance/knowledge_base
USER appliance
VOLUME ["/var/lib/appliance"]
HEALTHCHECK --interval=5m --timeout=30s CMD ["appliance", "knowledge", "list", "magnetic_tile"]
ENTRYPOINT ["appliance"]
CMD ["batch", "/var/lib/appliance/inbox", "--out", "/var/lib/appliance/dataset", "--no-progress"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    APPLIANCE_CACHE=/var/lib/appliance/cache
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && useradd --system --create-home --home-dir /var/lib/appliance --uid 10001 appliance
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/appliance
COPY pyproject.toml constraints.txt README.md ./
COPY appliance ./appliance
COPY knowledge_base ./knowledge_base
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -c constraints.txt .
ENV APPLIANCE_KNOWLEDGE_BASE=/opt/appliance/knowledge_base
USER appliance
VOLUME ["/var/lib/appliance"]
HEALTHCHECK --interval=5m --timeout=30s CMD ["appliance", "knowledge", "list", "magnetic_tile"]
ENTRYPOINT ["appliance"]
CMD ["batch", "/var/lib/appliance/inbox", "--out", "/var/lib/appliance/dataset", "--no-progress"]
