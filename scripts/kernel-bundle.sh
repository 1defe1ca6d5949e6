#!/usr/bin/env bash
# Turn an installed Debian kernel (linux-image-cloud-amd64: /boot/vmlinuz-VER, its initrd,
# config and /lib/modules/VER) into a kernel catalog bundle. Prints its sha256 and size for
# images/kernels.json.
#
#   scripts/kernel-bundle.sh VER [NAME] [OUT_DIR]   e.g. scripts/kernel-bundle.sh 6.1.0-28-cloud-amd64 cloud-6.1
set -euo pipefail
cd "$(dirname "$0")/.."
ver="$1"; name="${2:-cloud-6.1}"; out="${3:-target/bundles}"
banger="$(command -v target/release/banger || command -v banger)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cp "/boot/vmlinuz-$ver" "$work/vmlinuz"
[ -f "/boot/initrd.img-$ver" ] && cp "/boot/initrd.img-$ver" "$work/initrd"
# The build config: `banger kernel show` reads it to say which VMMs the kernel suits.
[ -f "/boot/config-$ver" ] && cp "/boot/config-$ver" "$work/config"
mkdir -p "$work/modules" && cp -a "/lib/modules/$ver" "$work/modules/"
mkdir -p "$out"
"$banger" internal make-bundle --kernel-dir "$work" --out "$out/$name-x86_64.tar.zst"
