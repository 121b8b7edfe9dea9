# mishield as a release gate: `docker run --rm -v "$PWD:/work" mishield audit /work/model.pt ...`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/mishield
COPY pyproject.toml README.md ./
COPY mishield ./mishield
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 mishield

USER 1000
WORKDIR /work
ENTRYPOINT ["mishield"]
CMD ["--help"]
