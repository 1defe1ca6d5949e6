#!/bin/sh
# Install banger from a signed release, verifying it the way `banger update` does:
# the ECDSA P-256 signature of SHA256SUMS against banger's release key (below), then the
# tarball's SHA-256 against SHA256SUMS. Nothing is installed unless both pass.
#
#   curl -fsSL https://example.invalid/banger/install.sh | sh
#   sh install.sh --version 0.2.0 --prefix ~/.local     (no root needed there)
#   sudo sh install.sh --system                          (then `banger system install`)
#
# Options:
#   --version V    install V (default: the manifest's latest)
#   --prefix DIR   install into DIR/bin, and the static guest binaries (banger-init,
#                  banger-agent) into DIR/lib/banger, where bangerd looks for them
#                  (default: /usr/local as root, else ~/.local)
#   --system       after installing, run `banger system install` (root)
#   --url URL      the manifest (default below; file:// works, for mirrors)
#   --key FILE     trust this public key instead of the one below (your own mirror)
# Needs: curl, openssl, sha256sum, tar, base64.
set -eu

MANIFEST_URL="https://example.invalid/banger/releases/manifest.json"
# banger's release key: the same as scripts/release-key.pub (a test checks they match).
RELEASE_KEY='-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEauAK2x7+f9JN4lb6W170Y7X3McdX
4FGw852KsLCx/rXADSG7HaunPB0k54MtRLwOLWcvPcxVnYpGDrsQ5UhR/Q==
-----END PUBLIC KEY-----'

version="" prefix="" system=0 url="$MANIFEST_URL" keyfile=""
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --version) version="${2#v}"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --system) system=1; shift ;;
        --url) url="$2"; shift 2 ;;
        --key) keyfile="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for tool in curl openssl sha256sum tar base64; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed; install it first"
done
if [ -z "$prefix" ]; then
    if [ "$(id -u)" = 0 ]; then prefix=/usr/local; else prefix="$HOME/.local"; fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT INT TERM
if [ -n "$keyfile" ]; then cp "$keyfile" "$work/key.pub"; else printf '%s\n' "$RELEASE_KEY" > "$work/key.pub"; fi

fetch() { curl -fsSL --proto '=https,file' --retry 2 -o "$2" "$1" || die "cannot fetch $1"; }

fetch "$url" "$work/manifest.json"
if [ -z "$version" ]; then
    version="$(tr -d ' \n' < "$work/manifest.json" | sed -n 's/.*"latest":"\([^"]*\)".*/\1/p')"
    [ -n "$version" ] || die "no latest version in $url"
fi
case "$version" in *[!0-9A-Za-z.+-]*) die "bad version $version" ;; esac
arch="$(uname -m)"
name="banger-$version-$arch-linux.tar.gz"
base="${url%/*}/v$version"

fetch "$base/SHA256SUMS" "$work/SHA256SUMS"
fetch "$base/SHA256SUMS.sig" "$work/SHA256SUMS.sig"
base64 -d "$work/SHA256SUMS.sig" > "$work/sig.der" 2>/dev/null || die "SHA256SUMS.sig is not base64"
openssl dgst -sha256 -verify "$work/key.pub" -signature "$work/sig.der" "$work/SHA256SUMS" >/dev/null 2>&1 \
    || die "the signature of SHA256SUMS does not verify against banger's release key: not installing"
expected="$(awk -v n="$name" '$2 == n || $2 == "*" n { print $1 }' "$work/SHA256SUMS")"
[ -n "$expected" ] || die "SHA256SUMS does not list $name (no release for $arch?)"

fetch "$base/$name" "$work/$name"
actual="$(sha256sum "$work/$name" | cut -d' ' -f1)"
[ "$actual" = "$expected" ] || die "$name: SHA-256 $actual does not match the signed $expected: not installing"

mkdir "$work/x"
tar -xzf "$work/$name" -C "$work/x" --no-same-owner banger bangerd banger-init banger-agent \
    || die "$name does not hold banger, bangerd and the guest binaries banger-init and banger-agent"
# Through a temporary file and a rename: a running binary is never half-written.
put() { cp "$work/x/$1" "$2/.$1.new" && chmod 0755 "$2/.$1.new" && mv -f "$2/.$1.new" "$2/$1"; }
mkdir -p "$prefix/bin" "$prefix/lib/banger"
# The guest binaries first: a new bangerd must find its own (static) ones beside it.
for b in banger-init banger-agent; do put "$b" "$prefix/lib/banger"; done
for b in bangerd banger; do put "$b" "$prefix/bin"; done
echo "installed banger $version into $prefix/bin, its guest binaries into $prefix/lib/banger (signature and SHA-256 verified)"

if [ "$system" = 1 ]; then
    "$prefix/bin/banger" system install
else
    case ":$PATH:" in *":$prefix/bin:"*) ;; *) echo "add $prefix/bin to your PATH" ;; esac
    echo "next: banger doctor; for the system service: sudo $prefix/bin/banger system install"
fi
