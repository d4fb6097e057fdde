"""A throwaway PostgreSQL server on loopback for the tests (Debian's `postgresql` package; `make test` installs it).

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user the package creates. The server
listens on a free 127.0.0.1 port with trust authentication for loopback only, and is stopped at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def pg_bin() -> str | None:
    """The newest PostgreSQL server's bin folder, or None when no server is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@contextmanager
def postgres_server(timeout: float = 120.0) -> Iterator[str]:
    """Start a PostgreSQL server; yields the SQLAlchemy URL of its database `zq`."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server not installed (apt-get install postgresql; `make test` does it as root)")
    owner = "postgres" if os.geteuid() == 0 else None
    base = tempfile.mkdtemp(prefix="zq-pg-")
    data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
    os.makedirs(sock)
    if owner:
        shutil.chown(base, owner)
        shutil.chown(sock, owner)
    port = _free_port()
    subprocess.run(_as_owner([f"{bindir}/initdb", "-D", data, "-U", "zq", "--auth=trust", "-E", "UTF8",
                              "--no-instructions"], owner), check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
    subprocess.run(_as_owner([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(base, "log"), "-w",
                              "-t", str(int(timeout)), "start"], owner), check=True, capture_output=True)
    try:
        deadline = time.monotonic() + timeout
        while subprocess.run(_as_owner([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "zq", "zq"],
                                       owner), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {port} did not accept connections")
            time.sleep(0.5)
        yield f"postgresql+psycopg2://zq@127.0.0.1:{port}/zq"
    finally:
        subprocess.run(_as_owner([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], owner),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
