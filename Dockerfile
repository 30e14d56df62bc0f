# syncd: build a virtualenv in one stage, run it as a non-root user in a slim one.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncd ./syncd
COPY migrations ./migrations
RUN python -m venv /opt/syncd && /opt/syncd/bin/pip install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin syncd \
    && mkdir -p /data /etc/syncd && chown syncd /data
COPY --from=build /opt/syncd /opt/syncd
COPY config/syncd.example.toml /etc/syncd/syncd.toml
ENV PATH=/opt/syncd/bin:$PATH PYTHONUNBUFFERED=1 SYNCD_CONFIG=/etc/syncd/syncd.toml
WORKDIR /data
VOLUME ["/data"]
USER syncd
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run"]
