# mishield as a container: a privacy gate for MLOps pipelines (docs/docker.md, docs/pipelines.md).
#
#   docker build -t mishield:cpu .                      # default target: CPU-only torch wheels
#   docker build -t mishield:cuda --target cuda .       # PyPI's CUDA torch wheels (needs --gpus all)
#   docker run --rm -v "$PWD:/work" mishield:cpu audit /work/model.pt ...
#
# Layer order: torch (largest, rarely changes) -> the other dependencies read from pyproject.toml ->
# mishield's own wheel. Editing the source rebuilds only the last layer.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# base: interpreter, a virtual environment and the unprivileged user every final image runs as.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/mishield \
    XDG_CACHE_HOME=/home/mishield/.cache
# HOME is world-writable (sticky, like /tmp) so `docker run --user "$(id -u):$(id -g)"` with any host
# uid still has a writable home and cache directory (torch hub, timm/Hugging Face downloads).
RUN python -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 1000 mishield \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /home/mishield --shell /usr/sbin/nologin mishield \
    && mkdir -p /home/mishield/.cache /work \
    && chown mishield:mishield /home/mishield/.cache /work \
    && chmod 1777 /home/mishield /home/mishield/.cache

# ---------------------------------------------------------------------------------------------
# requirements: the runtime dependencies exactly as pyproject.toml declares them. The file it writes
# changes only when pyproject.toml does, so the dependency layers below stay cached on code edits.
FROM base AS requirements
WORKDIR /build
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /build/requirements.txt

# ---------------------------------------------------------------------------------------------
# wheel: mishield itself, built once and shared by both images (no source tree in the images).
FROM base AS wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY mishield ./mishield
RUN pip wheel --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------
# cuda: torch from PyPI, whose Linux x86_64 wheels bundle the CUDA runtime libraries (nvidia-* wheels);
# the host needs only the NVIDIA driver and the container toolkit (`docker run --gpus all`).
FROM base AS cuda
ARG VERSION=0.1.0
# Provenance labels, filled in by CI: --build-arg SOURCE_URL=<repository URL> --build-arg REVISION=<commit>.
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="mishield (CUDA)" \
      org.opencontainers.image.description="Harden image classifiers against model-inversion attacks and audit them; CUDA build." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"
RUN pip install "torch>=2.5,<3" "torchvision>=0.19,<1"
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=wheel /dist /tmp/dist
# --no-deps: every dependency is already installed above from pyproject.toml's own list.
RUN pip install --no-deps /tmp/dist/*.whl && rm -r /tmp/dist
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["mishield"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# cpu (default target, last stage): CPU-only torch wheels, several GB smaller than the CUDA ones.
FROM base AS cpu
ARG VERSION=0.1.0
# Provenance labels, filled in by CI: --build-arg SOURCE_URL=<repository URL> --build-arg REVISION=<commit>.
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="mishield" \
      org.opencontainers.image.description="Harden image classifiers against model-inversion attacks and audit them; CPU build." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"
# Only the CPU index: with PyPI as an extra index pip could prefer a newer CUDA build of torch.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.5,<3" "torchvision>=0.19,<1"
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
# torch and torchvision are already satisfied by the CPU wheels, so pip keeps them.
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-deps /tmp/dist/*.whl && rm -r /tmp/dist
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["mishield"]
CMD ["--help"]
