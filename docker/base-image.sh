#!/usr/bin/env bash
# Make the Debian base image the Dockerfiles start from, without an image registry: a minimal
# Debian bookworm root from Debian's package repository (debootstrap), imported into the local
# Docker engine as weir/debian:bookworm-slim. On a host that can pull images, skip this: the
# Dockerfiles default to debian:bookworm-slim from Docker Hub.
#
#   docker/base-image.sh [MIRROR]        (root; needs debootstrap and a running Docker engine)
#
# The root is kept in .cache/debian-bookworm (about 150 MB) so a second run only re-imports.
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR="${1:-http://deb.debian.org/debian}"
ROOT=".cache/debian-bookworm"
TAG="weir/debian:bookworm-slim"
if [[ ! -x "$ROOT/bin/sh" ]]; then
  rm -rf "$ROOT.partial"
  mkdir -p "$ROOT.partial"
  # minbase: only essential packages and apt; ca-certificates for HTTPS to homeservers.
  debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOT.partial" "$MIRROR"
  # What an image base leaves out: apt caches and logs.
  rm -rf "$ROOT.partial"/var/cache/apt/archives/*.deb "$ROOT.partial"/var/lib/apt/lists/*
  mv "$ROOT.partial" "$ROOT"
fi
tar -C "$ROOT" -c . | docker import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "imported $TAG ($(docker image inspect "$TAG" --format '{{.Size}}') bytes)"
