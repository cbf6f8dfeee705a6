#!/usr/bin/env python3
"""Latency probe: sends PING to 127.0.0.1:PORT as fast as it can (one at a time)
until STOPFILE exists; prints "max_ms p99_ms p50_ms samples" at the end."""
import os
import socket
import sys
import time

port, stopfile = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
while not os.path.exists(stopfile):
    t = time.perf_counter()
    s.sendall(b"PING\r\n")
    buf = b""
    while not buf.endswith(b"\r\n"):
        buf += s.recv(64)
    samples.append((time.perf_counter() - t) * 1000.0)
    time.sleep(0.0005)
samples.sort()
n = len(samples)
if n == 0:
    print("0 0 0 0")
else:
    print(f"{samples[-1]:.2f} {samples[int(n * 0.99) - 1 if n > 1 else 0]:.2f} {samples[n // 2]:.3f} {n}")
