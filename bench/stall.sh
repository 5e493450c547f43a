#!/bin/bash
# Latency of manifest GETs (hey, 4 connections, 6 s) while two clients each push three
# 512 MiB blobs: shows whether uploads stall the requests around them.
# usage: bench/stall.sh path/to/dockside PORT   (needs hey: apt-get install hey)
set -u
BIN=$1; PORT=$2; D=$(mktemp -d)
$BIN serve --listen 127.0.0.1:$PORT --data $D/d 2>/dev/null & PID=$!
sleep 0.5
X=sha256:$(printf 'x' | sha256sum | cut -d' ' -f1); E=sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a
curl -s -o /dev/null -X POST --data-binary x "localhost:$PORT/v2/a/blobs/uploads/?digest=$X"
curl -s -o /dev/null -X POST --data-binary '{}' "localhost:$PORT/v2/a/blobs/uploads/?digest=$E"
curl -s -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"a\",\"digest\":\"$E\",\"size\":2},\"layers\":[{\"mediaType\":\"b\",\"digest\":\"$X\",\"size\":1}]}" localhost:$PORT/v2/a/manifests/latest
head -c 536870912 /dev/urandom > $D/big1; head -c 536870912 /dev/urandom > $D/big2
for i in 1 2; do B=$D/big$i; DG=sha256:$(sha256sum $B | cut -d' ' -f1); (for r in 1 2 3; do curl -s -o /dev/null -X POST --data-binary @$B "localhost:$PORT/v2/p$i$r/blobs/uploads/?digest=$DG"; done) & done
sleep 0.3
hey -z 6s -c 4 http://127.0.0.1:$PORT/v2/a/manifests/latest | grep -E "Requests/sec|99% in|Slowest"
wait $(jobs -p | grep -v $PID) 2>/dev/null
kill $PID; rm -rf $D
