"""Read a warehouse file from outside a run (the CLI's `zq trace`, `zq issues sync`): read-only, waiting politely.

DuckDB lets a reader in one process and the writer in another collide: while a nightly step holds the file, opening
it read-only fails with "Could not set lock". The CLI does not fight the run: it waits, with growing pauses, up to
``ZQ_CLI_LOCK_WAIT_SECONDS`` (default 900), saying so once on stderr, and then opens the file read-only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import duckdb

WAIT_ENV = "ZQ_CLI_LOCK_WAIT_SECONDS"


def connect_read_only(path: Path | str, wait_seconds: float | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to `path`, waiting while another process writes it (bounded; then the lock error)."""
    bound = float(os.environ.get(WAIT_ENV) or 900) if wait_seconds is None else wait_seconds
    deadline, delay, told = time.monotonic() + bound, 0.2, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() + delay > deadline:
                raise
            if not told:
                print(f"数据库 {Path(path).name} 正由运行中的作业写入，等待其完成（最多 {bound:.0f} 秒）… "
                      f"waiting for the running step to release it", file=sys.stderr)
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
