#!/usr/bin/env bash
# banger's test command (README, CI): installs what the tests need, then checks formatting,
# lints, and runs every test tier. Needs root: tests named `root_*` switch uid, and the
# VM/network tiers create network namespaces and boot guests through the rig.
#
# Every test binary runs even when an earlier one fails (`--no-fail-fast`); the run exits
# non-zero if any test failed, and ends with the failing tests and each phase's duration.
# Budget: a cold run on a fresh 2-core machine stays under BANGER_TEST_BUDGET_MIN minutes
# (default 45); a run over it says so at the end.
#
# Env: BANGER_TEST_THREADS (default 4: tests of one binary at once; real guests are limited
# separately to one per core, see client/tests/support/guests.rs), BANGER_TEST_GUESTS.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh needs root (some tests switch uid, create network namespaces and boot guests): run it with sudo" >&2
    exit 1
fi

BUDGET_MIN=${BANGER_TEST_BUDGET_MIN:-45}
T_START=$SECONDS
PHASES=()
phase() { # name command...: run one phase and record how long it took
    local name=$1 t0=$SECONDS rc=0
    shift
    echo "== $name"
    "$@" || rc=$?
    PHASES+=("$(printf '%-16s %5d s%s' "$name" $((SECONDS - t0)) "$([ "$rc" = 0 ] || echo "  (failed: exit $rc)")")")
    return "$rc"
}
summary() {
    local rc=$? total=$((SECONDS - T_START))
    echo
    echo "== phases"
    printf '   %s\n' "${PHASES[@]}"
    printf '   %-16s %5d s (%d min; budget %d min)\n' total "$total" $((total / 60)) "$BUDGET_MIN"
    if [ "$total" -gt $((BUDGET_MIN * 60)) ]; then
        echo "!! over the time budget of $BUDGET_MIN minutes: find what grew (the phases above)" >&2
    fi
    if [ -s "${TEST_LOG:-}" ] && [ "$rc" != 0 ]; then
        echo "== failed tests"
        grep -E '^test .* \.\.\. FAILED$' "$TEST_LOG" | sed 's/^/   /' || true
        sed -n '/^error: [0-9]* targets\{0,1\} failed:/,$p' "$TEST_LOG" | sed 's/^/   /'
    fi
    [ -z "${TEST_LOG:-}" ] || rm -f "$TEST_LOG"
    exit "$rc"
}
trap summary EXIT

phase "rig: packages" scripts/rig/install-deps.sh
phase "rig: setup" scripts/rig/setup.sh
phase "guest binaries" scripts/build-guest.sh dev

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
phase "rustfmt" cargo fmt --all -- --check
phase "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
phase "build tests" cargo test --workspace --locked --no-run
# A second build of the binaries must do nothing: a path a build script watches that is
# always stale (a missing file) re-links banger and bangerd on every build, and made a
# second quick start take minutes.
second_build_is_fresh() {
    cargo build --locked -p banger -p bangerd
    local out
    out=$(cargo build --locked -p banger -p bangerd -v 2>&1)
    if grep -E '^ *(Dirty|Compiling) banger(d)? ' <<<"$out"; then
        echo "a second build of banger/bangerd was not fresh (above: what cargo found changed)" >&2
        return 1
    fi
}
phase "fresh rebuild" second_build_is_fresh
TEST_LOG=$(mktemp /tmp/banger-test.XXXXXX.log)
run_tests() {
    cargo test --workspace --locked --no-fail-fast -- --test-threads="${BANGER_TEST_THREADS:-4}" 2>&1 |
        tee "$TEST_LOG"
    return "${PIPESTATUS[0]}"
}
phase "tests" run_tests
