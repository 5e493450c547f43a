#!/usr/bin/env bash
# What TLS costs a push and a pull: the release `dockside serve` on plain HTTP and on HTTPS, a
# blob of SIZE_MIB pushed in one POST and pulled in one GET by curl (HTTP/1.1, then HTTP/2 by
# ALPN), RUNS times each; prints the median seconds and MB/s. Not part of CI (the figures depend
# on the machine and what else runs on it): see README, "Running in production".
#
#   cargo build --release && bash bench/tls.sh        # SIZE_MIB=512 RUNS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB="${SIZE_MIB:-512}"
RUNS="${RUNS:-3}"
bin=target/release/dockside
[[ -x "$bin" ]] || { echo "build it first: cargo build --release" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl is needed for the test certificate" >&2; exit 1; }

work=$(mktemp -d /tmp/dockside-tls-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"

# start NAME ARGS...: a server in its own data directory; sets $url.
start() {
  local name=$1; shift
  "$bin" serve --listen 127.0.0.1:0 --data "$work/$name" --no-fsync "$@" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    url=$(sed -n 's/.*listening on \(https\?:\/\/[0-9.:]*\).*/\1/p' "$work/$name.log")
    [[ -n "$url" ]] && return
    sleep 0.1
  done
  cat "$work/$name.log" >&2; exit 1
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# measure LABEL URL CURL-ARGS...: RUNS pushes (each into a fresh repository) and pulls.
measure() {
  local label=$1 url=$2; shift 2
  local push=() pull=()
  for i in $(seq 1 "$RUNS"); do
    push+=("$(curl -sS -o /dev/null -w '%{time_total}' "$@" -X POST \
      -H 'content-type: application/octet-stream' --data-binary @"$work/blob" \
      "$url/v2/bench/$label-$i/blobs/uploads/?digest=$digest")")
    pull+=("$(curl -sS -o /dev/null -w '%{time_total}' "$@" "$url/v2/bench/$label-$i/blobs/$digest")")
  done
  local p q
  p=$(printf '%s\n' "${push[@]}" | median)
  q=$(printf '%s\n' "${pull[@]}" | median)
  awk -v l="$label" -v p="$p" -v q="$q" -v m="$SIZE_MIB" \
    'BEGIN {printf "%-14s push %6.2f s (%5.0f MB/s)   pull %6.2f s (%5.0f MB/s)\n", l, p, m*1.048576/p, q, m*1.048576/q}'
}

start plain
measure http "$url" --http1.1
start tls --tls-cert "$work/cert.pem" --tls-key "$work/key.pem"
measure https-h1 "$url" --cacert "$work/cert.pem" --http1.1
measure https-h2 "$url" --cacert "$work/cert.pem" --http2
echo "($SIZE_MIB MiB, median of $RUNS, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
