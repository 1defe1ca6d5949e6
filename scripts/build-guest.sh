#!/usr/bin/env bash
# Build the guest binaries (banger-init, banger-agent) statically linked, so they
# run on any distribution's userland, into target/guest/. Prints that directory.
# An explicit --target keeps RUSTFLAGS away from build scripts and proc-macros.
#
#   scripts/build-guest.sh [release|dev]
#
# bangerd refuses guest binaries that ask for an ELF interpreter (dynamically linked, as
# a plain `cargo build` makes them); this script checks its own output the same way.
# Install them where bangerd looks: /usr/lib/banger, or <prefix>/lib/banger beside
# <prefix>/bin/bangerd, or set `[images] guest_binaries_dir` to target/guest.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
target="x86_64-unknown-linux-gnu"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked -p banger-guest \
    --bins --target "$target" --profile "$profile" >&2
dir="target/$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
mkdir -p target/guest
for bin in banger-init banger-agent; do
    if readelf -lW "$dir/$bin" | grep -q 'Requesting program interpreter'; then
        echo "build-guest: $dir/$bin is dynamically linked; it must be static" >&2
        exit 1
    fi
    if ! grep -qa 'banger-guest-revision=' "$dir/$bin"; then
        echo "build-guest: $dir/$bin lacks its revision mark (banger_guest::REVISION_MARK)" >&2
        exit 1
    fi
    cp "$dir/$bin" "target/guest/$bin.tmp" && mv "target/guest/$bin.tmp" "target/guest/$bin"
done
realpath target/guest
