# The hub in a container: README.md, "Docker". Not built on the project's machines (they have
# no Docker); tests/test_deploy_files.py lints this file with hadolint and checks every
# setting, path and command in it against the hub, the health check against a real hub.
FROM python:3.11-slim

# The hub's stack and the Redis store on top of the agent: pip builds the checkout's wheel.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hub ./hub
COPY device_agent ./device_agent
RUN pip install --no-cache-dir --disable-pip-version-check '/src[hub,redis]' \
    && rm -rf /src \
    && groupadd --system --gid 10001 presence \
    && useradd --system --uid 10001 --gid presence --home-dir /data --shell /usr/sbin/nologin \
        presence \
    && install -d -o presence -g presence -m 0700 /data

# Every setting is also a PRESENCE_* variable: override these with `docker run -e` or
# compose's environment. /data holds the TinyDB file and credentials.json (the accounts).
# The broker listens on every address of the container, which the hub allows only once an
# account exists (README, "Docker"). The HTTP side stays inside for the health check; to
# publish the dashboard set PRESENCE_HTTP=0.0.0.0:8080 with PRESENCE_HTTP_TOKEN.
ENV PYTHONUNBUFFERED=1 \
    PRESENCE_BROKER=embedded \
    PRESENCE_LISTEN=0.0.0.0:1883 \
    PRESENCE_STORAGE=tinydb \
    PRESENCE_DB=/data/presence.json \
    PRESENCE_HTTP=127.0.0.1:8080

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# MQTT, MQTT over TLS (with --tls-cert/--tls-key), the dashboard (with PRESENCE_HTTP above)
EXPOSE 1883 8883 8080

# /healthz answers 200 while the hub runs and its broker link is up, 503 otherwise; the port
# comes from PRESENCE_HTTP, so changing it moves the check along
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PRESENCE_HTTP', '127.0.0.1:8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# `docker run IMAGE` runs the hub; `docker run IMAGE users add alice phone` manages accounts
ENTRYPOINT ["presence-hub"]
