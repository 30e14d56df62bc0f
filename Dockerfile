# syncd: build a virtualenv in one stage, run it as a non-root user in a slim one.
#   docker build -t syncd .
#   docker run -d -v syncd-data:/data -v $PWD/config/syncd.toml:/etc/syncd/syncd.toml:ro \
#     --env-file .env -p 8080:8080 --stop-timeout 30 syncd
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY syncd ./syncd
COPY migrations ./migrations
# Exact versions from constraints.txt: the image is reproducible, not "latest of the day".
RUN python -m venv /opt/syncd && /opt/syncd/bin/pip install --constraint constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin syncd \
    && mkdir -p /data /etc/syncd && chown syncd /data
COPY --from=build /opt/syncd /opt/syncd
COPY config/syncd.example.toml /etc/syncd/syncd.toml
COPY config/demo.toml /etc/syncd/demo.toml
ENV PATH=/opt/syncd/bin:$PATH PYTHONUNBUFFERED=1 SYNCD_CONFIG=/etc/syncd/syncd.toml \
    SYNCD_HEALTH_URL=http://127.0.0.1:8080/healthz
# The configs' relative `data/...` database paths land on the volume.
WORKDIR /
VOLUME ["/data"]
USER syncd
EXPOSE 8080
# /healthz answers from memory (process and scheduler alive), never from the database.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; urllib.request.urlopen(os.environ['SYNCD_HEALTH_URL'], timeout=4); sys.exit(0)"]
# SIGTERM starts the graceful shutdown (daemon.shutdown_grace, 20 s): give docker
# stop more than that (--stop-timeout 30, compose stop_grace_period) or it kills first.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run"]
