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

step "cargo build (dev profile, all targets)"
cargo build --workspace --all-targets --locked

step "cargo test"
cargo test --workspace --locked

step "browser interop (node --test web/test/)"
WEIR_FOCUS_BIN="$REPO/target/debug/weir-focus" node --test --test-concurrency=1 web/test/

echo
echo "all tests passed in $(( $(date +%s) - started )) s"
