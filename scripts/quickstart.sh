#!/usr/bin/env bash
# From a fresh clone to a running sandbox, in one command:
#
#   sudo scripts/quickstart.sh            # then: banger vm run
#
# 1. installs the host packages with apt: QEMU (unless Firecracker and its jailer are
#    installed), mmdebstrap + uidmap (the default image is built locally from Debian's
#    packages), e2fsprogs, nftables, iproute2 and openssh-client (QEMU's agent channel is
#    bangerd's own proxy: nothing more to install);
# 2. builds banger from this checkout (release) and installs `banger` and `bangerd` in
#    /usr/local/bin, and the static guest binaries in /usr/lib/banger;
# 3. runs the daemon as the system service for the invoking user (`banger system install`);
#    where systemd is not PID 1 (a container), it starts `bangerd --system` as root in the
#    background instead, and says so;
# 4. runs `banger vm run --rm --no-network -- uname -a` as that user: the first run builds
#    the default image (debian-bookworm, once, a few minutes) and prints the guest's kernel
#    line. No network for this smoke run, so nothing changes on the host's interfaces.
#
# Idempotent: a second run skips what is done (it still ends with a sandbox). Options:
#   --no-run        stop after installing (skip step 4)
#   --user NAME     the user the daemon serves (default: $SUDO_USER, else root)
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$(pwd)
RUN=1
USER_NAME=${SUDO_USER:-root}
while [ $# -gt 0 ]; do
    case $1 in
    --no-run) RUN=0; shift ;;
    --user) USER_NAME=$2; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "quickstart: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

T0=$SECONDS
say() { echo "quickstart: $*"; }
die() { echo "quickstart: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run it with sudo: it installs packages and the system service"
id "$USER_NAME" >/dev/null 2>&1 || die "no user $USER_NAME (--user)"
as_user() { if [ "$USER_NAME" = root ]; then "$@"; else runuser -u "$USER_NAME" -- "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin:/usr/local/bin"

# --- 1. host packages --------------------------------------------------------------------
command -v apt-get >/dev/null ||
    die "this script installs with apt (Debian, Ubuntu); elsewhere install QEMU (qemu-system-x86_64), mmdebstrap, uidmap, e2fsprogs, nftables, iproute2, openssh-client with your package manager, then re-run it"
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
LOG=$(mktemp /tmp/banger-quickstart.XXXXXX.log)
quiet() { "$@" >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "failed: $* (log: $LOG)"; }; }

if command -v firecracker >/dev/null && command -v jailer >/dev/null; then
    say "Firecracker and its jailer are installed: VMs use them where KVM runs stock guests (default_vmm = \"auto\")"
elif ! command -v qemu-system-x86_64 >/dev/null; then
    say "installing QEMU (no Firecracker here; banger uses QEMU microvm)"
    # shellcheck source=lib/install-qemu.sh
    . "$HERE/scripts/lib/install-qemu.sh"
    quiet install_qemu /var/cache/banger/apt/sources.list.d
fi
missing=()
for p in mmdebstrap uidmap e2fsprogs nftables iproute2 openssh-client ca-certificates; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    quiet apt-get update
    quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Builds run as the invoking user, with their toolchain.
CARGO=$(as_user bash -lc 'command -v cargo' 2>/dev/null || true)
[ -n "$CARGO" ] || CARGO=$(command -v cargo || true)
[ -n "$CARGO" ] || die "cargo not found: install Rust (https://rustup.rs) as $USER_NAME, then re-run"

# --- 2. build and install banger -----------------------------------------------------------
say "building banger (release; the first build takes several minutes)"
quiet as_user "$CARGO" build --release --locked -p banger -p bangerd
quiet as_user env -u CARGO_TARGET_DIR PATH="$(dirname "$CARGO"):$PATH" scripts/build-guest.sh release
CHANGED=0
install_if_changed() { # src dst mode
    if ! cmp -s "$1" "$2"; then
        install -D -m "$3" "$1" "$2.new" && mv -f "$2.new" "$2"
        echo "  installed $2"
        CHANGED=1
    fi
}
for b in banger bangerd; do install_if_changed "${CARGO_TARGET_DIR:-target}/release/$b" "/usr/local/bin/$b" 0755; done
for b in banger-init banger-agent; do install_if_changed "target/guest/$b" "/usr/lib/banger/$b" 0755; done

# --- 3. the daemon -------------------------------------------------------------------------
BANGER=/usr/local/bin/banger
# bangerd drops to its owner after forking its helper, and builds images as that user with
# mmdebstrap in unshare mode, which needs a subordinate uid/gid range. Run as root without
# sudo, the owner is a dedicated system user `banger` (root may still use the daemon).
OWNER=$USER_NAME
getent group banger >/dev/null || groupadd --system banger
if [ "$OWNER" = root ]; then
    OWNER=banger
    if ! id banger >/dev/null 2>&1; then
        say "creating the system user banger (the daemon's owner; root uses the daemon too)"
        useradd --system --gid banger --home-dir /var/lib/banger --no-create-home \
            --shell /usr/sbin/nologin banger
    fi
fi
for f in subuid subgid; do
    if ! grep -q "^$OWNER:" "/etc/$f" 2>/dev/null; then
        start=$(awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "/etc/$f" 2>/dev/null || echo 100000)
        say "giving $OWNER the subordinate ${f#sub} range $start-$((start + 65535)) (image builds)"
        if [ "$f" = subuid ]; then quiet usermod --add-subuids "$start-$((start + 65535))" "$OWNER"
        else quiet usermod --add-subgids "$start-$((start + 65535))" "$OWNER"; fi
    fi
done
if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    say "installing the system service for $OWNER"
    quiet "$BANGER" system install --owner "$OWNER"
elif [ -S /run/banger/bangerd.sock ] && "$BANGER" daemon status >/dev/null 2>&1 && [ "$CHANGED" = 0 ]; then
    say "systemd is not PID 1 here: the background bangerd --system is already running"
else
    if [ -S /run/banger/bangerd.sock ] && "$BANGER" daemon status >/dev/null 2>&1; then
        # A new build: the running daemon is the old one (its VMs keep running and are
        # re-adopted by the new one).
        say "restarting the background bangerd --system (banger was updated)"
        quiet "$BANGER" daemon stop
    fi
    say "systemd is not PID 1 here (a container?): starting bangerd --system as root in the background instead (log: /var/log/banger/bangerd.log)"
    mkdir -p /run/banger /var/lib/banger /var/cache/banger /var/log/banger /etc/banger
    chmod 0755 /run/banger
    BANGER_OWNER=$OWNER PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        setsid /usr/local/bin/bangerd --system \
        </dev/null >>/var/log/banger/bangerd.out 2>&1 &
    for _ in $(seq 1 100); do
        [ -S /run/banger/bangerd.sock ] && break
        sleep 0.1
    done
    [ -S /run/banger/bangerd.sock ] || die "bangerd did not start: see /var/log/banger/bangerd.log and /var/log/banger/bangerd.out"
fi
say "host set up in $((SECONDS - T0)) s"

# --- 4. the first sandbox ------------------------------------------------------------------
[ "$RUN" = 1 ] || exit 0
say "banger vm run --rm --no-network -- uname -a"
as_user "$BANGER" vm run --rm --no-network -- uname -a
say "done in $((SECONDS - T0)) s. Next: \`banger vm run\` (a shell in a fresh sandbox), \`banger vm run --nat -- curl -sI https://deb.debian.org\` (with a network and NAT), \`banger --help\`."
