#!/usr/bin/env bash
# Build the golden image (images/golden/Dockerfile) with docker or podman, export its root
# filesystem, and turn it into a catalog bundle with `banger internal make-bundle` (which
# adds banger-init and banger-agent and builds the ext4). Prints the bundle's sha256 and
# size for images/images.json.
#
#   scripts/golden-bundle.sh [OUT_DIR]       (default: target/bundles)
#
# Needs: docker or podman, banger (target/release or on PATH), the guest binaries
# (scripts/build-guest.sh). Run as root so file owners are kept without debugfs.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bundles}"
name="debian-bookworm"
kernel_ref="cloud-6.1"
engine="$(command -v podman || command -v docker || true)"
[ -n "$engine" ] || { echo "needs podman or docker" >&2; exit 1; }
banger="$(command -v target/release/banger || command -v banger)"
guest="$(scripts/build-guest.sh)"
mkdir -p "$out"
"$engine" build -t banger-golden images/golden
cid="$("$engine" create banger-golden)"
trap '"$engine" rm -f "$cid" >/dev/null' EXIT
"$engine" export "$cid" > "$out/$name-rootfs.tar"
"$banger" internal make-bundle --rootfs-tar "$out/$name-rootfs.tar" --name "$name" \
    --kernel-ref "$kernel_ref" --guest-dir "$guest" --out "$out/$name-x86_64.tar.zst"
rm -f "$out/$name-rootfs.tar"
