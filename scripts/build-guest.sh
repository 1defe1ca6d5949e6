#!/usr/bin/env bash
# Build the guest binaries (banger-init, banger-agent) statically linked, so they
# run on any distribution's userland, into target/guest/. Prints that directory.
# An explicit --target keeps RUSTFLAGS away from build scripts and proc-macros.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
target="x86_64-unknown-linux-gnu"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked -p banger-guest \
    --bins --target "$target" --profile "$profile" >&2
dir="target/$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
mkdir -p target/guest
for bin in banger-init banger-agent; do
    cp "$dir/$bin" "target/guest/$bin.tmp" && mv "target/guest/$bin.tmp" "target/guest/$bin"
done
realpath target/guest
