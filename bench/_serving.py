"""Start an `slm serve` process on a free port for a benchmark; wait until /health answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def start_server(model: str, *options: str) -> tuple[subprocess.Popen, str]:
    """``slm serve MODEL --port P OPTIONS...``; returns the process and its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slmkit", "serve", model, "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"slm serve did not start: {' '.join(cmd)}")
