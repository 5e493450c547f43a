#!/usr/bin/env bash
# Time to first byte and to the whole body of a cold blob pulled through the mirror (it streams
# while fetched), then warm, then straight from the upstream: two `dockside serve` on loopback.
# Usage: bench/mirror-ttfb.sh [MiB] (default 256); DOCKSIDE_BIN picks the binary.
set -euo pipefail
# The address a server logged it listens on (waits up to 10 s).
addr_of() { for _ in $(seq 100); do a=$(grep -o '127.0.0.1:[0-9]*' "$1" | head -1 || true); [[ -n $a ]] && { echo "$a"; return; }; sleep 0.1; done; echo "no address in $1" >&2; exit 1; }
BIN=${DOCKSIDE_BIN:-target/release/dockside}
MIB=${1:-256}
T=$(mktemp -d /tmp/dockside-ttfb.XXXX)
head -c $((MIB*1024*1024)) /dev/urandom > $T/blob
D=sha256:$(sha256sum $T/blob | cut -d' ' -f1)
$BIN serve --listen 127.0.0.1:0 --data $T/up > $T/up.log 2>&1 & UP=$!
UPPORT=$(addr_of $T/up.log)
curl -s -o /dev/null -X POST -H 'content-type: application/octet-stream' --data-binary @$T/blob "http://$UPPORT/v2/library/big/blobs/uploads/?digest=$D"
printf '[[upstream]]\nurl = "http://%s"\n' $UPPORT > $T/m.toml
$BIN serve --listen 127.0.0.1:0 --data $T/mirror --mirror-config $T/m.toml > $T/mirror.log 2>&1 & MI=$!
MPORT=$(addr_of $T/mirror.log)
echo "cold:  $(curl -s -o $T/out -w 'first byte %{time_starttransfer} s, whole %{time_total} s' http://$MPORT/v2/library/big/blobs/$D)"
cmp $T/out $T/blob && echo "bytes match"
echo "warm:  $(curl -s -o $T/out -w 'first byte %{time_starttransfer} s, whole %{time_total} s' http://$MPORT/v2/library/big/blobs/$D)"
echo "direct from upstream: $(curl -s -o /dev/null -w 'first byte %{time_starttransfer} s, whole %{time_total} s' http://$UPPORT/v2/library/big/blobs/$D)"
kill $UP $MI; wait $UP $MI 2>/dev/null || true
rm -rf $T
