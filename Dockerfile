# Stage 1: build the demix wheel from the source (the image installs the wheel, not the
# source folder, so it runs exactly what `pip install demix-*.whl` would).
FROM python:3.11-slim AS wheel
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY demix ./demix
RUN pip wheel --no-deps . -w /wheels

# Stage 2: the service.
FROM python:3.11-slim

# libsndfile for soundfile is bundled in its wheel; nothing else is needed from apt.
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# torch first, on its own layer: it is by far the largest dependency. Pass
# --build-arg TORCH_SPEC=... to pick another build (e.g. a CUDA one for GPU workers).
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "${TORCH_SPEC}"

COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/demix-*.whl)[s3]" && rm -rf /wheels

EXPOSE 8000 5555 50051
CMD ["demix", "up"]
