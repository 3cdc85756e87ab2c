#!/usr/bin/env bash
# Runs the browser tests (tests/browser/): web/client.js on its own in Node,
# then the presenter and viewer pages in a real headless Chromium (Debian's
# package) driven by playwright-core, against the real binary on a free port.
# Installs what is missing first (chromium via apt-get, playwright-core via
# npm ci), builds the binary, and ends with one line:
#   browser tests: N passed, M failed
# scripts/test.sh runs this as its last stage.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

chromium=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "== installing chromium (Debian package)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "Node.js 20 or newer is needed for the browser tests" >&2
  exit 1
fi

# npm ci only when the lock file changed since the last install.
stamp=tests/browser/node_modules/.installed-package-lock.json
if ! cmp -s tests/browser/package-lock.json "$stamp" 2>/dev/null; then
  echo "== npm ci (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/browser/package-lock.json "$stamp"
fi

echo "== cargo build --bin portal-sync"
cargo build --locked --bin portal-sync
target_dir=${CARGO_TARGET_DIR:-$root/target}
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac

echo "== node --test (tests/browser)"
tap=$(mktemp)
trap 'rm -f "$tap"' EXIT
status=0
(
  cd tests/browser
  export PORTAL_SYNC_BIN="$target_dir/debug/portal-sync" CHROMIUM_PATH="$chromium"
  export SCREENSHOT_DIR="$target_dir/browser-screenshots"
  # Every test has its own timeout; this bounds the whole run if one hangs.
  timeout --kill-after=10 900 node --disable-warning=ExperimentalWarning --test \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$tap" \
    client.test.js package.test.js pages.test.js layout.test.js presenter.test.js viewer.test.js example.test.js token.test.js fallback.test.js
) || status=$?

passed=$(awk '/^# pass / { n = $3 } END { print n + 0 }' "$tap")
failed=$(awk '/^# fail / { n = $3 } END { print n + 0 }' "$tap")
# A run that died without reporting a failure (a crash, the timeout) still failed.
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "screenshots: $target_dir/browser-screenshots/"
echo "browser tests: $passed passed, $failed failed"
exit "$status"
