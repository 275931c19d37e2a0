#!/usr/bin/env bash
# One command for a load test on this machine: builds weir-focus and weir-loadtest (release by
# default: capacity figures from debug builds mean little), starts a private Synapse and the focus
# on loopback, runs weir-loadtest with the arguments given, and stops everything again.
#
#   scripts/loadtest.sh --rooms 2 --publishers 4 --duration 30 --json result.json --plot charts/
#   scripts/loadtest.sh --direct --publishers 1 --subscribers 50 --duration 30
#
# `--direct` (first argument) signals through the focus's direct endpoint instead of Synapse.
# Everything runs in a loopback-only network namespace (scripts/in-netns.sh). Environment:
# WEIR_PROFILE=debug to skip the release build; WEIR_KEEP_TMP=1 to keep logs; WEIR_SHARDS.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PROFILE="${WEIR_PROFILE:-release}"

if [[ "${WEIR_IN_NETNS:-0}" != 1 ]]; then
  [[ -x .venv/synapse/bin/python ]] || scripts/setup.sh
  if [[ "$PROFILE" == release ]]; then
    cargo build --release -p weir-focus -p weir-loadtest
  else
    cargo build -p weir-focus -p weir-loadtest
  fi
  exec scripts/in-netns.sh "$0" "$@"
fi

BIN="$REPO/target/$PROFILE"
DIRECT=0
if [[ "${1:-}" == --direct ]]; then DIRECT=1; shift; fi
TMP="$(mktemp -d /tmp/weir-loadtest-XXXXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HS_PORT="$(free_port)"; HTTP_PORT="$(free_port)"
FOCUS_PID=""
cleanup() {
  [[ -n "${HTTP_PORT:-}" ]] && curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" > "$TMP/metrics-end.txt" 2>/dev/null || true
  [[ -n "$FOCUS_PID" ]] && kill -TERM "$FOCUS_PID" 2>/dev/null && wait "$FOCUS_PID" 2>/dev/null || true
  scripts/synapse.sh stop "$TMP/synapse" >/dev/null 2>&1 || true
  if [[ "${WEIR_KEEP_TMP:-0}" == 1 ]]; then echo "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

echo "==> Synapse on 127.0.0.1:$HS_PORT"
scripts/synapse.sh start "$TMP/synapse" "$HS_PORT" >/dev/null
HS="http://127.0.0.1:$HS_PORT"
PASSWORD="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
FOCUS_USER="$("$BIN/weir-loadtest" register --homeserver "$HS" \
  --registration-secret-file "$TMP/synapse/shared_secret" --user focus --password "$PASSWORD")"

cat > "$TMP/focus.toml" <<TOML
[matrix]
homeserver_url = "$HS"
user_id = "$FOCUS_USER"
password = "$PASSWORD"
device_id = "WEIRFOCUS"
state_dir = "$TMP/focus-state"
[media]
shards = ${WEIR_SHARDS:-0}
[http]
listen = "127.0.0.1:$HTTP_PORT"
direct_token = "$TOKEN"
[log]
level = "warn"
TOML
echo "==> weir-focus ($PROFILE) as $FOCUS_USER"
"$BIN/weir-focus" --config "$TMP/focus.toml" 2> "$TMP/focus.log" &
FOCUS_PID=$!
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$FOCUS_PID" 2>/dev/null || { cat "$TMP/focus.log" >&2; exit 1; }
  sleep 0.1
done
curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null || { echo "focus not ready" >&2; exit 1; }

ARGS=(--focus-user "$FOCUS_USER" --focus-metrics "http://127.0.0.1:$HTTP_PORT/metrics")
if [[ "$DIRECT" == 1 ]]; then
  ARGS+=(--direct "http://127.0.0.1:$HTTP_PORT" --direct-token "$TOKEN")
else
  ARGS+=(--homeserver "$HS" --registration-secret-file "$TMP/synapse/shared_secret")
fi
echo "==> weir-loadtest run ${ARGS[*]} $*"
"$BIN/weir-loadtest" run "${ARGS[@]}" "$@"
