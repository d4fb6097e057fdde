"""A throwaway S3-protocol server on loopback (``moto_server`` from the venv) for the tests of the S3 path."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def moto_executable() -> Path | None:
    exe = Path(sys.executable).parent / "moto_server"
    return exe if exe.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(start_timeout: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``moto_server`` on a free loopback port; yields (``host:port``, process); killed on exit."""
    exe = moto_executable()
    if exe is None:
        raise RuntimeError("moto_server not installed in the venv (make setup installs moto[server])")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
