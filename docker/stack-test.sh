#!/usr/bin/env bash
# The compose stack, brought up for real and put under load (issue 10): Synapse, the focus and
# Prometheus from docker/compose.yaml, with the images docker/build-local.sh made, inside a
# network namespace of its own (the private engine runs there too, so every container's host
# network is that namespace's loopback). weir-loadtest participants register on the stack's
# Synapse and call the focus through it; the check is that all of them join and receive media,
# that Prometheus scraped the focus, that the admin API lists the conference, and that the
# focus container reports healthy. Grafana is left out here: its image cannot be built without
# a registry (docker/README.md).
#
#   docker/build-local.sh && docker/stack-test.sh      (root; a few minutes; not part of CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${WEIR_IN_NETNS:-0}" != 1 ]]; then
  docker/engine.sh stop # an engine in this namespace would put the containers here
  exec scripts/in-netns.sh "$0" "$@"
fi
BIN="${WEIR_BIN_DIR:-target/release}"
[[ -x "$BIN/weir-loadtest" ]] || { echo "stack-test: $BIN/weir-loadtest missing (docker/build-local.sh builds it)" >&2; exit 2; }
command -v docker-compose >/dev/null || { echo "stack-test: docker-compose missing (apt-get install docker-compose)" >&2; exit 2; }

TMP="$(mktemp -d)"
STACK="$TMP/docker"
mkdir -p "$STACK"
cp -r docker/compose.yaml docker/configure.sh docker/grafana "$STACK"/
compose() { docker-compose -p weirtest -f "$STACK/compose.yaml" --env-file "$STACK/.env" "$@"; }
cleanup() {
  compose logs --no-color >"$TMP/compose.log" 2>&1 || true
  compose down -v >/dev/null 2>&1 || true
  docker/engine.sh stop || true
  [[ -n "${WEIR_KEEP_TMP:-}" ]] && echo "kept $TMP" || rm -rf "$TMP"
}
fail() { echo "FAIL: $*" >&2; compose logs --no-color --tail 30 >&2 || true; exit 1; }

docker/engine.sh start
eval "$(docker/engine.sh env)"
trap cleanup EXIT

cat > "$STACK/.env" <<ENV
SERVER_NAME=localhost
PUBLIC_BASEURL=http://127.0.0.1:8008/
PUBLIC_IP=127.0.0.1
REGISTRATION_SHARED_SECRET=
FOCUS_PASSWORD=
ADMIN_TOKEN=
GRAFANA_ADMIN_PASSWORD=
SYNAPSE_PORT=8008
FOCUS_HTTP_PORT=9090
FOCUS_ADMIN_PORT=9091
MEDIA_PORT_BASE=40000
SHARDS=2
MEDIA_TCP_PORT=3479
PROMETHEUS_PORT=9099
GRAFANA_PORT=3000
FOCUS_IMAGE=weir/focus:latest
SYNAPSE_IMAGE=weir/synapse:latest
PROMETHEUS_IMAGE=weir/prometheus:latest
GRAFANA_IMAGE=grafana/grafana-oss:11.6.0
ENV
"$STACK/configure.sh" "$STACK/.env" --test
set -a; source "$STACK/.env"; set +a

echo "== synapse and prometheus"
compose up -d synapse prometheus
for _ in $(seq 1 120); do curl -fs http://127.0.0.1:8008/health >/dev/null 2>&1 && break; sleep 0.5; done
curl -fs http://127.0.0.1:8008/health >/dev/null || fail "synapse did not come up"
printf '%s' "$REGISTRATION_SHARED_SECRET" > "$TMP/secret"
# The focus's account, as docker/README.md tells an operator to make it.
compose exec -T synapse register_new_matrix_user -c /data/homeserver.yaml -u focus \
  -p "$FOCUS_PASSWORD" --no-admin http://127.0.0.1:8008 >"$TMP/register.log" 2>&1 \
  || { cat "$TMP/register.log"; fail "register_new_matrix_user failed"; }

echo "== the network check, as docker/README.md runs it before the focus starts"
compose run --rm focus --check-network | sed 's/^/  /' || fail "--check-network found a problem"

echo "== the focus"
compose up -d focus
for _ in $(seq 1 120); do curl -fs http://127.0.0.1:9090/healthz >/dev/null 2>&1 && break; sleep 0.5; done
curl -fs http://127.0.0.1:9090/healthz >/dev/null || fail "the focus did not become healthy"
for _ in $(seq 1 60); do
  state="$(docker inspect --format '{{.State.Health.Status}}' weirtest_focus_1 2>/dev/null || echo none)"
  [[ "$state" == healthy ]] && break
  sleep 1
