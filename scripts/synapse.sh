#!/usr/bin/env bash
# Run a throw-away Synapse for tests and the demo.
#
#   scripts/synapse.sh start DIR PORT                          generate config in DIR (if needed),
#                                                              start, wait for /health
#   scripts/synapse.sh start-fed DIR CLIENT_PORT FED_PORT      the same, but a server that federates
#   scripts/synapse.sh stop DIR                                SIGTERM the server started from DIR
#                                                              and wait for it to exit (either mode)
#
# `start`: server_name "localhost", client API only on 127.0.0.1:PORT (no TLS, no federation
# listener), sqlite in DIR, registration only through the shared-secret admin API (the secret is
# written to DIR/shared_secret), rate limits effectively off, presence off, no outbound traffic
# (no trusted key servers, no stats). Logs: DIR/homeserver.log (Synapse's own log) and DIR/stdout.log.
#
# `start-fed`: everything as above, except server_name is "localhost:FED_PORT" and a second
# listener serves the federation (and key) API over TLS on 127.0.0.1:FED_PORT, with a self-signed
# certificate generated once into DIR/tls.crt + DIR/tls.key. Two or three such servers on different
# ports federate with each other over loopback with no DNS and no internet: a server name with an
# explicit port skips .well-known and SRV, "localhost" resolves through /etc/hosts, certificates
# are not verified, and loopback is allowed as an outbound destination. User IDs look like
# @alice:localhost:18448. Use a fresh DIR per mode: the database is tied to the server_name
# (DIR/server_name records it; starting DIR under another name is refused).
#
# Environment: SYNAPSE_PYTHON overrides the interpreter (default: REPO/.venv/synapse/bin/python);
# SYNAPSE_START_TIMEOUT (seconds, default 60) bounds the wait for /health.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${SYNAPSE_PYTHON:-$REPO/.venv/synapse/bin/python}"

die() { echo "synapse.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 start DIR PORT | start-fed DIR CLIENT_PORT FED_PORT | stop DIR"; }

# Generate 32 random bytes as hex without depending on anything but coreutils.
rand_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# One HTTP GET over bash's /dev/tcp; prints the status line. No curl needed.
http_status() { # port path
  local port="$1" path="$2" line=""
  { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
  IFS= read -r -t 2 line <&3 || true
  exec 3<&- 3>&-
  printf '%s' "$line"
}

# True when something accepts TCP connections on 127.0.0.1:PORT (whatever the protocol).
port_open() { # port
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  exec 3<&- 3>&-
}

alive() { [[ -f "$1/pid" ]] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

# A self-signed certificate for the federation listener, made once per DIR. Nobody verifies it
# (federation_verify_certificates: false); Synapse only needs some certificate to serve TLS, and
# federation is always HTTPS. openssl if present, else the `cryptography` module in Synapse's venv.
make_tls_cert() { # dir
  local dir="$1"
  [[ -s "$dir/tls.crt" && -s "$dir/tls.key" ]] && return 0
  rm -f "$dir/tls.crt.tmp" "$dir/tls.key.tmp"
  if command -v openssl >/dev/null; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=localhost" \
      -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -keyout "$dir/tls.key.tmp" -out "$dir/tls.crt.tmp" >/dev/null 2>&1 \
      || die "openssl could not make a self-signed certificate in $dir"
  else
    "$PY" - "$dir/tls.crt.tmp" "$dir/tls.key.tmp" <<'PYEOF' || die "could not make a self-signed certificate in $dir"
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256()))
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
PYEOF
  fi
  chmod 600 "$dir/tls.key.tmp"
  mv "$dir/tls.key.tmp" "$dir/tls.key"
  mv "$dir/tls.crt.tmp" "$dir/tls.crt"
}

