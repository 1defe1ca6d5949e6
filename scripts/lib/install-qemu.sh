#!/usr/bin/env bash
# Install qemu-system-x86 with apt, as the host allows (sourced by scripts/rig/setup.sh and
# scripts/quickstart.sh; run it directly to install QEMU alone).
#
# On Debian 12 hosts whose qemu-utils comes from bookworm-backports (this project's build
# machines), bookworm's qemu-system-x86 conflicts with it, so the backports one is
# installed, through a private sources dir: the global apt configuration is left untouched.
# The private dir holds a backports sources file plus links to the machine's own sources
# files (backports packages depend on bookworm ones, so apt must see both), and list cleanup
# is off so an update through the private dir never deletes lists the global configuration
# uses. Elsewhere the distribution's own qemu-system-x86 is installed, unless the third
# argument is `backports` (the test rig wants QEMU 10's migration features on bookworm).
#
#   install_qemu PRIVATE_DIR [MIRROR] [backports]
set -euo pipefail

install_qemu() {
    local private=$1 mirror=${2:-http://deb.debian.org/debian} want=${3:-} suite="" f bpo=0
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC1091
    [ -r /etc/os-release ] && suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo'; then bpo=1; fi
    [ "$want" != backports ] || bpo=1
    if [ "$bpo" = 1 ] && [ -n "$suite" ]; then
        mkdir -p "$private"
        cat >"$private/backports.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        find "$private" -type l -delete
        for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] && ln -s "$f" "$private/system-$(basename "$f")"
        done
        if [ -s /etc/apt/sources.list ]; then
            ln -s /etc/apt/sources.list "$private/system-sources.list"
        fi
        local opts=(-o Dir::Etc::sourceparts="$private" -o Dir::Etc::sourcelist=/dev/null
                    -o APT::Get::List-Cleanup=false)
        apt-get "${opts[@]}" update
        apt-get "${opts[@]}" install -y --no-install-recommends -t "$suite-backports" qemu-system-x86
    else
        apt-get update
        apt-get install -y --no-install-recommends qemu-system-x86
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    install_qemu "${1:-/var/cache/banger/apt/sources.list.d}" "${2:-}"
fi
