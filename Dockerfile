FROM python:3.11-slim

# libsndfile for soundfile is bundled in its wheel; nothing else is needed from apt.
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# torch first, on its own layer: it is by far the largest dependency. Pass
# --build-arg TORCH_SPEC=... to pick another build (e.g. a CUDA one for GPU workers).
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY grpc_api ./grpc_api
RUN pip install ".[s3]"

EXPOSE 8000 5555 50051
CMD ["demix", "up"]