done
echo "  focus container: $state"
[[ "$state" == healthy ]] || fail "the focus container's health check says $state"

echo "== the web app, served by the focus from the image"
curl -fs http://127.0.0.1:9090/ | grep -q '<script type="module" src="app.js">' || fail "the focus does not serve the app's page"
curl -fs http://127.0.0.1:9090/config.json | grep -q '"focus"' || fail "the focus does not serve config.json"
wasm_type="$(curl -fsI http://127.0.0.1:9090/pkg/matrix_sdk_crypto_wasm_bg.wasm | tr -d '\r' | awk -F': ' 'tolower($1)=="content-type"{print $2}')"
[[ "$wasm_type" == application/wasm ]] || fail "the crypto module is served as '$wasm_type'"
echo "  page, config.json and the crypto module: ok"

echo "== load: weir-loadtest through the stack's Synapse"
timeout 180 "$BIN/weir-loadtest" run --homeserver http://127.0.0.1:8008 --registration-secret-file "$TMP/secret" \
  --focus-user @focus:localhost --focus-device WEIRFOCUS --focus-metrics http://127.0.0.1:9090/metrics \
  --rooms 2 --publishers 3 --subscribers 2 --duration 20 --setup-timeout 60 --json "$TMP/load.json" \
  >"$TMP/load.log" 2>&1 &
LOAD=$!
# While it runs: the admin API sees the conferences.
for _ in $(seq 1 120); do
  n="$(curl -fs -H "Authorization: Bearer $ADMIN_TOKEN" http://127.0.0.1:9091/admin/v1/conferences 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(len(c["participants"]) for c in json.load(sys.stdin)["conferences"]))' 2>/dev/null || echo 0)"
  [[ "$n" == 10 ]] && break
  sleep 0.5
done
echo "  admin API: $n participants listed"
[[ "$n" == 10 ]] || fail "the admin API did not list the 10 participants"
wait "$LOAD" || { tail -30 "$TMP/load.log"; fail "the load test failed"; }
tail -25 "$TMP/load.log" | sed 's/^/  /'
python3 - "$TMP/load.json" <<'PY' || fail "not every participant joined and received media"
import json, sys
r = json.load(open(sys.argv[1]))
people = r["participants_detail"]
bad = [p["user_id"] for p in people if p["error"] or p["missing"] or not p["received_video"]]
print(f"  {len(people)} participants, joined {r['joined']}, loss {r['loss_pct']:.2f} %, "
      f"rx {r['rx_mbps_total']:.1f} Mbit/s, freezes {r['freezes']}, without media: {bad}")
sys.exit(0 if r["joined"] == len(people) == 10 and not bad else 1)
PY

echo "== prometheus scraped the focus"
q="$(curl -fs 'http://127.0.0.1:9099/api/v1/query?query=max_over_time(weir_participants%5B5m%5D)')"
echo "  max weir_participants over the run: $(python3 -c 'import json,sys; r=json.loads(sys.argv[1])["data"]["result"]; print(r[0]["value"][1] if r else "none")' "$q")"
python3 -c 'import json,sys; r=json.loads(sys.argv[1])["data"]["result"]; sys.exit(0 if r and float(r[0]["value"][1]) == 10 else 1)' "$q" \
  || fail "prometheus has no weir_participants of 10"
echo "== every query of the Grafana dashboard runs on the stack's Prometheus"
python3 - docker/grafana/dashboards/weir.json <<'PY' || fail "a dashboard query failed"
import json, sys, urllib.parse, urllib.request
panels = json.load(open(sys.argv[1]))["panels"]
# Metrics this load test must have produced (the rest may rightly be empty: no trunks here).
must = {"weir_participants", "rate(weir_bytes_out_total[1m]) * 8", "rate(weir_rtp_packets_forwarded_total[1m])"}
bad = []
for p in panels:
    for t in p["targets"]:
        url = "http://127.0.0.1:9099/api/v1/query?" + urllib.parse.urlencode({"query": t["expr"]})
        r = json.load(urllib.request.urlopen(url))
        if r["status"] != "success" or (t["expr"] in must and not r["data"]["result"]):
            bad.append((p["title"], t["expr"], r.get("error") or "empty"))
print(f"  {sum(len(p['targets']) for p in panels)} queries in {len(panels)} panels; failed: {bad}")
sys.exit(1 if bad else 0)
PY
echo "PASS: the stack ran a real call under load"
