#!/usr/bin/env bash
# Print the path of the Jaeger binary the tracing tests use, building it once if missing.
#
# Jaeger v2 (the OpenTelemetry-Collector-based backend: OTLP receivers, in-memory storage,
# query API) is built from the Go module proxy into .cache/bin (ignored by git). The v2
# binary lives under cmd/jaeger of the v1.x module tags; `go install` refuses that module
# (its go.mod has a replace directive), so the module is downloaded into .cache/go/mod and
# built in place, where the replace directive applies. A cold build downloads about 1.7 GB
# of modules and takes 6 to 7 minutes on 2 cores; later calls only print the path.
# Override with JAEGER=/path/to/jaeger.
set -euo pipefail
cd "$(dirname "$0")/.."

JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_VERSION=v1.76.0
root=$(pwd)
jaeger_bin="$root/.cache/bin/jaeger"

if [[ -n "${JAEGER:-}" ]]; then
    command -v "$JAEGER" >/dev/null || { echo "JAEGER=$JAEGER is not an executable" >&2; exit 1; }
    command -v "$JAEGER"
    exit 0
fi

if [[ ! -x "$jaeger_bin" ]]; then
    command -v go >/dev/null || {
        echo "jaeger is missing and Go is not installed: install Go (1.24+) or set JAEGER=/path/to/jaeger" >&2
        exit 1
    }
    mkdir -p "$root/.cache/bin"
    echo "building jaeger $JAEGER_VERSION into .cache/bin (once; takes 6 to 7 minutes)" >&2
    export GOPATH="$root/.cache/go" GOMODCACHE="$root/.cache/go/mod" GOFLAGS=-modcacherw GOTOOLCHAIN=local
    go mod download "$JAEGER_MODULE@$JAEGER_VERSION" >&2
    (cd "$GOMODCACHE/$JAEGER_MODULE@$JAEGER_VERSION" &&
        go build -trimpath -o "$jaeger_bin.partial" ./cmd/jaeger >&2)
    mv "$jaeger_bin.partial" "$jaeger_bin"
fi
echo "$jaeger_bin"
