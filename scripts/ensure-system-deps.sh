#!/usr/bin/env bash
# OS packages the test suite uses: docker-compose (v1, validates docker-compose.yml offline),
# chromium (Debian's browser, which the web UI's browser tests drive with playwright; playwright
# never downloads one) and libfuse2 (fusepy's library: the library tests mount a case-insensitive
# FUSE file system). Installs them with apt when running as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
[ -x /usr/bin/chromium ] || missing+=(chromium)
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || missing+=(libfuse2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
else
  echo "missing OS packages: ${missing[*]} (e.g. sudo apt-get install -y ${missing[*]});" \
    "the tests that need them will fail and say so" >&2
fi
