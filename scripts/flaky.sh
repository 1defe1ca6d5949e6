#!/usr/bin/env bash
# Find flakes before they land: run the real-guest test binaries N times in a row and report
# each test's pass rate, and the slowest guest waits against the tests' limit.
#
#   sudo scripts/flaky.sh [-n N] [--load K] [--test BIN]... [-- TEST-FILTER]
#
#   -n N        runs (default 5)
#   --load K    keep K busy loops running meanwhile (a loaded machine, as CI may be)
#   --test BIN  a test binary of the client crate (default: every real-guest one)
#
# Needs root and the rig, like scripts/test.sh (it runs the same idempotent setup first).
# Each run's output is kept in target/flaky/run-<i>.log. Exits non-zero if any test failed
# in any run.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=5
LOAD=0
BINS=()
FILTER=()
while [ $# -gt 0 ]; do
    case $1 in
    -n) RUNS=$2; shift 2 ;;
    --load) LOAD=$2; shift 2 ;;
    --test) BINS+=("$2"); shift 2 ;;
    --) shift; FILTER=("$@"); break ;;
    *) echo "usage: $0 [-n N] [--load K] [--test BIN]... [-- TEST-FILTER]" >&2; exit 2 ;;
    esac
done
# The test binaries that boot real guests (they take guest slots: client/tests/support/guests.rs).
[ "${#BINS[@]}" -gt 0 ] || mapfile -t BINS < <(grep -l 'support/guests.rs' client/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//')

if [ "$(id -u)" != 0 ]; then
    echo "$0 needs root (the real-guest tests do): run it with sudo" >&2
    exit 1
fi
BANGER_RIG_QUIET=1 scripts/rig/install-deps.sh >/dev/null
BANGER_RIG_QUIET=1 scripts/rig/setup.sh >/dev/null
scripts/build-guest.sh dev >/dev/null

RIG=${BANGER_RIG_DIR:-/var/cache/banger-rig}
OUT=target/flaky
mkdir -p "$OUT"
rm -f "$OUT"/run-*.log
: >"$RIG/guest-waits.log"
export CARGO_TERM_COLOR=never
targets=()
for b in "${BINS[@]}"; do targets+=(--test "$b"); done
cargo test -p banger --locked "${targets[@]}" --no-run 2>&1 | tail -n 1

LOAD_PIDS=()
stop_load() { local p; for p in "${LOAD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_load EXIT
for _ in $(seq 1 "$LOAD"); do
    (while :; do :; done) &
    LOAD_PIDS+=($!)
done

failed=0
for i in $(seq 1 "$RUNS"); do
    t0=$SECONDS
    rc=0
    cargo test -p banger --locked "${targets[@]}" --no-fail-fast -- \
        --test-threads="${BANGER_TEST_THREADS:-4}" "${FILTER[@]}" >"$OUT/run-$i.log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || failed=1
    echo "run $i/$RUNS: exit $rc in $((SECONDS - t0)) s ($(grep -c ' \.\.\. ok$' "$OUT/run-$i.log") ok, $(grep -c ' \.\.\. FAILED$' "$OUT/run-$i.log") failed)"
done
stop_load

echo
echo "pass rate over $RUNS runs (load: $LOAD busy loops)"
cat "$OUT"/run-*.log | sed -n 's/^test \(.*\) \.\.\. \(ok\|FAILED\)$/\1 \2/p' | sort |
    awk '{ n[$1]++; if ($2 == "ok") ok[$1]++ }
         END { for (t in n) printf "  %3d%%  %d/%d  %s\n", 100 * ok[t] / n[t], ok[t], n[t], t }' | sort -k4

echo
echo "slowest guest waits (seconds; a test gives up at 120)"
sort -k3 -rn "$RIG/guest-waits.log" | head -n 8 | sed 's/^/  /'
exit "$failed"
