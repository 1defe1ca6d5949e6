#!/usr/bin/env bash
# Install the host packages and tools the test suite needs. Idempotent: does nothing when
# everything is present, so it is cheap to run before every test run.
set -euo pipefail

need_apt=()
command -v setpriv >/dev/null || need_apt+=(util-linux)   # run a client as `nobody`
command -v git >/dev/null || need_apt+=(git)

if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
