#!/usr/bin/env bash
# Print the path of the Chromium binary the browser tests drive, unpacking it once if missing.
#
# Chromium comes from Debian's own package, not from Playwright's browser downloads: the
# package and every library it needs that this machine lacks are fetched with
# `apt-get download` (no root needed) into .cache/chromium/debs and unpacked with `dpkg -x`
# into .cache/chromium/root (both ignored by git); nothing is installed system-wide. The
# browser then runs with LD_LIBRARY_PATH pointing at the unpacked libraries: print them with
# `scripts/chromium.sh --library-path`. Override with CHROMIUM=/path/to/chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

root=$(pwd)/.cache/chromium
binary="$root/root/usr/lib/chromium/chromium"

library_path() {
    local dirs=()
    for dir in usr/lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu/pulseaudio \
        usr/lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu/pulseaudio lib/x86_64-linux-gnu \
        lib/aarch64-linux-gnu usr/lib/chromium usr/lib; do
        [[ -d "$root/root/$dir" ]] && dirs+=("$root/root/$dir")
    done
    (IFS=:; echo "${dirs[*]}")
}

if [[ -n "${CHROMIUM:-}" ]]; then
    command -v "$CHROMIUM" >/dev/null || { echo "CHROMIUM=$CHROMIUM is not an executable" >&2; exit 1; }
    [[ "${1:-}" == "--library-path" ]] && { echo ""; exit 0; }
    command -v "$CHROMIUM"
    exit 0
fi

if [[ ! -x "$binary" && -x /usr/lib/chromium/chromium ]]; then
    # Installed system-wide already (apt-get install chromium): use it as it is.
    [[ "${1:-}" == "--library-path" ]] && { echo ""; exit 0; }
    echo /usr/lib/chromium/chromium
    exit 0
fi
if [[ ! -x "$binary" ]]; then
    command -v apt-get >/dev/null || { echo "chromium is missing and apt-get is not here: set CHROMIUM=/path/to/chromium" >&2; exit 1; }
    echo "unpacking Debian's chromium and its libraries into .cache/chromium (once)" >&2
    mkdir -p "$root/debs"
    # The packages an install would add to this machine (chromium and its missing libraries).
    # Without a package list (a fresh machine), `apt-get update` needs root.
    packages=$(apt-get install -s -qq --no-install-recommends chromium 2>/dev/null | awk '/^Inst /{print $2}')
    if [[ -z "$packages" ]]; then
        apt-get update -qq >&2 || { echo "no package lists: run apt-get update as root once" >&2; exit 1; }
        packages=$(apt-get install -s -qq --no-install-recommends chromium | awk '/^Inst /{print $2}')
    fi
    [[ -n "$packages" ]] || { echo "apt-get finds no chromium package to fetch" >&2; exit 1; }
    # shellcheck disable=SC2086  # one word per package
    (cd "$root/debs" && apt-get download -qq $packages >&2)
    rm -rf "$root/root.partial" && mkdir -p "$root/root.partial"
    for deb in "$root"/debs/*.deb; do
        dpkg -x "$deb" "$root/root.partial"
    done
    rm -rf "$root/root" && mv "$root/root.partial" "$root/root"
fi
if [[ "${1:-}" == "--library-path" ]]; then
    library_path
else
    echo "$binary"
fi
