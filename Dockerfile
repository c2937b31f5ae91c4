# kore-session-gateway container image.
#
#   docker build -t kore-session-gateway .
#   docker build --build-arg BASE_IMAGE=registry.internal/python:3.12-slim \
#                --build-arg PIP_INDEX_URL=https://pypi.internal/simple -t kore-session-gateway .
#   docker build --build-arg BASE_IMAGE=python:3.11-slim@sha256:<digest> -t kore-session-gateway .
#                (the base image pinned by digest, for reproducible production builds)
#   docker run --read-only --stop-timeout 30 -v kore-gateway-audit:/var/lib/kore-gateway \
#              -v $PWD/gateway.toml:/etc/kore-gateway/gateway.toml:ro kore-session-gateway
#
# docs/operations.md ("Docker") has the details; tests/docker/smoke.sh builds and checks the image.
#
# The base image needs Python >= 3.11 with venv and pip (python:3.1x-slim, or a Debian image with
# python3-venv). Runs as uid/gid 10001, never writes outside /var/lib/kore-gateway (the audit
# volume) and /tmp, so `--read-only` / readOnlyRootFilesystem works as is.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# An index mirror for air-gapped builds; unset means pip's default (or the base image's pip.conf).
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Byte-code is compiled here, at build time: the running container never writes it.
RUN python3 -m venv /opt/kore-gateway \
 && /opt/kore-gateway/bin/python -m pip install --quiet /src \
 && /opt/kore-gateway/bin/python -m compileall -q /opt/kore-gateway/lib \
 && /opt/kore-gateway/bin/python -m pip uninstall --quiet --yes pip

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="kore-session-gateway" \
      org.opencontainers.image.description="Authenticating gateway that closes Kore.ai bot sessions, with a hash-chained audit log" \
      org.opencontainers.image.licenses="Apache-2.0"
# Slim images ship the standard library without byte-code; compile it once here, since a
# read-only container would otherwise recompile it in memory at every start and every probe.
RUN groupadd --system --gid 10001 kore-gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin kore-gateway \
 && mkdir -p /etc/kore-gateway /var/lib/kore-gateway \
 && chown 10001:10001 /var/lib/kore-gateway && chmod 0750 /var/lib/kore-gateway \
 && python3 -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('stdlib'), quiet=2, workers=0)"
COPY --from=build /opt/kore-gateway /opt/kore-gateway
ENV PATH=/opt/kore-gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/kore-gateway/gateway.toml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    HOME=/tmp \
    TMPDIR=/tmp
# Audit files live here (point audit.path at it, e.g. /var/lib/kore-gateway/audit/deactivations.jsonl).
VOLUME ["/var/lib/kore-gateway"]
WORKDIR /var/lib/kore-gateway
USER 10001:10001
# 8080: the API (server.listen); 9091: the admin listener when server.admin_listen is set
# (e.g. "0.0.0.0:9091": /metrics, /healthz, /readyz, /openapi.json, no deactivation route).
EXPOSE 8080 9091
# Probes /healthz on the config's admin_listen address when one is set, else on its listen
# address (a wildcard address over loopback), with a standard-library-only entry point that
# costs a few tens of milliseconds of CPU per probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "gateway.http.healthcheck"]
# SIGTERM (the default stop signal) drains for up to server.drain_s: give `docker stop -t` or
# the orchestrator's grace period more than that.
ENTRYPOINT ["kore-gateway"]
CMD ["serve"]
