# publer-proxy image: the venv and the app only, run as uid 10001, no secret in
# any layer, a HEALTHCHECK on /healthz, and no write anywhere at run time, so the root
# filesystem can be mounted read-only (docker run --read-only, readOnlyRootFilesystem).
# The development tools (proxy/dev: the Publer sandbox, the dev stack) are not in it.
#
#   docker build -t publer-proxy .
#
# The `dev` target is the same image plus proxy/dev, for docker-compose.yml's sandbox only:
#   docker build --target dev -t publer-proxy-dev .
#
# Builds without a registry where none is reachable: scripts/container-base.sh
# creates debian:bookworm-slim locally, then
#   buildah bud --isolation chroot --pull=never --format docker -t publer-proxy .
# Behind a TLS-inspecting proxy, mount its CA bundle and point pip at it:
#   -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt

FROM debian:bookworm-slim AS builder

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# A CA bundle for pip (the path of a file mounted at build time, never a layer's content);
# build arguments reach every RUN below as environment variables, and pip reads PIP_CERT.
ARG PIP_CERT=""
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv

# Dependencies first, in a layer of their own: a change to the code alone reuses it.
# EXTRAS adds optional ones by extra name: --build-arg EXTRAS=aws for AWS Secrets Manager,
# EXTRAS=azure for Azure Key Vault.
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python3 -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for e in os.environ["EXTRAS"].split(",") if e for d in p["optional-dependencies"][e]]))' \
        > /tmp/requirements.txt \
    && pip install --no-compile -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself, without proxy/dev and without its test or devstack extras (no
# openbao, no pytest); then no installer left in the venv, and bytecode compiled now,
# checked by hash rather than timestamp so that it stays valid after the copy below:
# nothing writes a .pyc at run time.
COPY proxy ./proxy
RUN rm -r proxy/dev \
    && pip install --no-compile --no-deps . \
    && pip uninstall --yes --quiet setuptools pip \
    && rm -f /opt/venv/bin/activate* /opt/venv/bin/Activate.ps1 \
    && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv

# The venv above plus proxy/dev, for the `dev` target.
FROM builder AS dev-builder
COPY proxy/dev ./proxy/dev
RUN site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
    && cp -r proxy/dev "$site/proxy/dev" \
    && python3 -m compileall -q --invalidation-mode unchecked-hash "$site/proxy/dev"

# What both images run on: Python, the system CA store, and the unprivileged user.
FROM debian:bookworm-slim AS base

# ca-certificates: the upstream and Vault clients verify TLS against the system CA store.
# /run/publer-proxy-ca: where the forward proxy writes its CA certificate; a volume mounted
# there starts out owned by the proxy's user.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/* \
    && groupadd --gid 10001 publer-proxy \
    && useradd --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin publer-proxy \
    && install -d -o 10001 -g 10001 -m 0755 /run/publer-proxy-ca
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Development only: the Publer sandbox (docker-compose.yml's upstream), never deployed.
FROM base AS dev
COPY --from=dev-builder /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["publer-proxy"]
CMD ["sandbox", "--host", "0.0.0.0", "--port", "8090"]

# The image: the last stage, what `docker build .` makes.
FROM base

LABEL org.opencontainers.image.title="publer-proxy" \
      org.opencontainers.image.description="A reverse proxy for the Publer API that keeps its key in Vault" \
      org.opencontainers.image.licenses="MIT"

COPY --from=builder /opt/venv /opt/venv
COPY deploy/proxy.image.yaml /etc/publer-proxy/proxy.yaml

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# The default config's address; a config that listens elsewhere needs its own health check.
# No proxy from the environment: the probe is for this container's loopback.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["publer-proxy"]
CMD ["serve", "--config", "/etc/publer-proxy/proxy.yaml"]
