"""`saelab app` as a real server for the tests that talk to it over HTTP (a browser, a wheel install)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(sae, env=None, cwd=None, wait_s: float = 120):
    """Run ``python -m saelab app --sae SAE`` on a free port until the block ends; yields (url, the process).
    The server is up once its health endpoint answers; a server that exits first fails with its output."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "saelab", "app", "--sae", str(sae), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if server.poll() is not None:
                    raise AssertionError(f"saelab app exited: {server.stdout.read()}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"saelab app did not answer on {url} within {wait_s:.0f} s") from None
                time.sleep(0.5)
        yield url, server
    finally:
        os.kill(server.pid, signal.SIGTERM)  # `saelab app` execs streamlit: this PID is the server
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
