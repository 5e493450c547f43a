#!/usr/bin/env bash
# Times the same requests against the native server, the wasi:http component under
# `wasmtime serve`, and the Spin component under `spin up` (on Spin's SQLite key-value store and
# on Redis): start to first answer, a blob of MIB MiB (default 256) pushed in one POST and pulled
# back, and manifest GETs. Prints one line per figure. Needs a release build (cargo build
# --release), both components, wasmtime (run .ci/edge once first), the Spin CLI and a Redis
# server (.ci/spin). Ends with SHA-256 rates natively and inside Wasm (bench/sha256-rate), the
# bound of a push through a component. Usage: bench/edge-vs-native.sh [rounds]
# (env: MIB, DOCKSIDE_SPIN)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mib=${MIB:-256}
wt_dir=$(python3 -c 'import wasmtime_cli, os; print(os.path.dirname(wasmtime_cli.__file__))')
spin=${DOCKSIDE_SPIN:-$( [ -f ../shared/tools/spin ] && echo ../shared/tools/spin || echo /work/shared/tools/spin )}
redis_server=$(command -v valkey-server || command -v redis-server)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  sleep 0.5; rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
# Seconds from $1 (a `now`) until GET $2/v2/ answers.
until_answers() {
  until curl -s -o /dev/null "$2/v2/"; do sleep 0.01; done
  echo "$(now) - $1" | bc -l
}

head -c $((mib * 1024 * 1024)) /dev/urandom > "$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
config='{"architecture":"amd64","os":"linux"}'
printf '%s' "$config" > "$work/config"
config_digest="sha256:$(sha256sum "$work/config" | cut -d' ' -f1)"
manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
  "$config_digest" "${#config}" "$digest" $((mib * 1024 * 1024)))

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
    printf '%-12s push %d MiB (single POST)   %6.3f s  %7.1f MiB/s\n' "$name" "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
    t=$(curl -sf -o /dev/null -w '%{time_total}' "$base/v2/$repo/blobs/$digest")
    printf '%-12s pull %d MiB                 %6.3f s  %7.1f MiB/s\n' "$name" "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
    curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
      --data "$manifest" "$base/v2/$repo/manifests/latest"
    args=()
    for _ in $(seq 200); do args+=(-o /dev/null "$base/v2/$repo/manifests/latest"); done
    t=$(curl -sf -w '%{time_total}\n' "${args[@]}" | awk '{s+=$1} END {printf "%.3f", s*1000/NR}')
    printf '%-12s manifest GET (keep-alive)    %6s ms per request (mean of 200)\n' "$name" "$t"
    t=$(for _ in $(seq 100); do curl -sf -o /dev/null -w '%{time_total}\n' "$base/v2/$repo/manifests/latest"; done |
      awk '{s+=$1} END {printf "%.3f", s*1000/NR}')
    printf '%-12s manifest GET (new connection) %5s ms per request (mean of 100)\n' "$name" "$t"
  done
}

t0=$(now)
target/release/dockside serve --listen 127.0.0.1:0 --data "$work/native" 2> "$work/native.log" &
pids+=($!)
base="http://$(wait_addr "$work/native.log")"
printf '%-12s start to first answer        %6.3f s\n' native "$(until_answers "$t0" "$base")"
run native "$base"

mkdir -p "$work/wasi"
t0=$(now)
"$wt_dir/wasmtime" serve -Scli --dir "$work/wasi::/data" --addr 127.0.0.1:0 \
  target/wasi-http/wasm32-wasip2/release/dockside.wasm 2> "$work/wasi.log" &
pids+=($!)
base="http://$(wait_addr "$work/wasi.log")"
printf '%-12s start to first answer        %6.3f s\n' wasmtime "$(until_answers "$t0" "$base")"
run wasmtime "$base"

spin_up() { # name, extra args...
  local name=$1; shift
  local port; port=$(free_port)
  mkdir -p "$work/$name"
  t0=$(now)
  setsid "$spin" up --from spin.toml --listen "127.0.0.1:$port" --state-dir "$work/$name" "$@" \
    > "$work/$name.log" 2>&1 &
  pids+=($!)
  printf '%-12s start to first answer        %6.3f s\n' "$name" "$(until_answers "$t0" "http://127.0.0.1:$port")"
  base="http://127.0.0.1:$port"
}
# Without Wasmtime's compilation cache (a new machine), then with it (any later start).
spin_up spin-nocache --disable-cache
kill -TERM -- "-${pids[-1]}"
spin_up spin-sqlite
run spin-sqlite "$base"
redis_port=$(free_port)
setsid "$redis_server" --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$work" \
  > "$work/redis.log" 2>&1 &
pids+=($!)
printf '[key_value_store.default]\ntype = "redis"\nurl = "redis://127.0.0.1:%s"\n' "$redis_port" > "$work/rc.toml"
spin_up spin-redis --runtime-config-file "$work/rc.toml"
run spin-redis "$base"
# Larger chunk values: fewer key-value writes (on SQLite, fewer transactions and fsyncs).
spin_up spin-sqlite-4m --variable chunk_bytes=4194304
run spin-sqlite-4m "$base"

# What bounds a push through a component: the upload path hashes every byte with SHA-256, and
# inside Wasm there are no SHA instructions. The same hasher, same machine, same run.
cargo build -q --release --manifest-path bench/sha256-rate/Cargo.toml
cargo build -q --release --manifest-path bench/sha256-rate/Cargo.toml --target wasm32-wasip2
printf '%-12s SHA-256 of %d MiB            %s\n' native "$mib" "$(bench/sha256-rate/target/release/sha256-rate "$mib")"
printf '%-12s SHA-256 of %d MiB            %s\n' wasm "$mib" \
  "$("$wt_dir/wasmtime" run bench/sha256-rate/target/wasm32-wasip2/release/sha256-rate.wasm "$mib")"

for f in target/wasm32-wasip2/release/dockside.wasm target/wasi-http/wasm32-wasip2/release/dockside.wasm; do
  printf '%-55s %6d KiB\n' "$f" $(( $(stat -c %s "$f") / 1024 ))
done
