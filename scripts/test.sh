#!/usr/bin/env bash
# Runs every check and test of portal-sync: formatting, lints, unit and
# integration tests (real server, real sockets) on both storage engines (temp
# SQLite files, then a PostgreSQL database per test), then the browser tests
# (scripts/browser-test.sh: the pages in headless Chromium).
# This is the README's test command, and .ci/run runs exactly this.
#
# PostgreSQL: PORTAL_TEST_PG_URL (an admin URL; default the local server,
# postgres://postgres@127.0.0.1:5432/postgres). If it cannot be reached the
# PostgreSQL pass is skipped with a notice, or fails the run when
# PORTAL_TEST_REQUIRE_PG is set (.ci/run sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs), then run this again" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo build --examples"
cargo build --locked --examples
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
echo "== cargo test (SQLite)"
env -u PORTAL_TEST_PG_URL cargo test --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || status=1
pg_url="${PORTAL_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if bash scripts/pg-check.sh "$pg_url"; then
  echo "== cargo test (PostgreSQL at ${pg_url##*@})"
  PORTAL_TEST_PG_URL="$pg_url" cargo test --locked --no-fail-fast --lib --tests 2>&1 | tee -a "$log" || status=1
elif [ -n "${PORTAL_TEST_REQUIRE_PG:-}" ]; then
  echo "PostgreSQL at $pg_url cannot be reached: CI runs the suite on both engines" >&2
  echo "test result: FAILED. 0 passed; 1 failed;" >>"$log"
  status=1
else
  echo "== cargo test (PostgreSQL): SKIPPED, no server at $pg_url (set PORTAL_TEST_PG_URL)" >&2
fi
echo "== browser tests"
bash scripts/browser-test.sh 2>&1 | tee -a "$log" || status=1
# One closing line for the whole run: cargo prints one line per test binary,
# browser-test.sh one for its run. A stage that failed without counting a
# failed test (a build error, a crash) counts as one failure.
awk -v broken="$status" '
  /^test result:/ { p += $4; f += $6 }
  /^browser tests: [0-9]+ passed, [0-9]+ failed$/ { p += $3; f += $5 }
  END { if (broken && f == 0) f = 1; printf "all tests: %d passed, %d failed\n", p, f }
' "$log"
exit "$status"
