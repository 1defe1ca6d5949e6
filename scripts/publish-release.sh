#!/usr/bin/env bash
# Build and sign a banger release into a directory that is then uploaded as is.
# See docs/release-process.md.
#
#   scripts/publish-release.sh --version 0.2.0 --key release-key.pem --out ./releases
#
# Produces, in OUT:
#   v0.2.0/banger-0.2.0-<arch>-linux.tar.gz   banger, bangerd, bangerd.service, and the
#                                             static guest binaries banger-init and
#                                             banger-agent (install.sh puts them in
#                                             <prefix>/lib/banger, where bangerd looks)
#   v0.2.0/SHA256SUMS                         sha256sum of the tarball(s)
#   v0.2.0/SHA256SUMS.sig                     base64 of an ECDSA P-256 DER signature of
#                                             SHA256SUMS (what `cosign sign-blob` makes)
#   v0.2.0/COMMIT                             the commit the binaries were built from
#   manifest.json                             every release in OUT, latest = highest version
#
# Options:
#   --version V      the release version; must be what the binaries report
#   --key FILE       the signing key (PEM EC P-256 private key, e.g. `cosign.key` decrypted,
#                    or `openssl ecparam -name prime256v1 -genkey -noout`)
#   --cosign FILE    sign with `cosign sign-blob --key FILE` instead of openssl
#   --pubkey FILE    public key to check the signature with (default: scripts/release-key.pub)
#   --out DIR        where the release tree lives (created; other releases in it are kept)
#   --bin-dir DIR    take banger/bangerd from DIR instead of building target/release
#   --guest-dir DIR  take the static banger-init/banger-agent from DIR instead of building
#                    them with scripts/build-guest.sh release
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
version="" key="" cosign_key="" out="" bin_dir="" guest_dir="" pubkey="$here/release-key.pub"

die() { echo "publish-release: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --version) version="${2#v}"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --cosign) cosign_key="$2"; shift 2 ;;
        --pubkey) pubkey="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --guest-dir) guest_dir="$2"; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -n "$version" ] || die "--version is required"
[ -n "$out" ] || die "--out is required"
[ -n "$key" ] || [ -n "$cosign_key" ] || die "--key or --cosign is required"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$ ]] || die "version $version is not X.Y.Z"
[ -f "$pubkey" ] || die "no public key at $pubkey"

if [ -z "$bin_dir" ]; then
    (cd "$repo" && cargo build --release --locked -p banger -p bangerd)
    bin_dir="$repo/target/release"
fi
for b in banger bangerd; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing"
done
if [ -z "$guest_dir" ]; then
    guest_dir="$("$here/build-guest.sh" release)"
fi
for b in banger-init banger-agent; do
    [ -x "$guest_dir/$b" ] || die "$guest_dir/$b is missing (scripts/build-guest.sh release)"
    if readelf -lW "$guest_dir/$b" | grep -q 'Requesting program interpreter'; then
        die "$guest_dir/$b is dynamically linked; guest binaries must be static (scripts/build-guest.sh release)"
    fi
done
reported="$("$bin_dir/bangerd" --version)"
case "$reported" in
    "bangerd $version "*) ;;
    *) die "bangerd reports \"$reported\", not version $version: bump the workspace version first" ;;
esac
commit="$(sed -n 's/.*(commit \([^,]*\),.*/\1/p' <<<"$reported")"

arch="$(uname -m)"
name="banger-$version-$arch-linux.tar.gz"
rel="$out/v$version"
mkdir -p "$rel"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$bin_dir/banger" "$bin_dir/bangerd" "$stage/"
install -m 0755 "$guest_dir/banger-init" "$guest_dir/banger-agent" "$stage/"
install -m 0644 "$repo/systemd/bangerd.service" "$stage/"
# Reproducible: fixed owner, order and times.
mtime="@${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}"
tar --create --gzip --file "$rel/$name" --directory "$stage" \
    --owner=0 --group=0 --numeric-owner --mtime="$mtime" --sort=name \
    banger banger-agent banger-init bangerd bangerd.service
echo "$commit" > "$rel/COMMIT"

(cd "$rel" && sha256sum banger-*-linux.tar.gz > SHA256SUMS)
if [ -n "$cosign_key" ]; then
    cosign sign-blob --yes --key "$cosign_key" --output-signature "$rel/SHA256SUMS.sig" "$rel/SHA256SUMS"
else
    openssl dgst -sha256 -sign "$key" "$rel/SHA256SUMS" | base64 -w0 > "$rel/SHA256SUMS.sig"
    echo >> "$rel/SHA256SUMS.sig"
fi
# Check the signature with the public key the binaries embed, before anything is published.
base64 -d "$rel/SHA256SUMS.sig" > "$stage/sig.der"
openssl dgst -sha256 -verify "$pubkey" -signature "$stage/sig.der" "$rel/SHA256SUMS" >/dev/null \
    || die "the signature does not verify with $pubkey: wrong key?"

# The manifest lists every release in OUT; latest is the highest version.
versions="$(cd "$out" && for d in v*/; do d="${d%/}"; [ -f "$d/SHA256SUMS" ] && echo "${d#v}"; done | sort -V)"
latest="$(tail -n1 <<<"$versions")"
{
    printf '{\n  "schema": 1,\n  "latest": "%s",\n  "releases": [' "$latest"
    sep=""
    while read -r v; do
        c="$(cat "$out/v$v/COMMIT" 2>/dev/null || true)"
        printf '%s\n    {"version": "%s", "commit": "%s", "tarballs": {' "$sep" "$v" "$c"
        tsep=""
        for t in "$out/v$v"/banger-"$v"-*-linux.tar.gz; do
            a="${t##*/banger-$v-}"; a="${a%-linux.tar.gz}"
            printf '%s"%s": "v%s/%s"' "$tsep" "$a" "$v" "${t##*/}"
            tsep=", "
        done
        printf '}, "sha256sums": "v%s/SHA256SUMS", "signature": "v%s/SHA256SUMS.sig"}' "$v" "$v"
        sep=","
    done <<<"$versions"
    printf '\n  ]\n}\n'
} > "$out/manifest.json.new"
mv "$out/manifest.json.new" "$out/manifest.json"

echo "published banger $version ($arch, commit $commit) in $out; latest is $latest"
echo "upload $out as is (manifest.json last)"
