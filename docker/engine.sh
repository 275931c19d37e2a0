#!/usr/bin/env bash
# A private Docker engine for building and testing weir's images on a machine whose own engine
# is absent (Debian's docker.io package provides dockerd). It creates no bridge and touches no
# firewall rules: builds and containers use the host network of whichever namespace it runs
# in, so `scripts/in-netns.sh docker/engine.sh start` keeps every container inside a test
# namespace.
#
#   docker/engine.sh start | stop | env
#
# State in /var/lib/weir-docker; socket /run/weir-docker.sock (export DOCKER_HOST as `env`
# prints).
set -euo pipefail
SOCK=/run/weir-docker.sock
PIDFILE=/run/weir-docker.pid
case "${1:-}" in
  start)
    if [[ -S "$SOCK" ]] && DOCKER_HOST="unix://$SOCK" docker info >/dev/null 2>&1; then exit 0; fi
    command -v dockerd >/dev/null || { echo "dockerd missing: apt-get install docker.io" >&2; exit 2; }
    # A pid file left by an engine that is gone would stop this one starting.
    if [[ -f "$PIDFILE" ]] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then rm -f "$PIDFILE" "$SOCK"; fi
    dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
      --data-root /var/lib/weir-docker --exec-root /run/weir-docker \
      --host "unix://$SOCK" --pidfile "$PIDFILE" >>/var/log/weir-dockerd.log 2>&1 &
    for _ in $(seq 1 100); do
      DOCKER_HOST="unix://$SOCK" docker info >/dev/null 2>&1 && exit 0
      sleep 0.2
    done
    echo "dockerd did not start; see /var/log/weir-dockerd.log" >&2
    exit 1
    ;;
  stop)
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; then
      # It stops its containers and containerd first: give it time, then make sure.
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE" "$SOCK"
    ;;
  env) echo "export DOCKER_HOST=unix://$SOCK" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 64 ;;
esac
