#!/usr/bin/env bash
# Build weir's images on a machine that reaches Debian's and PyPI's package repositories but no
# image registry (as the project's development machines): the Debian base from debootstrap
# (docker/base-image.sh), the focus from a release build on this host, Synapse and Prometheus
# from their packages on that base. Tags: weir/focus, weir/synapse, weir/prometheus.
#
#   docker/build-local.sh            (root; starts the private engine of docker/engine.sh)
#
# On a host that can pull images, none of this is needed: `docker build -f docker/Dockerfile
# -t weir/focus .` and compose.yaml's default images (docker/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
docker/engine.sh start
eval "$(docker/engine.sh env)"
export DOCKER_BUILDKIT=0 # the engine's classic builder: no buildx plugin here
docker/base-image.sh
BASE=weir/debian:bookworm-slim

cargo build --release --locked -p weir-focus
# the web app the image serves (npm packages from scripts/setup.sh)
(cd web && node build.mjs)
mkdir -p target/docker
strip -o target/docker/weir-focus target/release/weir-focus
docker build -f docker/Dockerfile --target prebuilt --build-arg RUNTIME_IMAGE="$BASE" -t weir/focus .
# A TLS-intercepting proxy's CA, if this host trusts one, for pip and apt inside the builds.
for d in docker/synapse/extra-ca docker/prometheus/extra-ca; do
  rm -f "$d"/*.crt
  cp /usr/local/share/ca-certificates/*.crt "$d"/ 2>/dev/null || true
done
docker build -f docker/synapse/Dockerfile --network host --build-arg BASE_IMAGE="$BASE" -t weir/synapse docker/synapse
docker build -f docker/prometheus/Dockerfile --network host --build-arg BASE_IMAGE="$BASE" -t weir/prometheus docker/prometheus
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^weir/'
