# syntax=docker/dockerfile:1
#
# The jobstream image: the `jobstream` CLI and runtime in a virtualenv, on python:3.11-slim,
# running as uid/gid 10001. Build it from the repository root:
#
#     docker build -t jobstream:0.1.0 .
#
# Build arguments:
#   EXTRAS          optional dependencies to install (default: the Redis and PostgreSQL
#                   idempotency stores); empty for none
#   EXTRA_PACKAGES  further pip requirements, e.g. `nkeys` for NATS credentials files
#
# Your handlers go on top, in /app (on PYTHONPATH):
#
#     FROM jobstream:0.1.0
#     COPY jobs.py /app/
#     CMD ["worker", "jobs:app"]
#
# or install your package into the image's virtualenv: `RUN pip install ./mypackage`
# (as root, before `USER`). docs/kubernetes.md has the details.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: build the wheel and install it, pinned by constraints.txt, into /opt/jobstream
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/jobstream
COPY pyproject.toml constraints.txt README.md ./
COPY schemas ./schemas
COPY producer ./producer
COPY consumer ./consumer
COPY jobstream ./jobstream
ARG EXTRAS=redis,postgres
ARG EXTRA_PACKAGES=
RUN /opt/jobstream/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && wheel="$(ls /wheels/jobstream-*.whl)" \
    && if [ -n "${EXTRAS}" ]; then wheel="${wheel}[${EXTRAS}]"; fi \
    && /opt/jobstream/bin/pip install -c constraints.txt "${wheel}" ${EXTRA_PACKAGES} \
    && /opt/jobstream/bin/jobstream --help > /dev/null

# --- runtime: the virtualenv only; no compilers, no pip cache, no source tree
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="jobstream" \
      org.opencontainers.image.description="Typed, idempotent job workers on Kafka and NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 jobstream \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin jobstream
# Owned by root and read-only for the service user: the code cannot be changed at run time.
COPY --from=builder /opt/jobstream /opt/jobstream
# The example app, so that the image runs out of the box (`worker examples.app:app`).
COPY examples /app/examples
ENV PATH=/opt/jobstream/bin:${PATH} \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JOBSTREAM_HEALTH__HOST=0.0.0.0
WORKDIR /app
USER 10001:10001
# /livez, /readyz and /metrics (JOBSTREAM_HEALTH__PORT).
EXPOSE 8080
ENTRYPOINT ["jobstream"]
# The default command runs the example handlers; replace it with your MODULE:APP.
CMD ["worker", "examples.app:app"]
