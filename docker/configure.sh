#!/usr/bin/env bash
# Turn docker/.env into what the stack reads: secrets (generated where empty, written back),
# Synapse's homeserver.yaml, Prometheus's scrape config, and data directories owned by each
# service's user. Safe to run again: existing secrets and data are kept; configs are rewritten.
#
#   docker/configure.sh [ENV_FILE] [--test]
#
# --test relaxes Synapse's rate limits, for load tests through the stack (never in production:
# they protect the homeserver from its users).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="$HERE/.env"
TEST=0
for a in "$@"; do
  case "$a" in
    --test) TEST=1 ;;
    *) ENV_FILE="$a" ;;
  esac
done
[[ -f "$ENV_FILE" ]] || { echo "no $ENV_FILE: cp docker/.env.example docker/.env and set its first block" >&2; exit 2; }

secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
# Fill empty secrets in the env file itself, so every later run and compose see the same ones.
for key in REGISTRATION_SHARED_SECRET FOCUS_PASSWORD ADMIN_TOKEN GRAFANA_ADMIN_PASSWORD MACAROON_SECRET FORM_SECRET; do
  if ! grep -q "^$key=." "$ENV_FILE"; then
    value="$(secret)"
    if grep -q "^$key=" "$ENV_FILE"; then
      sed -i "s|^$key=.*|$key=$value|" "$ENV_FILE"
    else
      echo "$key=$value" >> "$ENV_FILE"
    fi
  fi
done
set -a
# shellcheck disable=SC1090
source "$ENV_FILE"
set +a
for key in SERVER_NAME PUBLIC_BASEURL PUBLIC_IP SYNAPSE_PORT FOCUS_HTTP_PORT PROMETHEUS_PORT; do
  [[ -n "${!key:-}" ]] || { echo "$ENV_FILE: $key is not set" >&2; exit 2; }
done

DATA="$HERE/data"
mkdir -p "$DATA/synapse" "$DATA/focus" "$DATA/prometheus/tsdb" "$DATA/grafana"

limits=""
if [[ "$TEST" == 1 ]]; then
  hi='{per_second: 10000, burst_count: 100000}'
  limits="rc_message: $hi
rc_registration: $hi
rc_login: {address: $hi, account: $hi, failed_attempts: $hi}
rc_joins: {local: $hi, remote: $hi}
rc_joins_per_room: $hi
rc_invites: {per_room: $hi, per_user: $hi, per_issuer: $hi}
rc_key_requests: $hi
rc_room_creation: $hi"
fi

cat > "$DATA/synapse/homeserver.yaml" <<YAML
# Written by docker/configure.sh from $(basename "$ENV_FILE"); edit that and run it again.
server_name: "$SERVER_NAME"
public_baseurl: "$PUBLIC_BASEURL"
report_stats: false
listeners:
  # Behind your TLS reverse proxy (docker/README.md): client and federation on one port.
  - port: $SYNAPSE_PORT
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: true
    resources:
      - names: [client, federation]
        compress: false
# SQLite suits a small team; for more, PostgreSQL (Synapse's documentation).
database:
  name: sqlite3
  args:
    database: /data/homeserver.db
log_config: /data/log.yaml
media_store_path: /data/media_store
signing_key_path: /data/signing.key
registration_shared_secret: "$REGISTRATION_SHARED_SECRET"
macaroon_secret_key: "$MACAROON_SECRET"
form_secret: "$FORM_SECRET"
enable_registration: false
suppress_key_server_warning: true
# TURN for participants behind strict NATs: set turn_uris and turn_shared_secret to your TURN
# server's (coturn), and clients get its credentials from /voip/turnServer.
$limits
YAML
cat > "$DATA/synapse/log.yaml" <<'YAML'
version: 1
formatters:
  plain: {format: '%(asctime)s %(levelname)s %(name)s %(message)s'}
handlers:
  console: {class: logging.StreamHandler, formatter: plain}
root: {level: WARNING, handlers: [console]}
disable_existing_loggers: false
YAML
cat > "$DATA/prometheus/prometheus.yml" <<YAML
# Written by docker/configure.sh.
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: weir-focus
    static_configs:
      - targets: ['127.0.0.1:$FOCUS_HTTP_PORT']
YAML
# Each service runs as its own user: synapse 991, the focus 10001, prometheus nobody, grafana 472.
chown -R 991:991 "$DATA/synapse"
chown -R 10001:10001 "$DATA/focus"
chown -R 65534:65534 "$DATA/prometheus/tsdb"
chown -R 472:472 "$DATA/grafana"
echo "configured $DATA from $ENV_FILE"
