#!/usr/bin/env bash
# Builds dockside's container image: a static (musl) release binary, then an image FROM scratch
# holding it (container/Containerfile). Usage: container/build.sh [image name]
# (default localhost/dockside:latest). Env: BUILDER=buildah|podman|docker (default: the first
# installed). Needs `rustup target add x86_64-unknown-linux-musl` and musl-gcc (Debian:
# musl-tools), which .ci/image installs.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-localhost/dockside:latest}
target=x86_64-unknown-linux-musl
cargo build --release --locked --target "$target" --bin dockside
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/dockside" "$ctx/dockside"
# Symbols are no use in the image (panics still name their source line).
strip "$ctx/dockside" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
mkdir "$ctx/data"
builder=${BUILDER:-$(command -v buildah || command -v podman || command -v docker)}
case "$(basename "$builder")" in
  buildah) "$builder" bud --format docker -f container/Containerfile -t "$image" "$ctx" ;;
  *) "$builder" build -f container/Containerfile -t "$image" "$ctx" ;;
esac
echo "built $image"
