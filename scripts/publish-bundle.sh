#!/usr/bin/env bash
# Publish a bundle: upload it to the release location and print the catalog entry to put in
# images/images.json or images/kernels.json (then rebuild: the catalogs are embedded).
#
#   scripts/publish-bundle.sh FILE.tar.zst NAME KIND [KERNEL_REF] [DESCRIPTION]
#
# The release location is BANGER_RELEASE_URL (default: the placeholder the embedded
# catalogs use, https://example.invalid/banger/releases/download/<tag>); uploading is done
# by BANGER_UPLOAD_CMD (e.g. `gh release upload images-v1`), given the file as its last
# argument. Without it, the entry is printed and nothing is uploaded.
set -euo pipefail
file="$1"; name="$2"; kind="$3"; kernel_ref="${4:-}"; desc="${5:-$name}"
base="${BANGER_RELEASE_URL:-https://example.invalid/banger/releases/download/${kind}s-v1}"
if [ -n "${BANGER_UPLOAD_CMD:-}" ]; then
    $BANGER_UPLOAD_CMD "$file"
else
    echo "(not uploaded: set BANGER_UPLOAD_CMD)" >&2
fi
sha="$(sha256sum "$file" | cut -d' ' -f1)"
size="$(stat -c %s "$file")"
kref=""
[ "$kind" = image ] && kref="\"kernel_ref\": \"$kernel_ref\", "
cat <<JSON
{ "name": "$name", "arch": "x86_64", "url": "$base/$(basename "$file")",
  "sha256": "$sha", "size": $size, ${kref}"description": "$desc" }
JSON
