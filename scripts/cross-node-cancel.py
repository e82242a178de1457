#!/usr/bin/env python3
"""Cross-node cancel latency: two `baton serve` nodes on one PostgreSQL database (ports 7601,
7602) with the command agent of scripts/cross-node-cancel.toml; a task runs on 7601, and a cancel
sent to either node is timed until the agent process is gone. See BENCHMARKS.md."""
import json, os, time, urllib.request
def post(port, path, body):
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST", headers={"content-type":"application/json"})
    return json.load(urllib.request.urlopen(r))
local, remote = [], []
for i in range(40):
    try: os.remove("/tmp/xc.pid")
    except FileNotFoundError: pass
    post(7601, "/v1/sessions/xc/messages", {"content": "x"})
    deadline = time.time() + 10
    while not os.path.exists("/tmp/xc.pid") or not open("/tmp/xc.pid").read().strip():
        assert time.time() < deadline; time.sleep(0.002)
    pid = int(open("/tmp/xc.pid").read())
    time.sleep(0.05)
    port = 7602 if i % 2 == 0 else 7601
    t0 = time.time()
    post(port, "/v1/sessions/xc/cancel", {})
    def alive():
        try: return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
        except (FileNotFoundError, ProcessLookupError): return False
    while alive():
        assert time.time() < t0 + 10; time.sleep(0.001)
    (remote if port == 7602 else local).append((time.time() - t0) * 1000)
for name, xs in (("cancel on the task's node", local), ("cancel on another node", remote)):
    xs.sort(); print(f"{name}: n={len(xs)} p50={xs[len(xs)//2]:.1f} ms max={xs[-1]:.1f} ms")
