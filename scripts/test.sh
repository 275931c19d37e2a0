#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust unit and scenario tests (real str0m peers, a real
# Synapse), and the browser interop test (real Chromium running stock matrix-js-sdk 43 against
# the focus through a real Synapse). .ci/run runs exactly this.
#
# One build serves everything: the dev profile with optimised dependencies (see Cargo.toml), in
# the one workspace target directory.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

step "setup (Chromium, Synapse venv, npm packages, browser bundle)"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "web app type check (tsc --noEmit)"
(cd web && node_modules/.bin/tsc -p tsconfig.json)

step "cargo build (dev profile, all targets)"
cargo build --workspace --all-targets --locked

# Everything that opens sockets runs in a network namespace of its own whose only interface is
# loopback (scripts/in-netns.sh): no test can touch the machine's own interface address. Builds
# and installs happen before, outside it. In CI a missing namespace is an error, not a warning.
export WEIR_NETNS_REQUIRED="${WEIR_NETNS_REQUIRED:-${CI:+1}}"

step "cargo test (in a loopback-only network namespace)"
scripts/in-netns.sh cargo test --workspace --locked --offline

step "a focus behind a NAT (scripts/nat-check.sh: namespaces, nftables, coturn, weir-loadtest)"
scripts/nat-check.sh

step "graceful drain through the admin API (scripts/drain-check.sh: weir-loadtest, direct mode)"
scripts/drain-check.sh

step "browser interop (node --test web/test/*.test.mjs, in a loopback-only network namespace)"
WEIR_FOCUS_BIN="$REPO/target/debug/weir-focus" \
  scripts/in-netns.sh node --test --test-concurrency=1 web/test/*.test.mjs

step "browser interop with the focus as an application service (WEIR_FOCUS_APPSERVICE=1)"
WEIR_FOCUS_BIN="$REPO/target/debug/weir-focus" WEIR_FOCUS_APPSERVICE=1 \
  scripts/in-netns.sh node --test web/test/interop.test.mjs

echo
echo "all tests passed in $(( $(date +%s) - started )) s"
