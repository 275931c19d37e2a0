#!/usr/bin/env bash
# The newcomer's first run: install what is needed, build the focus and the web app, and start a
# local deployment a person can open: a throw-away Synapse, the focus serving the web app, and
# two simulated people (headless Chromium pages of the app) already in an encrypted call. It
# prints the URL and a login, and stays up until Ctrl-C.
#
#   scripts/demo.sh              the app, in your browser
#   scripts/demo.sh --headless   no browser of yours: a scripted 3-party call (stock js-sdk
#                                clients in headless Chromium) for ~20 s, then a table of what
#                                everyone received; exits 0 if everyone received everyone
#
# Environment: WEIR_DEMO_SECONDS (default 20, --headless); WEIR_DEMO_HTTP_PORT (default 8090);
# WEIR_SKIP_SETUP=1 / WEIR_SKIP_BUILD=1 skip the first two steps; WEIR_KEEP_TMP=1 keeps the temp
# dir with the Synapse and focus logs.
set -euo pipefail

case "${1:-}" in
  "" | --headless) [[ $# -le 1 ]] || { echo "usage: scripts/demo.sh [--headless]" >&2; exit 2; } ;;
  *) echo "usage: scripts/demo.sh [--headless]" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ "${WEIR_SKIP_SETUP:-0}" != 1 ]]; then
  echo "==> scripts/setup.sh"
  bash scripts/setup.sh
fi

if [[ "${WEIR_SKIP_BUILD:-0}" != 1 ]]; then
  echo "==> cargo build -p weir-focus"
  cargo build -p weir-focus
fi

export WEIR_FOCUS_BIN="${WEIR_FOCUS_BIN:-target/debug/weir-focus}"
[[ -x "$WEIR_FOCUS_BIN" ]] || { echo "demo.sh: no focus binary at $WEIR_FOCUS_BIN" >&2; exit 1; }

if [[ "${1:-}" == --headless ]]; then
  # In a network namespace with only loopback, so the call's media is 127.0.0.1 on both ends.
  echo "==> scripts/in-netns.sh node web/tools/demo.mjs (${WEIR_DEMO_SECONDS:-20} s call)"
  exec bash scripts/in-netns.sh node web/tools/demo.mjs
fi
# Not in a namespace: your browser must reach it. Everything listens on 127.0.0.1 only.
echo "==> node web/tools/app-demo.mjs"
exec node web/tools/app-demo.mjs
