#!/usr/bin/env python3
"""Time from the last byte of a monolithic push to its 201: what the fsync before the rename
costs after the body has arrived (the writeback started as the blob arrives, hosts/fs_write.rs,
shrinks it to the tail).

usage: bench/push-tail.py PORT MIB SEED   (a dockside listening on 127.0.0.1:PORT)
Prints send_s (sending the body), tail_s (last byte to the answer) and the overall MB/s.
"""
import hashlib, socket, sys, time, json
port = int(sys.argv[1]); mib = int(sys.argv[2]); seed = sys.argv[3]
block = hashlib.sha256(seed.encode()).digest() * (1 << 15)  # 1 MiB
h = hashlib.sha256()
for i in range(mib):
    h.update(i.to_bytes(8, 'little') + block[8:])
digest = "sha256:" + h.hexdigest()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(f"POST /v2/tail/r/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {mib << 20}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
t0 = time.monotonic()
for i in range(mib):
    s.sendall(i.to_bytes(8, 'little') + block[8:])
t1 = time.monotonic()
resp = s.recv(4096)
t2 = time.monotonic()
status = resp.split(b" ")[1].decode()
print(json.dumps({"status": status, "send_s": round(t1 - t0, 3), "tail_s": round(t2 - t1, 3), "total_MBps": round((mib << 20) / 1e6 / (t2 - t0), 1)}))
