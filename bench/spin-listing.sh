#!/usr/bin/env bash
# What one page of a listing costs under `spin up` (SQLite store) as the store fills with blob
# chunks: a tags list, the catalog and a referrers list, timed with an empty store, then after
# KEYS (default 10 000) chunk keys are added the way the component stores blob chunks
# (`kvblob/chunk/<nonce>/<index>` rows of 1 KiB in Spin's SQLite file; pushing 10 000 real
# chunks would take 10 GiB). Spin's key-value API lists every key of a store, so a listing that
# reads the store grows with the chunks; one that reads an index (src/hosts/indexed.rs) does not.
#
# Usage: bench/spin-listing.sh [component.wasm]   (default: the one `spin build` makes; give an
# older build to compare). Env: KEYS, DOCKSIDE_SPIN. Needs the Spin CLI, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
wasm=$(realpath "${1:-target/wasm32-wasip2/release/dockside.wasm}")
keys=${KEYS:-10000}
spin=${DOCKSIDE_SPIN:-$( [ -f ../shared/tools/spin ] && echo ../shared/tools/spin || echo /work/shared/tools/spin )}
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null; sleep 0.3; rm -rf "$work"; }
trap cleanup EXIT
# The project's manifest, pointed at the component to measure.
sed "s|^source = .*|source = \"$wasm\"|; /^\[component.dockside.build\]/,\$d" spin.toml > "$work/spin.toml"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
setsid "$spin" up --from "$work/spin.toml" --listen "127.0.0.1:$port" --state-dir "$work/state" \
  > "$work/spin.log" 2>&1 &
pid=$!
until curl -s -o /dev/null "$base/v2/"; do sleep 0.05; done

# A config blob, an image manifest tagged v1 and a referrer to it.
config='{"architecture":"amd64","os":"linux"}'
cd_=sha256:$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
curl -sf -o /dev/null -X POST --data-binary "$config" "$base/v2/bench/app/blobs/uploads/?digest=$cd_"
m=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[]}' "$cd_" "${#config}")
md=sha256:$(printf '%s' "$m" | sha256sum | cut -d' ' -f1)
curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data "$m" "$base/v2/bench/app/manifests/v1"
r=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/x.bench","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d}}' "$md" "${#m}")
curl -sf -o /dev/null -X POST --data-binary '{}' "$base/v2/bench/app/blobs/uploads/?digest=sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data "$r" "$base/v2/bench/app/manifests/r1"

# Each GET on a new connection: keep-alive GETs on Spin's SQLite store wait ~40 ms each for
# reasons of Spin's own (README, "Measured"), which would hide the listing's cost.
page() { # what, path: mean of 50 GETs, in ms
  printf '  %-12s %8.2f ms per page (mean of 50)\n' "$1" \
    "$(for _ in $(seq 50); do curl -sf -o /dev/null -w '%{time_total}\n' "$base$2"; done |
      awk '{s+=$1} END {print s*1000/NR}')"
}
measure() {
  page "tags list" "/v2/bench/app/tags/list?n=100"
  page "catalog" "/v2/_catalog?n=100"
  page "referrers" "/v2/bench/app/referrers/$md"
}
echo "component $wasm ($(( $(stat -c %s "$wasm") / 1024 )) KiB)"
echo "store with no chunk keys:"
measure
python3 - "$work/state/sqlite_key_value.db" "$keys" <<'PY'
import os, sqlite3, sys
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db, timeout=30)
nonce = os.urandom(12).hex()
c.executemany("INSERT INTO spin_key_value (store, key, value) VALUES ('default', ?, ?)",
              ((f"kvblob/chunk/{nonce}/{i:08}", os.urandom(1024)) for i in range(n)))
c.commit()
PY
echo "store with $keys chunk keys:"
measure
