#!/usr/bin/env bash
# One command for a load test on this machine: builds weir-focus and weir-loadtest (release by
# default: capacity figures from debug builds mean little), starts a private Synapse and the focus
# on loopback, runs weir-loadtest with the arguments given, and stops everything again.
#
#   scripts/loadtest.sh --rooms 2 --publishers 4 --duration 30 --json result.json --plot charts/
#   scripts/loadtest.sh --direct --publishers 1 --subscribers 50 --duration 30
#
#   scripts/loadtest.sh --sites 2 --publishers 2 --subscribers 20 --duration 30
#
# `--direct` (first argument) signals through the focus's direct endpoint instead of Synapse; no
# Synapse is started then, and the focus runs with Matrix off (the media plane alone).
# `--sites N` (first argument) is a cascade: N Synapses that federate over loopback, each with
# its own focus; each room's participants are spread over them and call their own site's focus.
# Everything runs in a loopback-only network namespace (scripts/in-netns.sh). Environment:
# WEIR_PROFILE=debug to skip the release build; WEIR_KEEP_TMP=1 to keep logs; WEIR_SHARDS;
# WEIR_MEDIA_EXTRA for more lines of the focus's [media] section (e.g. "rtx_history_packets = 1024");
# WEIR_FOCUS_WRAPPER to start the focus under a profiler (e.g. "heaptrack -o /tmp/focus") or
# pinned to a core ("taskset -c 0"); WEIR_TESTER_WRAPPER likewise for the load tester.
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
SITES=1
if [[ "${1:-}" == --direct ]]; then DIRECT=1; shift; fi
if [[ "${1:-}" == --sites ]]; then SITES="${2:?--sites needs a number}"; shift 2; fi
[[ "$SITES" =~ ^[1-9]$ ]] || { echo "--sites takes 1 to 9" >&2; exit 64; }
TMP="$(mktemp -d /tmp/weir-loadtest-XXXXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FOCUS_PIDS=()
HTTP_PORTS=()
cleanup() {
  for i in "${!HTTP_PORTS[@]}"; do
    curl -fs "http://127.0.0.1:${HTTP_PORTS[$i]}/metrics" > "$TMP/metrics-end-$i.txt" 2>/dev/null || true
  done
  # Under WEIR_FOCUS_WRAPPER the focus is the wrapper's child, and a profiler's script does not
  # pass TERM on: stop the focus itself too (by name, so the profiler can finish writing).
  for pid in "${FOCUS_PIDS[@]}"; do
    pkill -TERM -P "$pid" -x weir-focus 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  for i in $(seq 0 $((SITES - 1))); do scripts/synapse.sh stop "$TMP/synapse$i" >/dev/null 2>&1 || true; done
  if [[ "${WEIR_KEEP_TMP:-0}" == 1 ]]; then echo "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# One site: a Synapse (federating when there are several) and its focus. Sets HS, SECRET,
# FOCUS_USER, DEVICE, HTTP_PORT, TOKEN.
start_site() { # index
  local i="$1" hs_port fed_port password
  hs_port="$(free_port)"; HTTP_PORT="$(free_port)"
  TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  DEVICE="WEIRFOCUS$i"
  if [[ "$DIRECT" == 1 ]]; then
    # The media plane alone: no homeserver at all (matrix.enabled = false).
    FOCUS_USER="@weir-focus:direct.invalid"
    printf '[matrix]\nenabled = false\ndevice_id = "%s"\n' "$DEVICE" > "$TMP/focus$i.toml"
    start_focus "$i"
    return
  fi
  if [[ "$SITES" == 1 ]]; then
    echo "==> Synapse on 127.0.0.1:$hs_port"
    scripts/synapse.sh start "$TMP/synapse$i" "$hs_port" >/dev/null
  else
    fed_port="$(free_port)"
    echo "==> Synapse $i on 127.0.0.1:$hs_port (server name localhost:$fed_port)"
    scripts/synapse.sh start-fed "$TMP/synapse$i" "$hs_port" "$fed_port" >/dev/null
  fi
  HS="http://127.0.0.1:$hs_port"
  SECRET="$TMP/synapse$i/shared_secret"
  password="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
  FOCUS_USER="$("$BIN/weir-loadtest" register --homeserver "$HS" \
    --registration-secret-file "$SECRET" --user focus --password "$password")"
  cat > "$TMP/focus$i.toml" <<TOML
[matrix]
homeserver_url = "$HS"
user_id = "$FOCUS_USER"
password = "$password"
device_id = "$DEVICE"
state_dir = "$TMP/focus-state$i"
TOML
  start_focus "$i"
}

# Start site i's focus from $TMP/focus$i.toml (its [matrix] section; the rest is the same for
# every site) and wait until it is healthy.
start_focus() { # index
  local i="$1"
  cat >> "$TMP/focus$i.toml" <<TOML
[media]
shards = ${WEIR_SHARDS:-0}
${WEIR_MEDIA_EXTRA:-}
[http]
listen = "127.0.0.1:$HTTP_PORT"
direct_token = "$TOKEN"
[log]
level = "warn"
TOML
  echo "==> weir-focus ($PROFILE) as $FOCUS_USER"
  # shellcheck disable=SC2086 # the wrapper is a command line, split on purpose
  ${WEIR_FOCUS_WRAPPER:-} "$BIN/weir-focus" --config "$TMP/focus$i.toml" 2> "$TMP/focus$i.log" &
  local pid=$!
  FOCUS_PIDS+=("$pid")
  HTTP_PORTS+=("$HTTP_PORT")
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$TMP/focus$i.log" >&2; exit 1; }
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null || { echo "focus $i not ready" >&2; exit 1; }
}

ARGS=()
for i in $(seq 0 $((SITES - 1))); do
  start_site "$i"
  METRICS="http://127.0.0.1:$HTTP_PORT/metrics"
  if [[ "$i" == 0 ]]; then
    ARGS+=(--focus-user "$FOCUS_USER" --focus-device "$DEVICE" --focus-metrics "$METRICS")
    if [[ "$DIRECT" == 1 ]]; then
      ARGS+=(--direct "http://127.0.0.1:$HTTP_PORT" --direct-token "$TOKEN")
    else
      ARGS+=(--homeserver "$HS" --registration-secret-file "$SECRET")
    fi
  else
    ARGS+=(--site "$HS,$SECRET,$FOCUS_USER,$DEVICE,$METRICS")
  fi
done
echo "==> weir-loadtest run ${ARGS[*]} $*"
# shellcheck disable=SC2086 # the wrapper is a command line, split on purpose
${WEIR_TESTER_WRAPPER:-} "$BIN/weir-loadtest" run "${ARGS[@]}" "$@"
