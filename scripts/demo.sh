#!/usr/bin/env bash
# The newcomer's first run: install what is needed, build the focus, and hold a real
# 3-participant video call (three headless Chromium clients running stock matrix-js-sdk 43)
# through a throw-away Synapse and the weir focus for ~20 s, then print what everyone received.
# Exits 0 if every participant received every other participant.
#
#   scripts/demo.sh
#
# Environment: WEIR_DEMO_SECONDS (default 20); WEIR_SKIP_SETUP=1 / WEIR_SKIP_BUILD=1 skip the
# first two steps; WEIR_KEEP_TMP=1 keeps the temp dir with the Synapse and focus logs.
set -euo pipefail

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

# In a network namespace with only loopback, so the call's media is 127.0.0.1 on both ends.
echo "==> scripts/in-netns.sh node web/tools/demo.mjs (${WEIR_DEMO_SECONDS:-20} s call)"
exec bash scripts/in-netns.sh node web/tools/demo.mjs
