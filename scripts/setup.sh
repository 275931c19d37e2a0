#!/usr/bin/env bash
# Install everything the browser interop test and the demo need, from the package registries only.
# Idempotent: each step checks first and skips what is already there.
#
#   1. Debian's Chromium at /usr/bin/chromium (apt-get; never a downloaded browser build)
#   2. Synapse in the project-local virtualenv .venv/synapse (pip install matrix-synapse)
#   3. npm dependencies of web/ from web/package-lock.json
#   4. the browser bundle web/dist/ (esbuild)
#
# Environment: WEIR_SKIP_APT=1 skips step 1 (for machines without root).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { printf '\n==> %s\n' "$*"; }
die() { echo "setup.sh: FAILED: $*" >&2; exit 1; }
trap 'echo "setup.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# --- 1. Chromium ---------------------------------------------------------------------------
step "Chromium (Debian package)"
if [[ -x /usr/bin/chromium ]]; then
  echo "present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
elif [[ "${WEIR_SKIP_APT:-0}" == 1 ]]; then
  die "/usr/bin/chromium is missing and WEIR_SKIP_APT=1"
else
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  echo "running: apt-get update && apt-get install -y chromium"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
  [[ -x /usr/bin/chromium ]] || die "apt-get installed chromium but /usr/bin/chromium is not there"
  echo "installed: $(/usr/bin/chromium --version 2>/dev/null)"
fi

# --- 1b. network namespace tools (scripts/in-netns.sh) ----------------------------------------
step "ip and unshare (loopback-only network namespaces for the tests)"
if command -v ip >/dev/null && command -v unshare >/dev/null; then
  echo "present: $(command -v ip) $(command -v unshare)"
elif [[ "${WEIR_SKIP_APT:-0}" == 1 ]]; then
  echo "WARNING: ip/unshare missing and WEIR_SKIP_APT=1: tests will run without a namespace" >&2
else
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y iproute2 util-linux
fi

# --- 1c. nftables (the cascade test cuts a trunk's UDP path, the ICE-TCP test blocks all UDP,
# each inside its own namespace) ----------------------------------------------------------------
step "nft (firewall rules inside the test's network namespace)"
if command -v nft >/dev/null; then
  echo "present: $(nft --version 2>/dev/null)"
elif [[ "${WEIR_SKIP_APT:-0}" == 1 ]]; then
  echo "WARNING: nft missing and WEIR_SKIP_APT=1: the trunk-cut and ICE-TCP tests will fail" >&2
else
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y nftables
fi

# --- 1d. coturn (a real STUN server for the NAT check, scripts/nat-check.sh) -------------------
step "coturn (STUN server)"
if command -v turnserver >/dev/null; then
  echo "present: $(command -v turnserver)"
elif [[ "${WEIR_SKIP_APT:-0}" == 1 ]]; then
  echo "WARNING: coturn missing and WEIR_SKIP_APT=1: scripts/nat-check.sh will fail" >&2
else
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends coturn
fi

# --- 2. Synapse ----------------------------------------------------------------------------
step "Synapse in .venv/synapse"
VENV="$REPO/.venv/synapse"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import synapse' 2>/dev/null; then
  echo "present: matrix-synapse $("$VENV/bin/python" -c 'import synapse; print(synapse.__version__)')"
else
  command -v python3 >/dev/null || die "python3 not found"
  PYV="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "Synapse needs Python >= 3.10, found $PYV"
  echo "running: python3 -m venv $VENV && pip install matrix-synapse (Python $PYV)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet matrix-synapse
  "$VENV/bin/python" -c 'import synapse' || die "matrix-synapse installed but does not import"
  echo "installed: matrix-synapse $("$VENV/bin/python" -c 'import synapse; print(synapse.__version__)')"
fi

# --- 3. npm dependencies -------------------------------------------------------------------
step "npm dependencies in web/"
command -v npm >/dev/null || die "npm not found (Node.js >= 20 is needed)"
cd "$REPO/web"
# npm ci wipes and reinstalls node_modules; do it only when the lockfile changed since the
# last install (npm keeps a copy of the resolved tree in node_modules/.package-lock.json).
if [[ -f node_modules/.package-lock.json ]] && [[ node_modules/.package-lock.json -nt package-lock.json ]] \
   && [[ -d node_modules/matrix-js-sdk && -d node_modules/playwright-core && -d node_modules/esbuild ]]; then
  echo "present: node_modules is up to date with package-lock.json"
else
  echo "running: npm ci (EBADENGINE warnings about Node 22 are expected: matrix-js-sdk runs only inside Chromium, bundled)"
  npm ci --no-audit --no-fund
fi

# --- 4. browser bundle ---------------------------------------------------------------------
step "browser bundle web/dist/"
echo "running: node build.mjs"
node build.mjs
ls -la dist/

printf '\nsetup.sh: done\n'