write_config() { # dir port [fed_port]  (fed_port given: start-fed mode)
  local dir="$1" port="$2" fed_port="${3:-}"
  # The signing key's file name follows the server name in `start` mode as it always has; in
  # start-fed mode the name contains the port, so it gets a neutral name.
  local server_name="localhost" key_file="$dir/localhost.signing.key"
  if [[ -n "$fed_port" ]]; then
    server_name="localhost:$fed_port" key_file="$dir/signing.key"
  fi
  if [[ -s "$dir/server_name" && "$(cat "$dir/server_name")" != "$server_name" ]]; then
    die "$dir was set up for server_name '$(cat "$dir/server_name")', not '$server_name'; use a fresh DIR"
  fi
  printf '%s\n' "$server_name" >"$dir/server_name"
  mkdir -p "$dir/media_store"
  [[ -s "$dir/shared_secret" ]] || { rand_hex >"$dir/shared_secret"; chmod 600 "$dir/shared_secret"; }
  [[ -s "$dir/macaroon_secret" ]] || { rand_hex >"$dir/macaroon_secret"; chmod 600 "$dir/macaroon_secret"; }
  [[ -s "$dir/form_secret" ]] || { rand_hex >"$dir/form_secret"; chmod 600 "$dir/form_secret"; }
  if [[ ! -s "$key_file" ]]; then
    # Synapse's format: "ed25519 <version> <unpadded base64 of the 32-byte seed>".
    printf 'ed25519 a_%s %s\n' "$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')" \
      "$(head -c 32 /dev/urandom | base64 -w0 | tr -d '=')" >"$key_file"
    chmod 600 "$key_file"
  fi
  [[ -z "$fed_port" ]] || make_tls_cert "$dir"

  cat >"$dir/log.yaml" <<EOF
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
    request: ""
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $dir/homeserver.log
    filters: [context]
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
  synapse.access.http:
    level: INFO
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
EOF

  # `start`: no federation at all; an empty whitelist makes Synapse refuse every remote server.
  local fed_listener="" fed_settings="federation_domain_whitelist: []"
  if [[ -n "$fed_port" ]]; then
    # Federation is HTTPS only (no plain-HTTP federation in the spec or in Synapse's client), so
    # this listener is TLS. "federation" also serves /_matrix/key/v2/server, which the other
    # servers fetch our signing key from (there are no trusted key servers).
    fed_listener="
  - port: $fed_port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [federation]
        compress: false"
    # No federation_domain_whitelist: absent means "any server" (an empty list means none).
    fed_settings="tls_certificate_path: $dir/tls.crt
tls_private_key_path: $dir/tls.key
# The peers' certificates are self-signed (see make_tls_cert).
federation_verify_certificates: false
# Synapse's default ip_range_blacklist includes 127.0.0.0/8 and ::1 (against SSRF), which would
# refuse every outbound federation request to a peer on loopback; the whitelist wins over it.
ip_range_whitelist: ['127.0.0.0/8', '::1/128']
federation:
  # After a failed connection Synapse backs off a destination for destination_min_retry_interval
  # (default 10 minutes, growing x2 up to 7 days), so a peer that was still starting when we first
  # tried would stay unreachable for the rest of a test. Back off 0.5 s, x2, at most 5 s instead.
  # (Queued PDUs/EDUs for a backed-off peer are also re-sent by a once-a-minute catch-up loop,
  # or as soon as anything new is sent to it.)
  destination_min_retry_interval: 500
  destination_retry_multiplier: 2
  destination_max_retry_interval: 5s
  # Within one request, retries wait 4^n s up to max_long_retry_delay (default 60 s) for
  # transactions and 0.5*2^n s up to max_short_retry_delay (2 s) for others; keep both short.
  max_long_retry_delay: 1s
  max_short_retry_delay: 1s"
  fi

  # Application services (the focus as one: WEIR_SYNAPSE_APPSERVICES=reg1.yaml,reg2.yaml), with
  # to-device messages pushed to them (MSC2409/MSC4203, still experimental in Synapse).
  local as_settings=""
  if [[ -n "${WEIR_SYNAPSE_APPSERVICES:-}" ]]; then
    local files="" f
    IFS=',' read -ra regs <<<"$WEIR_SYNAPSE_APPSERVICES"
    for f in "${regs[@]}"; do
      [[ -f "$f" ]] || die "appservice registration $f not found"
      files+="${files:+, }'$f'"
    done
    as_settings="app_service_config_files: [$files]
experimental_features:
  msc2409_to_device_messages_enabled: true"
  fi

  # A high per-second rate and burst for every limiter Synapse has: tests register, join and send
  # to-device bursts much faster than a human would.
  local hi='{per_second: 10000, burst_count: 100000}'
  cat >"$dir/homeserver.yaml" <<EOF
# Generated by scripts/synapse.sh; rewritten on every start.
server_name: "$server_name"
public_baseurl: "http://127.0.0.1:$port/"
pid_file: $dir/synapse.pid
report_stats: false
listeners:
  - port: $port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false$fed_listener
database:
  name: sqlite3
  args:
    database: $dir/homeserver.db
log_config: $dir/log.yaml
media_store_path: $dir/media_store
signing_key_path: $key_file
registration_shared_secret_path: $dir/shared_secret
macaroon_secret_key: "$(cat "$dir/macaroon_secret")"
form_secret: "$(cat "$dir/form_secret")"
enable_registration: false
trusted_key_servers: []
suppress_key_server_warning: true
$fed_settings
$as_settings
presence:
  enabled: false
enable_metrics: false
url_preview_enabled: false
user_directory:
  enabled: false
include_profile_data_on_invite: false
require_auth_for_profile_requests: false
limit_profile_requests_to_users_who_share_rooms: false
rc_message: $hi
rc_registration: $hi
rc_registration_token_validity: $hi
rc_login:
  address: $hi
  account: $hi
  failed_attempts: $hi
rc_admin_redaction: $hi
rc_joins:
  local: $hi
  remote: $hi
rc_joins_per_room: $hi
rc_3pid_validation: $hi
rc_invites:
  per_room: $hi
  per_user: $hi
  per_issuer: $hi
rc_third_party_invite: $hi
rc_key_requests: $hi
rc_media_create: $hi
rc_presence:
  per_user: $hi
rc_delayed_event_mgmt: $hi
rc_room_creation: $hi
rc_reports: $hi
rc_profile: $hi
rc_user_directory: $hi
rc_federation:
  window_size: 1000
  sleep_limit: 10000
  sleep_delay: 1
  reject_limit: 100000
  concurrent: 1000
EOF
}

