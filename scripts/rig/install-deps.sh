#!/usr/bin/env bash
# Install the host packages and tools the test suite needs. Idempotent: does nothing when
# everything is present, so it is cheap to run before every test run.
set -euo pipefail

need_apt=()
command -v setpriv >/dev/null || need_apt+=(util-linux)   # run a client as `nobody`
command -v git >/dev/null || need_apt+=(git)
# system install/update tests: systemd-analyze verify + offline systemctl, groupadd,
# strip (test releases), perl (patching a build's commit), openssl (publish/install scripts)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v groupadd >/dev/null || need_apt+=(passwd)
command -v strip >/dev/null || need_apt+=(binutils)
command -v perl >/dev/null || need_apt+=(perl-base)
command -v openssl >/dev/null || need_apt+=(openssl)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)   # https update test
command -v curl >/dev/null || need_apt+=(curl)                             # install.sh
command -v zsh >/dev/null || need_apt+=(zsh)                               # zsh completion test
# Image pulls (issue 5): a real registry, image assembly and push, ext4 build and checks.
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v umoci >/dev/null || need_apt+=(umoci)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v debugfs >/dev/null || need_apt+=(e2fsprogs)
command -v zstd >/dev/null || need_apt+=(zstd)
# Local image builds (`banger image build`): mmdebstrap in unshare mode needs newuidmap.
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
command -v newuidmap >/dev/null || need_apt+=(uidmap)

if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
