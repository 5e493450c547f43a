#!/usr/bin/env bash
# Times the same requests against the native server and the wasi:http component under
# `wasmtime serve`: a 100 MiB blob pushed in one POST and pulled back, and manifest GETs.
# Prints one line per figure. Needs a release build (cargo build --release), the component and
# wasmtime (run .ci/edge once first). Usage: bench/edge-vs-native.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
wt_dir=$(python3 -c 'import wasmtime_cli, os; print(os.path.dirname(wasmtime_cli.__file__))')
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

head -c $((100 * 1024 * 1024)) /dev/urandom > "$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
config='{"architecture":"amd64","os":"linux"}'
printf '%s' "$config" > "$work/config"
config_digest="sha256:$(sha256sum "$work/config" | cut -d' ' -f1)"
manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
  "$config_digest" "${#config}" "$digest" $((100 * 1024 * 1024)))

wait_addr() { # log file -> host:port
  for _ in $(seq 200); do
    local a; a=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$1" | head -1 | sed 's|http://||') || true
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.05
  done
  echo "server did not start: $(cat "$1")" >&2; exit 1
}

run() { # name, base url
  local name=$1 base=$2
  for r in $(seq "$rounds"); do
    repo="bench/r$r"
    curl -sf -o /dev/null -X POST --data-binary @"$work/config" "$base/v2/$repo/blobs/uploads/?digest=$config_digest"
    t=$(curl -sf -o /dev/null -w '%{time_total}' -X POST -H 'content-type: application/octet-stream' \
      --data-binary @"$work/blob" "$base/v2/$repo/blobs/uploads/?digest=$digest")
    printf '%-8s push 100 MiB (single POST)   %6.3f s  %7.1f MiB/s\n' "$name" "$t" "$(echo "100 / $t" | bc -l)"
    t=$(curl -sf -o /dev/null -w '%{time_total}' "$base/v2/$repo/blobs/$digest")
    printf '%-8s pull 100 MiB                 %6.3f s  %7.1f MiB/s\n' "$name" "$t" "$(echo "100 / $t" | bc -l)"
    curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
      --data "$manifest" "$base/v2/$repo/manifests/latest"
    args=()
    for _ in $(seq 200); do args+=(-o /dev/null "$base/v2/$repo/manifests/latest"); done
    t=$(curl -sf -w '%{time_total}\n' "${args[@]}" | awk '{s+=$1} END {printf "%.3f", s*1000/NR}')
    printf '%-8s manifest GET (keep-alive)    %6s ms per request (mean of 200)\n' "$name" "$t"
  done
}

target/release/dockside serve --listen 127.0.0.1:0 --data "$work/native" 2> "$work/native.log" &
pids+=($!)
run native "http://$(wait_addr "$work/native.log")"

mkdir -p "$work/wasi"
"$wt_dir/wasmtime" serve -Scli --dir "$work/wasi::/data" --addr 127.0.0.1:0 \
  target/wasi-http/wasm32-wasip2/release/dockside.wasm 2> "$work/wasi.log" &
pids+=($!)
run wasmtime "http://$(wait_addr "$work/wasi.log")"
