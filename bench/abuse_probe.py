"""Issue-12 expensive-input probes against a running `worldserve serve` (Linux): the status each gets,
the time to answer and the server's RSS / peak RSS after each.

    worldserve serve --http-port 18123 --grpc-port 18124 &
    python bench/abuse_probe.py $! http://127.0.0.1:18123 127.0.0.1:18124
"""

import concurrent.futures as cf
import sys
import time

import grpc
import httpx

pid, http, g = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def rss():
    with open(f"/proc/{pid}/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith(("VmHWM", "VmRSS")):
            print("  ", line.strip())


rss()
ch = grpc.insecure_channel(g, options=[("grpc.max_send_message_length", 1 << 30)])
predict = ch.unary_unary("/worldserve.v1.WorldModelService/Predict")
for name, body in (("grpc 16MB empty context frames", b"\x0a\x04tiny" + b"\x12\x00" * ((16 << 20) // 2 - 64)),
                   ("grpc 63MB empty context frames", b"\x0a\x04tiny" + b"\x12\x00" * ((63 << 20) // 2))):
    t = time.time()
    try:
        predict(body, timeout=120)
    except grpc.RpcError as e:
        print(name, e.code().name, (e.details() or "")[:70], f"{time.time() - t:.2f}s")
    rss()
body = b'{"context": [], "candidates": [' + b"[]," * ((16 << 20) // 3 - 20) + b"[]]}"
t = time.time()
with cf.ThreadPoolExecutor(3) as ex:
    rs = list(ex.map(lambda _: httpx.post(http + "/v1/models/tiny/rollouts", content=body, timeout=60,
                                          headers={"content-type": "application/json"}), range(3)))
print("rest 3 x 16MB empty candidates", [r.status_code for r in rs], f"{time.time() - t:.2f}s")
rss()


def chunks():
    for _ in range(200):
        yield b" " * (1 << 20)


t = time.time()
r = httpx.post(http + "/v1/models/tiny/rollouts", content=chunks(), headers={"content-type": "application/json"},
               timeout=60)
print("rest 200MB chunked", r.status_code, f"{time.time() - t:.2f}s")
rss()
t = time.time()
print("healthz", httpx.get(http + "/healthz").status_code, f"{time.time() - t:.3f}s")
