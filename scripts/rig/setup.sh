#!/usr/bin/env bash
# Install and cache what the test suite needs to boot real guests (QEMU microvm under TCG,
# a Debian cloud kernel, a Debian rootfs, hybrid vsock). See scripts/rig/README.md.
#
# Idempotent: when everything is present it prints nothing but the summary and takes a
# few seconds. Every cached artefact is built in a temp dir and renamed into place, with a
# stamp written last, so an interrupted run never leaves a cache that looks complete.
#
# Env: BANGER_RIG_DIR (default /var/cache/banger-rig), BANGER_RIG_QUIET=1 (no summary).
set -euo pipefail

# Bump when the recipe below changes: the kernel and rootfs caches are rebuilt.
RIG_VERSION=1
RIG=${BANGER_RIG_DIR:-/var/cache/banger-rig}
MIRROR=http://deb.debian.org/debian
SUITE=bookworm
ROOTFS_SIZE=1G
# Small on purpose: ip (banger-init configures the address; CONFIG_IP_PNP is off),
# modprobe (virtio_net, vsock and overlay are modules), sshd (`banger vm run` drops into
# ssh), CA roots (https from the guest), ping (network tests), ps/kill (debugging and exec
# tests), socat (an AF_VSOCK listener/client inside the guest before banger-agent exists).
ROOTFS_INCLUDE=iproute2,kmod,openssh-server,ca-certificates,iputils-ping,procps,socat

HOST_PACKAGES=(linux-image-cloud-amd64 debootstrap e2fsprogs iproute2 nftables
               busybox-static tmux openssh-client dnsutils)

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "scripts/rig/setup.sh needs root (apt-get, debootstrap, $RIG)" >&2
    exit 1
fi

mkdir -p "$RIG"
# One setup at a time (parallel test runs may all call it).
exec 9>"$RIG/.lock"
flock 9

LOG=$(mktemp /tmp/banger-rig-setup.XXXXXX.log)
STEP_T0=0
step() { echo "== $*"; STEP_T0=$SECONDS; }
done_step() { echo "   done in $((SECONDS - STEP_T0)) s"; }
# Run quietly; on failure show the log tail.
quiet() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "!! failed: $*" >&2
        tail -n 40 "$LOG" >&2
        echo "!! full log: $LOG" >&2
        exit 1
    fi
}
# Remove build trees safely: a killed debootstrap can leave proc, sysfs, a tmpfs /dev and
# bind-mounted device nodes mounted inside its target; unmount them, never cross them.
rm_tree() {
    local t m
    for t in "$@"; do
        [ -n "$t" ] && [ -e "$t" ] || continue
        t=$(realpath "$t")
        findmnt -rn -o TARGET | awk -v p="$t/" 'index($0, p) == 1' | sort -r |
            while read -r m; do umount -l "$m" || true; done
        rm -rf --one-file-system "$t"
    done
}
TMP_CLEAN=()
trap 'rm_tree "${TMP_CLEAN[@]:-}"' EXIT

installed() { # pkg...: true when every package is installed
    local p
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || return 1
    done
}

# --- QEMU (from bookworm-backports where the host's qemu-utils is: scripts/lib/install-qemu.sh)
# shellcheck source=../lib/install-qemu.sh
. "$HERE/../lib/install-qemu.sh"
APT_PRIVATE=$RIG/apt/sources.list.d
APT_UPDATED=0
if ! installed qemu-system-x86 || ! command -v qemu-system-x86_64 >/dev/null; then
    step "installing qemu-system-x86 (private sources dir $APT_PRIVATE)"
    quiet install_qemu "$APT_PRIVATE" "$MIRROR" backports
    APT_UPDATED=1
    done_step
fi

# --- host packages from bookworm --------------------------------------------------------
missing=()
for p in "${HOST_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing from $SUITE: ${missing[*]}"
    if [ "$APT_UPDATED" = 0 ]; then quiet apt-get update; fi
    quiet apt-get install -y --no-install-recommends "${missing[@]}"
    done_step
fi

