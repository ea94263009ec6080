# Stand-in for postgres:16-alpine: Debian's PostgreSQL 15 behind an entrypoint that honours
# POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and PGDATA like the official image's.
ARG STANDIN_BASE=polar-standin/debian:bookworm
FROM ${STANDIN_BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 5432
CMD ["postgres"]
