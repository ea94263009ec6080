#!/usr/bin/env bash
# OS packages the test suite uses: docker-compose (v1, validates docker-compose.yml offline).
# Installs them with apt when running as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "missing OS packages: ${missing[*]} (e.g. sudo apt-get install -y ${missing[*]});" \
    "the tests that need them will fail and say so" >&2
fi
