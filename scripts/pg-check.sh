#!/usr/bin/env bash
# Exit 0 when the PostgreSQL server of the URL given ($1) accepts a query
# within 5 s. Uses psql when installed; otherwise a bare TCP connect.
set -u
url="${1:?usage: pg-check.sh postgres://user@host:port/db}"
if command -v psql >/dev/null 2>&1; then
  PGCONNECT_TIMEOUT=5 psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
  exit $?
fi
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=5432
timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
