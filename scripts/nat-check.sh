#!/usr/bin/env bash
# A focus behind a NAT, in network namespaces this script makes (never the machine's own
# addresses; run it through scripts/in-netns.sh, which scripts/test.sh does):
#
#   outside (the namespace this runs in)          inside (a namespace of its own)
#   participants (weir-loadtest, 10.201.0.1)       weir-focus on 10.201.0.2 only
#   a STUN server (coturn, 10.201.0.1:3478)
#   the NAT: 10.202.0.5 (public) -> 10.201.0.2, and the focus's own packets leave as 10.202.0.5
#
# 1. The focus advertises its private address: `weir-focus --check-network` exits 1 and names
#    the fix (the STUN server sees 10.202.0.5).
# 2. It advertises 10.202.0.5: the check exits 0, and a load test through the NAT gets media.
# 3. advertise_ips = [] with the STUN server: the focus learns 10.202.0.5 at startup; media flows.
#
# Needs root in the namespace (ip, nft, unshare, nsenter), coturn (scripts/setup.sh installs
# it) and built binaries (cargo build -p weir-focus -p weir-loadtest; WEIR_BIN_DIR to pick
# another target dir). Prints PASS/FAIL per step; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${WEIR_IN_NETNS:-0}" != 1 ]]; then
  exec scripts/in-netns.sh "$0" "$@"
fi
BIN="${WEIR_BIN_DIR:-target/debug}"
for b in weir-focus weir-loadtest; do
  [[ -x "$BIN/$b" ]] || { echo "nat-check: $BIN/$b missing (cargo build -p weir-focus -p weir-loadtest)" >&2; exit 2; }
done
command -v turnserver >/dev/null || { echo "nat-check: coturn's turnserver missing (scripts/setup.sh)" >&2; exit 2; }

