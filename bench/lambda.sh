#!/usr/bin/env bash
# Times the Lambda function (dockside-lambda) under `cargo lambda watch` with blobs in a local
# Garage and keys in Redis: start to first answer (emulator, `cargo run` of the built function,
# store checks), a blob of MIB MiB (default 64) pushed in 4 MiB PATCHes (the function's request
# cap) and pulled back streamed, and manifest GETs. Run .ci/lambda once first (cargo-lambda,
# Garage, the debug build); a release build of the function measures the function, not the
# debug profile: `cargo build --release --features lambda --bin dockside-lambda` and RELEASE=1.
# Usage: bench/lambda.sh [rounds]   (env: MIB, RELEASE, DOCKSIDE_GARAGE)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mib=${MIB:-64}
chunk=$((4 * 1024 * 1024))
cache="${DOCKSIDE_CI_CACHE:-$HOME/.cache/dockside-ci}"
export PATH="$cache/cargo-lambda-1.9.2/bin:$PATH"
garage=${DOCKSIDE_GARAGE:-$cache/garage-2.5.0/bin/garage}
redis_server=$(command -v valkey-server || command -v redis-server)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  sleep 0.5; rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
now() { date +%s.%N; }

rpc=$(free_port); s3=$(free_port); admin=$(free_port)
cat >"$work/garage.toml" <<TOML
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
access=GK$(hex 12); secret=$(hex 32)
GARAGE_DEFAULT_ACCESS_KEY=$access GARAGE_DEFAULT_SECRET_KEY=$secret GARAGE_DEFAULT_BUCKET=bench \
  setsid "$garage" -c "$work/garage.toml" server --single-node --default-bucket >"$work/garage.log" 2>&1 &
pids+=($!)
until curl -sf -o /dev/null "http://127.0.0.1:$admin/health"; do sleep 0.1; done
redis_port=$(free_port)
setsid "$redis_server" --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)

head -c $((mib * 1024 * 1024)) /dev/urandom > "$work/blob"
split -b "$chunk" -d -a 4 "$work/blob" "$work/part."
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
config='{"architecture":"amd64","os":"linux"}'
printf '%s' "$config" > "$work/config"
config_digest="sha256:$(sha256sum "$work/config" | cut -d' ' -f1)"
manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
  "$config_digest" "${#config}" "$digest" $((mib * 1024 * 1024)))

release=(); [[ -n "${RELEASE:-}" ]] && release=(--release)
# The function's own cold start: process start until it has opened and checked both stores and
# asks the Runtime API for work (here a closed port, so it stops right after).
bin=target/$([[ -n "${RELEASE:-}" ]] && echo release || echo debug)/dockside-lambda
for _ in 1 2 3; do
  t=$(now)
  DOCKSIDE_KV=redis://127.0.0.1:$redis_port DOCKSIDE_BLOBS="s3://bench?endpoint=http://127.0.0.1:$s3&region=garage" \
    DOCKSIDE_S3_ACCESS_KEY=$access DOCKSIDE_S3_SECRET_KEY=$secret AWS_LAMBDA_RUNTIME_API=127.0.0.1:1 \
    AWS_LAMBDA_FUNCTION_NAME=bench AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128 AWS_LAMBDA_FUNCTION_VERSION=1 \
    "$bin" >"$work/init.log" 2>&1 || true
    grep -q ready "$work/init.log" || { cat "$work/init.log" >&2; exit 1; }
  printf 'function init (%s: stores opened and checked)   %5.0f ms\n' "$bin" "$(echo "($(now) - $t) * 1000" | bc -l)"
done
port=$(free_port)
base=http://127.0.0.1:$port
t0=$(now)
DOCKSIDE_KV=redis://127.0.0.1:$redis_port DOCKSIDE_BLOBS="s3://bench?endpoint=http://127.0.0.1:$s3&region=garage" \
  DOCKSIDE_S3_ACCESS_KEY=$access DOCKSIDE_S3_SECRET_KEY=$secret DOCKSIDE_BLOB_REDIRECT_MIN_BYTES=$((1 << 40)) \
  setsid cargo lambda watch --ignore-changes --quiet -A 127.0.0.1 -P "$port" "${release[@]}" \
  --features lambda --bin dockside-lambda >"$work/watch.log" 2>&1 &
pids+=($!)
until curl -s -o /dev/null "$base/v2/"; do sleep 0.02; done
printf 'cargo lambda watch start to first answer (emulator, cargo run, init)  %6.2f s\n' "$(echo "$(now) - $t0" | bc -l)"

for r in $(seq "$rounds"); do
  repo="bench/r$r"
  curl -sf -o /dev/null -X POST --data-binary @"$work/config" "$base/v2/$repo/blobs/uploads/?digest=$config_digest"
  t=$(now)
  loc=$(curl -sf -D - -o /dev/null -X POST "$base/v2/$repo/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  off=0
  for p in "$work"/part.*; do
    n=$(stat -c %s "$p")
    loc=$(curl -sf -D - -o /dev/null -X PATCH -H 'content-type: application/octet-stream' \
      -H "content-range: $off-$((off + n - 1))" --data-binary @"$p" "$base$loc" \
      | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
    off=$((off + n))
  done
  sep='?'; [[ $loc == *\?* ]] && sep='&'
  curl -sf -o /dev/null -X PUT "$base$loc${sep}digest=$digest"
  t=$(echo "$(now) - $t" | bc -l)
  printf 'push %d MiB in 4 MiB PATCHes   %6.2f s  %6.1f MiB/s\n' "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
  t=$(curl -sf -o "$work/pulled" -w '%{time_total}' "$base/v2/$repo/blobs/$digest")
  cmp -s "$work/pulled" "$work/blob" || { echo "pulled blob differs" >&2; exit 1; }
  printf 'pull %d MiB (streamed)         %6.2f s  %6.1f MiB/s\n' "$mib" "$t" "$(echo "$mib / $t" | bc -l)"
  curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
    --data "$manifest" "$base/v2/$repo/manifests/latest"
  urls=(); for _ in $(seq 20); do urls+=("$base/v2/$repo/manifests/latest"); done
  total=$(curl -sf -o /dev/null -w '%{time_total}\n' -H 'accept: application/vnd.oci.image.manifest.v1+json' "${urls[@]}" \
    | awk '{s+=$1} END {printf "%.1f", s/NR*1000}')
  printf 'manifest GET (mean of 20, keep-alive)   %s ms\n' "$total"
done
