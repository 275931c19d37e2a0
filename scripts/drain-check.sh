#!/usr/bin/env bash
# Graceful drain, end to end (issue 10), on loopback in a network namespace of its own:
#
# 1. A focus (direct mode, admin API on) holds two conferences of weir-loadtest participants.
# 2. POST /admin/v1/drain: /healthz turns 503 "draining", and a third conference is refused:
#    its participants never join.
# 3. The two conferences run to their end: every participant stays the whole time (nobody is
#    cut before the deadline), and when the last has left the focus exits by itself, status 0.
#
# Needs built binaries (cargo build -p weir-focus -p weir-loadtest; WEIR_BIN_DIR to pick another
# target dir). Prints PASS per step; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${WEIR_IN_NETNS:-0}" != 1 ]]; then
  exec scripts/in-netns.sh "$0" "$@"
fi
BIN="${WEIR_BIN_DIR:-target/debug}"
for b in weir-focus weir-loadtest; do
  [[ -x "$BIN/$b" ]] || { echo "drain-check: $BIN/$b missing" >&2; exit 2; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
TOKEN="drain-check-$RANDOM$RANDOM"
ADMIN_TOKEN="admin-$RANDOM$RANDOM$RANDOM$RANDOM"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n "${WEIR_KEEP_TMP:-}" ]] && echo "kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$TMP"/*.log; do [[ -f "$f" ]] && { echo "--- $f" >&2; tail -15 "$f" >&2; }; done; exit 1; }
admin() { # method path [body]
  curl -fsS -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    ${3:+--data "$3"} "http://127.0.0.1:$ADMIN_PORT$2"
}

cat > "$TMP/focus.toml" <<TOML
[matrix]
enabled = false
device_id = "WEIRFOCUS"
[media]
shards = 1
[http]
listen = "127.0.0.1:$HTTP_PORT"
direct_token = "$TOKEN"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token = "$ADMIN_TOKEN"
[log]
level = "info"
TOML
NO_COLOR=1 "$BIN/weir-focus" --config "$TMP/focus.toml" 2>"$TMP/focus.log" &
FOCUS=$!
PIDS+=("$FOCUS")
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null || fail "focus not healthy"

loadtest() { # name rooms duration setup-timeout
  timeout 120 "$BIN/weir-loadtest" run --direct "http://127.0.0.1:$HTTP_PORT" --direct-token "$TOKEN" \
    --focus-user "@weir-focus:direct.invalid" --focus-device WEIRFOCUS \
    --rooms "$2" --publishers 2 --subscribers 0 --duration "$3" --setup-timeout "$4" \
    --json "$TMP/$1.json" >"$TMP/loadtest-$1.log" 2>&1
}

echo "== 1. two conferences running"
loadtest running 2 15 30 &
RUNNING=$!
PIDS+=("$RUNNING")
for _ in $(seq 1 100); do
  n="$(admin GET /admin/v1/conferences 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for c in d["conferences"] for p in c["participants"] if (p.get("media") or {}).get("connected") and p["media"]["rx_kbps"] > 0 and p["media"]["tx_kbps"] > 0))' 2>/dev/null || echo 0)"
  [[ "$n" == 4 ]] && break
  sleep 0.1
done
[[ "$n" == 4 ]] || fail "1: the admin API never showed 4 connected participants with traffic both ways"
admin GET /admin/v1/conferences | python3 -c '
import json, sys
d = json.load(sys.stdin)
for c in d["conferences"]:
    for p in c["participants"]:
        m = p["media"]
        print("  conference %s: peer %s %s rx %s kbit/s tx %s kbit/s" % (c["id"], p["peer"], p["user_id"], m["rx_kbps"], m["tx_kbps"]))'
code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/admin/v1/conferences")"
[[ "$code" == 401 ]] || fail "1: the admin API answered $code without a token"
echo "PASS 1"

echo "== 2. drain: health says so, a third conference is refused"
admin POST /admin/v1/drain '{"within_s": 120}' | sed 's/^/  /'
echo
health="$(curl -s -w ' %{http_code}' "http://127.0.0.1:$HTTP_PORT/healthz")"
[[ "$health" == *"draining"*" 503" ]] || fail "2: /healthz said: $health"
loadtest refused 1 2 4 || true
python3 - "$TMP/refused.json" <<'PY' || fail "2: the third conference was not refused"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  third conference: {r['participants']} participants, joined {r['joined']}")
sys.exit(0 if r["joined"] == 0 else 1)
PY
grep -q 'draining: invite for a new conference refused' "$TMP/focus.log" || fail "2: no refusal logged"
echo "PASS 2"

echo "== 3. the two run to their end, then the focus exits by itself"
wait "$RUNNING" || fail "3: the running load test failed"
python3 - "$TMP/running.json" <<'PY' || fail "3: a participant of the running conferences was cut"
import json, sys
r = json.load(open(sys.argv[1]))
people = r["participants_detail"]
cut = [p["user_id"] for p in people if p["ended_by_focus"] or p["error"] or p["missing"]]
print(f"  {len(people)} participants, joined {r['joined']}, active {sorted(p['active_s'] for p in people)} s, cut {cut}")
sys.exit(0 if r["joined"] == len(people) == 4 and not cut and min(p["active_s"] for p in people) >= 14 else 1)
PY
for _ in $(seq 1 200); do kill -0 "$FOCUS" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$FOCUS" 2>/dev/null; then fail "3: the focus still runs 20 s after its last participant left"; fi
set +e; wait "$FOCUS"; rc=$?; set -e
[[ $rc == 0 ]] || fail "3: the focus exited with $rc"
grep -q "drained: the last participant has left" "$TMP/focus.log" || fail "3: the focus did not say it drained"
echo "PASS 3"
