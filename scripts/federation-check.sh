#!/usr/bin/env bash
# Prove that scripts/synapse.sh start-fed servers federate over loopback, with no internet.
#
#   scripts/in-netns.sh scripts/federation-check.sh
#
# Starts two Synapse servers (three with FED_CHECK_SERVERS=3) in temp dirs: server i has its client
# API on 127.0.0.1:(18008+i) and federation on 127.0.0.1:(18448+i), server_name localhost:(18448+i).
# Registers @alice on the first and @bob (and @carol) on the others through the shared-secret admin
# API. alice creates a room and invites the others; each joins over federation; alice sends a state
# event each must see in /sync; alice sends a to-device message to each remote device, which must
# arrive in that user's /sync to_device. Prints how long the federated steps took. Every wait is
# bounded; the servers are stopped on exit; the exit status is non-zero on any failure.
#
# Environment: FED_CHECK_SERVERS (2 or 3, default 2), FED_CHECK_CLIENT_PORT (default 18008),
# FED_CHECK_FED_PORT (default 18448), FED_CHECK_TIMEOUT (seconds per wait, default 60),
# FED_CHECK_KEEP=1 keeps the temp dirs (logs) after the run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${SYNAPSE_PYTHON:-$REPO/.venv/synapse/bin/python}"
N="${FED_CHECK_SERVERS:-2}"
CLIENT_PORT="${FED_CHECK_CLIENT_PORT:-18008}"
FED_PORT="${FED_CHECK_FED_PORT:-18448}"
export FED_CHECK_TIMEOUT="${FED_CHECK_TIMEOUT:-60}"
# A first start creates the sqlite schema, which is slow on a busy machine.
export SYNAPSE_START_TIMEOUT="${SYNAPSE_START_TIMEOUT:-180}"
[[ "$N" == 2 || "$N" == 3 ]] || { echo "federation-check: FED_CHECK_SERVERS must be 2 or 3" >&2; exit 64; }
[[ -x "$PY" ]] || { echo "federation-check: no Synapse interpreter at $PY (run scripts/setup.sh)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/weir-fed-check.XXXXXX")"
dirs=()
cleanup() {
  local rc=$?
  for d in "${dirs[@]}"; do "$REPO/scripts/synapse.sh" stop "$d" >/dev/null || true; done
  if [[ "${FED_CHECK_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
    echo "federation-check: logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=()
for ((i = 0; i < N; i++)); do
  d="$WORK/hs$i"
  dirs+=("$d")
  t0=$SECONDS
  "$REPO/scripts/synapse.sh" start-fed "$d" $((CLIENT_PORT + i)) $((FED_PORT + i))
  echo "federation-check: server $i up in $((SECONDS - t0))s"
  args+=("$d" $((CLIENT_PORT + i)) $((FED_PORT + i)))
done

"$PY" - "${args[@]}" <<'PYEOF'
import hashlib, hmac, json, os, sys, time, uuid
import urllib.error, urllib.parse, urllib.request

TIMEOUT = float(os.environ["FED_CHECK_TIMEOUT"])
argv = sys.argv[1:]
servers = [dict(dir=argv[i], port=int(argv[i + 1]), name=f"localhost:{argv[i + 2]}")
           for i in range(0, len(argv), 3)]


class Fail(Exception):
    pass


def api(srv, method, path, body=None, token=None, timeout=30):
    url = f"http://127.0.0.1:{srv['port']}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise Fail(f"{method} {url} -> HTTP {e.code}: {e.read()[:500]!r}") from None


def register(srv, localpart):
    secret = open(os.path.join(srv["dir"], "shared_secret")).read().strip()
    nonce = api(srv, "GET", "/_synapse/admin/v1/register")["nonce"]
    password = uuid.uuid4().hex
    mac = hmac.new(secret.encode(), f"{nonce}\0{localpart}\0{password}\0notadmin".encode(),
                   hashlib.sha1).hexdigest()
    r = api(srv, "POST", "/_synapse/admin/v1/register",
            dict(nonce=nonce, username=localpart, password=password, admin=False, mac=mac))
    return dict(srv=srv, user_id=r["user_id"], token=r["access_token"], device_id=r["device_id"])


def sync_until(user, what, pred):
    """Long-poll /sync from the user's last position until pred(response) is truthy; bounded."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Fail(f"{user['user_id']}: no {what} within {TIMEOUT:.0f}s")
        q = {"timeout": str(int(min(left, 10) * 1000))}
        if user.get("since"):
            q["since"] = user["since"]
        r = api(user["srv"], "GET", "/_matrix/client/v3/sync?" + urllib.parse.urlencode(q),
                token=user["token"], timeout=min(left, 10) + 15)
        user["since"] = r["next_batch"]
        hit = pred(r)
        if hit:
            return hit


def q(s):
    return urllib.parse.quote(s, safe="")


def main():
    users = [register(servers[0], "alice")]
    for srv, name in zip(servers[1:], ["bob", "carol"]):
        users.append(register(srv, name))
    alice, remotes = users[0], users[1:]
    for u in users:
        print(f"registered {u['user_id']} device {u['device_id']}")
        sync_until(u, "initial sync", lambda r: True)

    room = api(servers[0], "POST", "/_matrix/client/v3/createRoom",
               dict(preset="private_chat", name="weir federation check"), token=alice["token"])["room_id"]
    print(f"alice created {room}")

    for u in remotes:
        t0 = time.monotonic()
        api(servers[0], "POST", f"/_matrix/client/v3/rooms/{q(room)}/invite",
            dict(user_id=u["user_id"]), token=alice["token"])
        t_invite_sent = time.monotonic()
        sync_until(u, "invite", lambda r: room in r.get("rooms", {}).get("invite", {}))
        t_invited = time.monotonic()
        api(u["srv"], "POST", f"/_matrix/client/v3/join/{q(room)}", {}, token=u["token"])
        t_joined = time.monotonic()

        def alice_sees_join(r):
            tl = r.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {}).get("events", [])
            return any(e.get("type") == "m.room.member" and e.get("state_key") == u["user_id"]
                       and e.get("content", {}).get("membership") == "join" for e in tl)
        sync_until(alice, f"join of {u['user_id']}", alice_sees_join)
        t_seen = time.monotonic()
        print(f"{u['user_id']}: invite over federation {1000 * (t_invited - t0):.0f} ms "
              f"(invite API {1000 * (t_invite_sent - t0):.0f} ms); "
              f"federated join API {1000 * (t_joined - t_invited):.0f} ms; "
              f"alice saw the join {1000 * (t_seen - t_joined):.0f} ms later")

    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    api(servers[0], "PUT", f"/_matrix/client/v3/rooms/{q(room)}/state/org.weir.fedcheck/{q(alice['user_id'])}",
        dict(marker=marker), token=alice["token"])
    for u in remotes:
        def sees_state(r):
            j = r.get("rooms", {}).get("join", {}).get(room, {})
            evs = j.get("timeline", {}).get("events", []) + j.get("state", {}).get("events", [])
            return any(e.get("type") == "org.weir.fedcheck" and e.get("content", {}).get("marker") == marker
                       for e in evs)
        sync_until(u, "alice's state event", sees_state)
        print(f"{u['user_id']}: saw alice's state event {1000 * (time.monotonic() - t0):.0f} ms after it was sent")

    for u in remotes:
        marker = uuid.uuid4().hex
        t0 = time.monotonic()
        api(servers[0], "PUT", f"/_matrix/client/v3/sendToDevice/org.weir.fedcheck/{uuid.uuid4().hex}",
            dict(messages={u["user_id"]: {u["device_id"]: dict(marker=marker)}}), token=alice["token"])
        t_sent = time.monotonic()

        def got(r):
            return any(e.get("type") == "org.weir.fedcheck" and e.get("sender") == alice["user_id"]
                       and e.get("content", {}).get("marker") == marker
                       for e in r.get("to_device", {}).get("events", []))
        sync_until(u, "to-device message", got)
        print(f"{u['user_id']}: to-device from alice delivered in {1000 * (time.monotonic() - t0):.0f} ms "
              f"(sendToDevice API {1000 * (t_sent - t0):.0f} ms)")
    print(f"federation-check: OK ({len(servers)} servers)")


try:
    main()
except (Fail, OSError) as e:
    print(f"federation-check: FAILED: {e}", file=sys.stderr)
    for s in servers:
        print(f"--- last lines of {s['dir']}/homeserver.log ({s['name']})", file=sys.stderr)
        try:
            with open(os.path.join(s["dir"], "homeserver.log")) as f:
                sys.stderr.writelines(f.readlines()[-25:])
        except OSError:
            pass
    sys.exit(1)
PYEOF
