# Image of the webhook dispatcher: `dispatcher run` by default; any other
# subcommand (`topics ensure`, `subscriptions ...`, `dead-letter ...`) as arguments.
#
# Both stages must use the same Python: the venv built in the first one is
# copied as is into the second, and its interpreter links to /usr/local/bin/python3.
# Override PYTHON_IMAGE with a digest-pinned reference for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the wheel is built from (see .dockerignore); README.md is the
# project's long description, so pyproject.toml needs it.
COPY pyproject.toml README.md ./
COPY dispatcher/ dispatcher/
# Every dependency, confluent-kafka included, comes as a manylinux wheel, so
# neither stage needs a compiler. Installing from the local wheel directory with
# --no-index makes the venv hold exactly what was just resolved.
# Behind a TLS-intercepting proxy, give pip its CA bundle as a build secret
# (`--secret id=pip-ca,src=ca.pem`): it is used for this step and stored nowhere.
# A directory of every wheel needed, mounted at /wheelhouse (`--volume`, as
# scripts/image-check.sh does), replaces the package index.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && if [ -d /wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
 && /opt/venv/bin/pip wheel --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-index --find-links /wheels webhook-dispatcher \
 && /opt/venv/bin/dispatcher --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="webhook-dispatcher" \
      org.opencontainers.image.description="Kafka-based webhook dispatcher" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid lets Kubernetes verify runAsNonRoot without a passwd
# lookup; the passwd entry is there for libraries that ask for a user name.
# /var/lib/dispatcher/history holds the API's history store; owned by the uid so a
# fresh named volume mounted there (Compose) starts writable.
RUN groupadd --system --gid 10001 dispatcher \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/dispatcher/history
COPY --from=builder /opt/venv /opt/venv
# Bytecode was compiled at install time; writing more would fail on a read-only
# root filesystem. Unbuffered output keeps JSON log lines whole and in order.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# /metrics, /healthz and /readyz (DISPATCHER_HTTP_PORT).
EXPOSE 8080
# `dispatcher check` answers with its exit code (0 = ready), so the container
# state follows readiness, subscription table caught up included.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["dispatcher", "check"]
ENTRYPOINT ["dispatcher"]
CMD ["run"]