# --- cached kernel ----------------------------------------------------------------------
# The newest installed Debian cloud kernel.
KVER=$(cd /boot && ls vmlinuz-*-cloud-amd64 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[ -n "$KVER" ] || { echo "no /boot/vmlinuz-*-cloud-amd64 after installing linux-image-cloud-amd64" >&2; exit 1; }
[ -f "/boot/initrd.img-$KVER" ] || quiet update-initramfs -c -k "$KVER"
[ -d "/lib/modules/$KVER" ] || { echo "/lib/modules/$KVER missing" >&2; exit 1; }

# Replace $2 by the finished temp dir $1 (the stamp is already inside it).
swap_in() {
    local new=$1 dst=$2 old=""
    if [ -e "$dst" ]; then old=$(mktemp -d "$RIG/.old.XXXXXX"); mv -T "$dst" "$old/x"; fi
    mv -T "$new" "$dst"
    [ -z "$old" ] || rm_tree "$old"
}
rm_tree "$RIG"/.tmp.* "$RIG"/.old.*   # leftovers of an interrupted run (we hold the lock)

KERNEL_STAMP="rig=$RIG_VERSION kernel=$KVER"
if [ "$(cat "$RIG/kernel/stamp" 2>/dev/null)" != "$KERNEL_STAMP" ]; then
    step "caching kernel $KVER in $RIG/kernel"
    tmp=$(mktemp -d "$RIG/.tmp.kernel.XXXXXX"); TMP_CLEAN+=("$tmp"); chmod 755 "$tmp"
    cp "/boot/vmlinuz-$KVER" "$tmp/vmlinuz"
    cp "/boot/initrd.img-$KVER" "$tmp/initrd"
    echo "$KVER" >"$tmp/version"
    cp -a "/lib/modules/$KVER" "$tmp/modules"
    echo "$KERNEL_STAMP" >"$tmp/stamp"
    swap_in "$tmp" "$RIG/kernel"
    done_step
fi

# --- cached rootfs ----------------------------------------------------------------------
ROOTFS_STAMP="rig=$RIG_VERSION kernel=$KVER suite=$SUITE include=$ROOTFS_INCLUDE size=$ROOTFS_SIZE"
if [ "$(cat "$RIG/rootfs/stamp" 2>/dev/null)" != "$ROOTFS_STAMP" ]; then
    tmp=$(mktemp -d "$RIG/.tmp.rootfs.XXXXXX"); TMP_CLEAN+=("$tmp"); chmod 755 "$tmp"
    mkdir -p "$RIG/debs"   # debootstrap's package cache: a recipe bump rebuilds faster
    step "debootstrap --variant=minbase $SUITE (+$ROOTFS_INCLUDE)"
    quiet debootstrap --variant=minbase --include="$ROOTFS_INCLUDE" --cache-dir="$RIG/debs" \
        "$SUITE" "$tmp/dir" "$MIRROR"
    done_step
    step "customising the rootfs (modules $KVER, no host keys, no apt lists)"
    d=$tmp/dir
    mkdir -p "$d/lib/modules"
    cp -a "$RIG/kernel/modules" "$d/lib/modules/$KVER"
    # Per-VM identity is the guest's job (banger-agent / `ssh-keygen -A`, machine-id).
    rm -f "$d"/etc/ssh/ssh_host_*
    : >"$d/etc/machine-id"
    echo banger >"$d/etc/hostname"
    rm -f "$d/etc/resolv.conf"; : >"$d/etc/resolv.conf"   # debootstrap copies the host's
    rm -rf "$d"/var/lib/apt/lists/* "$d"/var/cache/apt/*.bin "$d"/var/cache/apt/archives/*.deb
    done_step
    step "mkfs.ext4 -d ($ROOTFS_SIZE, sparse)"
    quiet mkfs.ext4 -q -F -L banger-root -d "$d" "$tmp/base.ext4" "$ROOTFS_SIZE"
    rm -rf "$d"   # base.ext4 is the artefact; debugfs/`mkfs -d` on copies build variants
    echo "$ROOTFS_STAMP" >"$tmp/stamp"
    swap_in "$tmp" "$RIG/rootfs"
    done_step
fi

# --- summary: also written to $RIG/rig.env for tests -------------------------------------
QEMU=$(command -v qemu-system-x86_64)
QEMU_VERSION=$("$QEMU" --version | sed -n '1s/^QEMU emulator version \([^ ]*\).*/\1/p')
QEMU_PACKAGE=$(dpkg-query -W -f='${Version}' qemu-system-x86)
TSC_KHZ=$("$HERE/tsc-khz.sh" 2>/dev/null || echo "")
env_tmp=$(mktemp "$RIG/.rig.env.XXXXXX")
cat >"$env_tmp" <<EOF
# written by scripts/rig/setup.sh (rig version $RIG_VERSION); KEY=VALUE, unquoted, sourceable
BANGER_RIG_VERSION=$RIG_VERSION
BANGER_RIG_QEMU=$QEMU
BANGER_RIG_QEMU_VERSION=$QEMU_VERSION
BANGER_RIG_QEMU_PACKAGE=$QEMU_PACKAGE
BANGER_RIG_KERNEL=$RIG/kernel/vmlinuz
BANGER_RIG_INITRD=$RIG/kernel/initrd
BANGER_RIG_KERNEL_VERSION=$KVER
BANGER_RIG_MODULES=$RIG/kernel/modules
BANGER_RIG_ROOTFS=$RIG/rootfs/base.ext4
BANGER_RIG_TSC_KHZ=$TSC_KHZ
EOF
chmod 644 "$env_tmp"
mv -f "$env_tmp" "$RIG/rig.env"
rm -f "$LOG"

if [ "${BANGER_RIG_QUIET:-0}" != 1 ]; then
    echo "rig $RIG_VERSION in $RIG ($RIG/rig.env):"
    echo "  qemu               $QEMU ($QEMU_VERSION, package $QEMU_PACKAGE)"
    echo "  kernel             $RIG/kernel/vmlinuz, initrd, modules/ ($KVER)"
    echo "  rootfs             $RIG/rootfs/base.ext4 ($(du -h --apparent-size "$RIG/rootfs/base.ext4" | cut -f1), $(du -h "$RIG/rootfs/base.ext4" | cut -f1) used)"
    echo "  host tsc khz       ${TSC_KHZ:-unknown}"
fi
