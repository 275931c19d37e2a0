#!/usr/bin/env bash
# Run a command in a fresh network namespace whose only interface is loopback (brought up).
#
#   scripts/in-netns.sh node --test web/test/
#
# Why: Chromium pairs every local interface with the focus's 127.0.0.1 candidate and prefers a
# real NIC over loopback, so on a machine with an eth0 the media would flow between eth0's address
# and 127.0.0.1. Inside this namespace the only address is 127.0.0.1, so every ICE pair, every
# socket and every packet of the test is loopback. Nothing in here can reach a registry: install
# and build first (scripts/setup.sh, cargo build), then run the test or demo through this.
#
# Needs root (or unprivileged user namespaces: then it maps the caller to root in a new user
# namespace). Where no namespace can be made it warns and runs the command directly (the test
# then still checks the focus's side of the pair is 127.0.0.1), unless WEIR_NETNS_REQUIRED=1, in
# which case it exits 2. WEIR_NO_NETNS=1 runs the command directly without trying.
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 64; }

if [[ "${WEIR_NO_NETNS:-0}" == 1 || "${WEIR_IN_NETNS:-0}" == 1 ]]; then
  exec "$@"
fi
for tool in unshare ip; do
  command -v "$tool" >/dev/null && continue
  if [[ "${WEIR_NETNS_REQUIRED:-0}" == 1 ]]; then echo "in-netns.sh: $tool not found" >&2; exit 2; fi
  echo "in-netns.sh: WARNING: $tool not found; running without a network namespace" >&2
  exec "$@"
done

flags=(--net)
[[ "$(id -u)" == 0 ]] || flags+=(--map-root-user)
if ! unshare "${flags[@]}" true 2>/dev/null; then
  if [[ "${WEIR_NETNS_REQUIRED:-0}" == 1 ]]; then
    echo "in-netns.sh: cannot create a network namespace here (unshare ${flags[*]} failed)" >&2
    exit 2
  fi
  echo "in-netns.sh: WARNING: cannot create a network namespace (unshare ${flags[*]} failed); running without one, so the browser may use a non-loopback local address" >&2
  exec "$@"
fi
export WEIR_IN_NETNS=1
exec unshare "${flags[@]}" -- bash -c 'ip link set lo up && exec "$@"' in-netns "$@"
