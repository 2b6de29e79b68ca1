#!/usr/bin/env bash
# Print the path of the htmx file the dashboard serves, fetching it once if missing.
#
# htmx is one JavaScript file; the dashboard (jobstream/ui) serves it itself at
# /ui/static/htmx.min.js and never points the browser at a CDN. It is taken from the npm
# package `htmx.org`, pinned by version and by the SHA-256 of the file, with the npm client
# (`npm pack`), into .cache/htmx (ignored by git). No build step: the file is used as it is.
# Override with HTMX_FILE=/path/to/htmx.min.js (or the setting ui.htmx_file).
set -euo pipefail
cd "$(dirname "$0")/.."

HTMX_VERSION=2.0.11
HTMX_SHA256=d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717
dir=$(pwd)/.cache/htmx
file="$dir/htmx-$HTMX_VERSION.min.js"

if [[ -n "${HTMX_FILE:-}" ]]; then
    echo "$HTMX_FILE"
    exit 0
fi
if [[ ! -f "$file" ]]; then
    command -v npm >/dev/null || { echo "htmx is missing and npm is not installed: install npm, or set HTMX_FILE" >&2; exit 1; }
    mkdir -p "$dir"
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    (cd "$scratch" && npm pack --silent "htmx.org@$HTMX_VERSION" >/dev/null && tar xzf "htmx.org-$HTMX_VERSION.tgz" package/dist/htmx.min.js)
    echo "$HTMX_SHA256  $scratch/package/dist/htmx.min.js" | sha256sum --check --quiet ||
        { echo "htmx.org@$HTMX_VERSION: dist/htmx.min.js does not match the pinned SHA-256" >&2; exit 1; }
    mv "$scratch/package/dist/htmx.min.js" "$file"
fi
echo "$file"
