#!/usr/bin/env python3
"""A city's existing permit registry: an ordinary HTTP program, not WebAssembly.

Maru runs it as a supervised process service. Like real legacy systems it loads its data
before it listens, so an instance takes a while to become ready (STARTUP_MS, default 1500).

Endpoints:
  GET /permits            list permits (JSON)
  GET /permits/<id>       one permit
  GET /healthz            200 once loaded (used as the readiness and liveness probe)
  GET /permits/crash      exit at once with status 3 (for tests and demos of healing)
  GET /permits/hang       stop answering anything, health checks included (a hung process)

Environment: PORT (set by Maru), STARTUP_MS, CRASH_AT_START=1 (exit during start-up, to
show crash-loop detection), WORK_MS (CPU per request), WAIT_MS (time per request without
CPU, like waiting on a database).
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUNG = threading.Event()


def load_permits():
    """Stands in for reading a database or files at start-up."""
    time.sleep(int(os.environ.get("STARTUP_MS", "1500")) / 1000)
    if os.environ.get("CRASH_AT_START") == "1":
        print("cannot open the permit database", file=sys.stderr, flush=True)
        sys.exit(2)
    streets = ["Hangang-daero", "Sejong-daero", "Jong-ro", "Teheran-ro", "Eulji-ro"]
    return {
        str(n): {"id": n, "kind": "street-vendor" if n % 3 else "event", "street": streets[n % len(streets)]}
        for n in range(1, 501)
    }


PERMITS = load_permits()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, body):
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if HUNG.is_set():
            time.sleep(3600)
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/healthz":
            return self.answer(200, {"status": "ok", "pid": os.getpid()})
        if path.endswith("/headers"):
            return self.answer(200, {k.lower(): v for k, v in self.headers.items()})
        if path.endswith("/environment"):
            return self.answer(200, {"names": sorted(os.environ)})
        if path.endswith("/crash"):
            print(f"pid {os.getpid()} crashing on request", file=sys.stderr, flush=True)
            os._exit(3)
        if path.endswith("/hang"):
            print(f"pid {os.getpid()} hanging on request", file=sys.stderr, flush=True)
            HUNG.set()
            time.sleep(3600)
            return
        work = int(os.environ.get("WORK_MS", "0")) / 1000
        until = time.monotonic() + work
        while time.monotonic() < until:
            pass
        wait = int(os.environ.get("WAIT_MS", "0")) / 1000
        if wait > 0:
            time.sleep(wait)
        parts = path.split("/")
        if len(parts) >= 3 and parts[-1].isdigit():
            permit = PERMITS.get(parts[-1])
            return self.answer(200 if permit else 404, permit or {"error": "no such permit"})
        return self.answer(200, {"pid": os.getpid(), "count": len(PERMITS), "permits": list(PERMITS.values())[:10]})


def main():
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"permit registry pid {os.getpid()} listening on {port} with {len(PERMITS)} permits", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
