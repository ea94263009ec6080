#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the integration tests use are up; start them if not.
# Start commands are the ones this machine kind documents (python-svc).
set -euo pipefail
PGHOST=${PGHOST:-127.0.0.1}; PGPORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" "$2" && return 0; sleep 0.5; done
  return 1
}

if ! port_open "$PGHOST" "$PGPORT"; then
  echo "PostgreSQL is down on $PGHOST:$PGPORT; starting it"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  wait_port "$PGHOST" "$PGPORT" || { echo "PostgreSQL did not come up"; exit 1; }
fi

if ! port_open 127.0.0.1 "$REDIS_PORT"; then
  echo "Redis is down on 127.0.0.1:$REDIS_PORT; starting it"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 127.0.0.1 "$REDIS_PORT" || { echo "Redis did not come up"; exit 1; }
fi
echo "services: PostgreSQL $PGHOST:$PGPORT and Redis 127.0.0.1:$REDIS_PORT are up"
