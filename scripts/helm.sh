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

built_version() {
    "$helm_bin" version --template '{{.Version}}' 2>/dev/null || true
}

# A binary built without Helm's own version flags says "v3.21" and assumes Kubernetes 1.20,
# so `helm template` refuses the chart's kubeVersion (>= 1.25): rebuild it.
if [[ ! -x "$helm_bin" || "$(built_version)" != "$HELM_VERSION" ]]; then
    command -v go >/dev/null || {
        echo "helm is missing and Go is not installed: install Go (1.24+) or set HELM=/path/to/helm" >&2
        exit 1
    }
    mkdir -p "$root/.cache/bin"
    echo "building helm $HELM_VERSION into .cache/bin (once; takes a few minutes)" >&2
    export GOBIN="$root/.cache/bin" GOPATH="$root/.cache/go" GOMODCACHE="$root/.cache/go/mod"
    export GOFLAGS=-modcacherw
    module="helm.sh/helm/v3"
    source_dir=$(go mod download -json "$module@$HELM_VERSION" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
    # The flags Helm's Makefile passes: its version, and the Kubernetes version it assumes
    # by default (the major version and the minor of the k8s.io/client-go it builds with).
    client_go=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$source_dir/go.mod")
    k8s_minor=$(echo "$client_go" | cut -d. -f2)
    ldflags="-w -s -X $module/internal/version.version=$HELM_VERSION"
    ldflags+=" -X $module/internal/version.gitTreeState=clean"
    for package in pkg/lint/rules pkg/chartutil; do
        ldflags+=" -X $module/$package.k8sVersionMajor=1 -X $module/$package.k8sVersionMinor=$k8s_minor"
    done
    go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$HELM_VERSION" >&2
fi
echo "$helm_bin"
