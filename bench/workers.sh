#!/usr/bin/env bash
# Times the Cloudflare Worker under `wrangler dev --local` (workerd, local R2 and Durable Object)
# as bench/edge-vs-native.sh times the other adapters: start to first answer, a blob of MIB MiB
# (default 256) pushed in one POST (the body cap lifted for the run) and pulled back, and
# manifest GETs. Needs the Worker built and wrangler installed: run .ci/workers once first.
# Usage: bench/workers.sh [rounds]   (env: MIB, DOCKSIDE_WRANGLER)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mib=${MIB:-256}
wrangler=${DOCKSIDE_WRANGLER:-$(ls -d "$HOME"/.cache/dockside-ci/wrangler-*/node_modules/.bin/wrangler | tail -1)}
export WRANGLER_SEND_METRICS=false
[ -d build ] || { echo "build the Worker first (.ci/workers)" >&2; exit 1; }
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null; sleep 0.5; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

head -c $((mib * 1024 * 1024)) /dev/urandom > "$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
config='{"architecture":"amd64","os":"linux"}'
printf '%s' "$config" > "$work/config"
config_digest="sha256:$(sha256sum "$work/config" | cut -d' ' -f1)"
manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
  "$config_digest" "${#config}" "$digest" $((mib * 1024 * 1024)))

# The repository's wrangler.toml without its build step (the Worker is built already).
awk '/^\[/ { skip = ($0 == "[build]") } !skip' wrangler.toml \
  | sed "s|^main = \"\(.*\)\"|main = \"$PWD/\1\"|" > "$work/wrangler.toml"
port=$(free_port)
base="http://127.0.0.1:$port"
t0=$(now)
(cd "$work" && HOME="$work" CI=true exec setsid "$wrangler" dev --config "$work/wrangler.toml" --local \
  --ip 127.0.0.1 --port "$port" --inspector-port "$(free_port)" --persist-to "$work/state" \
  --show-interactive-dev-session=false --var DOCKSIDE_MAX_CHUNK_BYTES:) > "$work/wrangler.log" 2>&1 &
pid=$!
until curl -s -o /dev/null "$base/v2/"; do
  kill -0 "$pid" 2>/dev/null || { cat "$work/wrangler.log" >&2; exit 1; }
  sleep 0.01
done
printf '%-8s start to first answer        %6.3f s\n' workers "$(echo "$(now) - $t0" | bc -l)"
# The first request that reaches the Durable Object and R2 (their first use in this process).
t=$(curl -s -o /dev/null -w '%{time_total}' "$base/v2/bench/warm/tags/list")
printf '%-8s first key-value request       %6.3f s\n' workers "$t"

for r in $(seq "$rounds"); do
  repo="bench/r$r"
  curl -sf -o /dev/null -X POST --data-binary @"$work/config" "$base/v2/$repo/blobs/uploads/?digest=$config_digest"
  t=$(curl -sf -o /dev/null -w '%{time_total}' -X POST -H 'content-type: application/octet-stream' \
    --data-binary @"$work/blob" "$base/v2/$repo/blobs/uploads/?digest=$digest")
  printf '%-8s push %d MiB (single POST)   %6.3f s  %7.1f MiB/s\n' workers "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
  t=$(curl -sf -o /dev/null -w '%{time_total}' "$base/v2/$repo/blobs/$digest")
  printf '%-8s pull %d MiB                 %6.3f s  %7.1f MiB/s\n' workers "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
  curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
    --data "$manifest" "$base/v2/$repo/manifests/latest"
  args=()
  for _ in $(seq 200); do args+=(-o /dev/null "$base/v2/$repo/manifests/latest"); done
  t=$(curl -sf -w '%{time_total}\n' "${args[@]}" | awk '{s+=$1} END {printf "%.3f", s*1000/NR}')
  printf '%-8s manifest GET (keep-alive)    %6s ms per request (mean of 200)\n' workers "$t"
  t=$(for _ in $(seq 100); do curl -sf -o /dev/null -w '%{time_total}\n' "$base/v2/$repo/manifests/latest"; done |
    awk '{s+=$1} END {printf "%.3f", s*1000/NR}')
  printf '%-8s manifest GET (new connection) %5s ms per request (mean of 100)\n' workers "$t"
done
wasm=$(find build -name '*.wasm' | head -1)
printf '%-55s %6d KiB\n' "$wasm" $(( $(stat -c %s "$wasm") / 1024 ))