start() { # dir port [fed_port]
  local dir="$1" port="$2" fed_port="${3:-}"
  [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  [[ -z "$fed_port" || "$fed_port" =~ ^[0-9]+$ ]] || die "FED_PORT must be a number, got '$fed_port'"
  [[ "$fed_port" != "$port" ]] || die "CLIENT_PORT and FED_PORT must differ"
  [[ -x "$PY" ]] || die "no Synapse interpreter at $PY (run scripts/setup.sh, or set SYNAPSE_PYTHON)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if alive "$dir"; then
    echo "synapse.sh: already running from $dir (pid $(cat "$dir/pid"))"
  else
    if http_status "$port" /health >/dev/null; then
      die "something already listens on 127.0.0.1:$port"
    fi
    if [[ -n "$fed_port" ]] && port_open "$fed_port"; then
      die "something already listens on 127.0.0.1:$fed_port"
    fi
    write_config "$dir" "$port" "$fed_port"
    echo "synapse.sh: starting Synapse in $dir on 127.0.0.1:$port${fed_port:+ (federation: TLS on 127.0.0.1:$fed_port, server_name localhost:$fed_port)}"
    # setsid: own process group, so a Ctrl-C meant for the caller does not kill it half-way, and
    # stop() is the one way it ends.
    setsid "$PY" -m synapse.app.homeserver --config-path "$dir/homeserver.yaml" \
      >"$dir/stdout.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
  fi

  local timeout="${SYNAPSE_START_TIMEOUT:-60}"
  local deadline=$((SECONDS + timeout)) status=""
  while :; do
    status="$(http_status "$port" /health || true)"
    # Synapse opens all its listeners together; checking the federation port too costs nothing.
    [[ "$status" == *" 200"* ]] && { [[ -z "$fed_port" ]] || port_open "$fed_port"; } && break
    if ! alive "$dir"; then
      echo "synapse.sh: Synapse exited during startup; last lines of $dir/stdout.log and homeserver.log:" >&2
      tail -n 30 "$dir/stdout.log" "$dir/homeserver.log" >&2 2>/dev/null || true
      rm -f "$dir/pid"
      exit 1
    fi
    if (( SECONDS >= deadline )); then
      echo "synapse.sh: /health did not answer 200 within ${timeout}s (last: '${status:-no connection}')" >&2
      tail -n 30 "$dir/homeserver.log" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.1
  done
  echo "synapse.sh: ready at http://127.0.0.1:$port (pid $(cat "$dir/pid"), shared secret in $dir/shared_secret)"
}

stop() { # dir
  local dir="$1"
  [[ -f "$dir/pid" ]] || { echo "synapse.sh: no pid file in $dir, nothing to stop"; return 0; }
  local pid; pid="$(cat "$dir/pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
      if (( SECONDS >= deadline )); then
        echo "synapse.sh: pid $pid ignored SIGTERM for 20s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
    echo "synapse.sh: stopped pid $pid"
  else
    echo "synapse.sh: pid $pid was not running"
  fi
  rm -f "$dir/pid"
}

case "${1:-}" in
  start) [[ $# -eq 3 ]] || usage; start "$2" "$3" ;;
  start-fed) [[ $# -eq 4 ]] || usage; start "$2" "$3" "$4" ;;
  stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
  *) usage ;;
esac
