#!/usr/bin/env bash
# banger's test command (README, CI): installs what the tests need, then checks formatting,
# lints, and runs every test tier. Needs root: tests named `root_*` switch uid, and the
# VM/network tiers create network namespaces and boot guests through the rig.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh needs root (some tests switch uid, create network namespaces and boot guests): run it with sudo" >&2
    exit 1
fi

scripts/rig/install-deps.sh
scripts/rig/setup.sh
echo "== guest binaries"
scripts/build-guest.sh dev

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked -- --test-threads="${BANGER_TEST_THREADS:-4}"
