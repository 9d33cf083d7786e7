# One image for both processes: `tunnel-relay serve` (default) or `tunnel-agent`.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py _frames.pyx README.md ./
COPY tunnel tunnel
COPY agent agent
COPY relay relay
# With the PostgreSQL driver, so the same image can run a relay of a cluster.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgresql]"

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --home /var/lib/tunnel --create-home tunnel
USER tunnel
WORKDIR /var/lib/tunnel
ENV RELAY_STATE_DIR=/var/lib/tunnel/relay-state
EXPOSE 8443/tcp 8443/udp
ENTRYPOINT ["tunnel-relay"]
CMD ["serve"]
