#!/usr/bin/env bash
# Print the path of the helm binary the chart tests use, building it once if it is missing.
#
# Helm is built from the Go module proxy into .cache/bin (ignored by git) so that CI and
# developers use the same version without a separate download. The first build takes a few
# minutes and needs Go; later calls only print the path. Override with HELM=/path/to/helm.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.21.4
root=$(pwd)
helm_bin="$root/.cache/bin/helm"

if [[ -n "${HELM:-}" ]]; then
    command -v "$HELM" >/dev/null || { echo "HELM=$HELM is not an executable" >&2; exit 1; }
    command -v "$HELM"
    exit 0
fi

if [[ ! -x "$helm_bin" ]]; then
    command -v go >/dev/null || {
        echo "helm is missing and Go is not installed: install Go (1.24+) or set HELM=/path/to/helm" >&2
        exit 1
    }
    mkdir -p "$root/.cache/bin"
    echo "building helm $HELM_VERSION into .cache/bin (once; takes a few minutes)" >&2
    GOBIN="$root/.cache/bin" GOPATH="$root/.cache/go" GOMODCACHE="$root/.cache/go/mod" \
        GOFLAGS=-modcacherw go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi
echo "$helm_bin"