OUT_IP=10.201.0.1
IN_IP=10.201.0.2
PUBLIC_IP=10.202.0.5
MEDIA_PORT=40000
HTTP_PORT=8090
TOKEN="nat-check-$RANDOM$RANDOM"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  nft delete table ip weirnat 2>/dev/null || true
  ip link del wo 2>/dev/null || true
  [[ -n "${WEIR_KEEP_TMP:-}" ]] && echo "kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$TMP"/*.log; do [[ -f "$f" ]] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done; exit 1; }

# The inside namespace: held open by a sleeping process (bounded: the whole check takes less).
unshare --net sleep 600 &
HOLDER=$!
PIDS+=("$HOLDER")
for _ in $(seq 1 50); do [[ "$(readlink /proc/$HOLDER/ns/net)" != "$(readlink /proc/self/ns/net)" ]] && break; sleep 0.05; done
INSIDE=(nsenter --net="/proc/$HOLDER/ns/net")
ip link add wo type veth peer name wi netns "$HOLDER"
ip addr add "$OUT_IP/24" dev wo
ip link set wo up
"${INSIDE[@]}" ip link set lo up
"${INSIDE[@]}" ip addr add "$IN_IP/24" dev wi
"${INSIDE[@]}" ip link set wi up
"${INSIDE[@]}" ip route add default via "$OUT_IP"
ip route add "$PUBLIC_IP/32" dev wo
sysctl -qw net.ipv4.ip_forward=1

# The NAT: what is sent to the public address goes to the focus (from participants here, and
# hairpinned from the focus itself); what the focus starts leaves as the public address.
nft -f - <<NFT
table ip weirnat {
  chain out { type nat hook output priority -100; ip daddr $PUBLIC_IP dnat to $IN_IP; }
  chain pre { type nat hook prerouting priority -100; ip daddr $PUBLIC_IP dnat to $IN_IP; }
  chain in { type nat hook input priority 100; ip saddr $IN_IP snat to $PUBLIC_IP; }
  chain post { type nat hook postrouting priority 100; ip saddr $IN_IP snat to $PUBLIC_IP; }
}
NFT

turnserver --stun-only --listening-ip "$OUT_IP" --listening-port 3478 --no-cli --no-tls --no-dtls \
  --log-file stdout --simple-log --no-stdout-log 2>/dev/null >"$TMP/coturn.log" &
PIDS+=("$!")
for _ in $(seq 1 100); do ss -uln | grep -q "$OUT_IP:3478" && break; sleep 0.05; done
ss -uln | grep -q "$OUT_IP:3478" || fail "coturn did not start"

config() { # advertise-list
  cat > "$TMP/focus.toml" <<TOML
[matrix]
enabled = false
device_id = "WEIRFOCUS"
[media]
shards = 1
bind_ip = "$IN_IP"
port_base = $MEDIA_PORT
advertise_ips = [$1]
stun_server = "$OUT_IP:3478"
[http]
listen = "$IN_IP:$HTTP_PORT"
direct_token = "$TOKEN"
[log]
level = "info"
TOML
}

media_flows() { # step name
  NO_COLOR=1 "${INSIDE[@]}" "$BIN/weir-focus" --config "$TMP/focus.toml" 2>"$TMP/focus-$1.log" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do
    curl -fs "http://$PUBLIC_IP:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "$1: the focus exited"
    sleep 0.1
  done
  curl -fs "http://$PUBLIC_IP:$HTTP_PORT/healthz" >/dev/null || fail "$1: focus not healthy through the NAT"
  timeout 120 "$BIN/weir-loadtest" run --direct "http://$PUBLIC_IP:$HTTP_PORT" --direct-token "$TOKEN" \
    --focus-user "@weir-focus:direct.invalid" --focus-device WEIRFOCUS --local-ip "$OUT_IP" \
    --publishers 2 --subscribers 1 --duration 5 --setup-timeout 30 --json "$TMP/$1.json" \
    >"$TMP/loadtest-$1.log" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$TMP/$1.json" <<'PY' || fail "$1: media did not flow through the NAT"
import json, sys
r = json.load(open(sys.argv[1]))
people = r["participants_detail"]
ok = all(p["error"] is None and not p["missing"] and p["received_video"] for p in people)
print(f"  {len(people)} participants, joined {r['joined']}, loss {r['loss_pct']:.2f} %, "
      f"received video from {[p['received_video'] for p in people]}")
sys.exit(0 if ok and r["joined"] == len(people) else 1)
PY
}

echo "== 1. advertising the private address: the self-check names the problem"
config "\"$IN_IP\""
set +e
"${INSIDE[@]}" "$BIN/weir-focus" --config "$TMP/focus.toml" --check-network >"$TMP/check1.out" 2>"$TMP/check1.log"
rc=$?
set -e
sed 's/^/  /' "$TMP/check1.out"
[[ $rc == 1 ]] || fail "1: --check-network exited $rc, not 1"
grep -q "^PROBLEM .*sees this focus's packets come from $PUBLIC_IP.*advertise_ips = \[\"$PUBLIC_IP\"\]" "$TMP/check1.out" \
  || fail "1: the check did not name $PUBLIC_IP as the fix"
echo "PASS 1"

echo "== 2. advertising the public address: the check passes and media flows"
config "\"$PUBLIC_IP\""
set +e
"${INSIDE[@]}" "$BIN/weir-focus" --config "$TMP/focus.toml" --check-network >"$TMP/check2.out" 2>"$TMP/check2.log"
rc=$?
set -e
sed 's/^/  /' "$TMP/check2.out"
[[ $rc == 0 ]] || fail "2: --check-network exited $rc"
grep -q "^ok .*UDP to $PUBLIC_IP:$MEDIA_PORT reaches the media socket" "$TMP/check2.out" || fail "2: the public address did not reach the socket"
media_flows public
echo "PASS 2"

echo "== 3. no advertised address: the focus asks the STUN server at startup"
config ""
media_flows discovered
grep -q "public address from the STUN server: advertised address=$PUBLIC_IP" "$TMP/focus-discovered.log" \
  || fail "3: the focus did not log the discovered address"
echo "PASS 3"
