# Stand-in for redis:7-alpine: Debian's redis-server (7.0) and redis-cli, data in /data.
ARG STANDIN_BASE=polar-standin/debian:bookworm
FROM ${STANDIN_BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
