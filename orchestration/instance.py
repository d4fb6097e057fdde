"""The Dagster instance, created safely when several processes start at once (issue 17, finding 6).

A fresh `$DAGSTER_HOME` is initialised (SQLite storages, alembic migrations) by the first process that opens it; two
processes doing so at once crash with alembic errors. `ensure_instance()` opens the instance under an exclusive file
lock in `$DAGSTER_HOME`, so exactly one process initialises it and the others find it ready. `make setup` calls it
(`python -m orchestration.instance`) before the webserver, daemon or `zq nightly` start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import dagster as dg

LOCK_NAME = ".zq-instance.lock"


def ensure_instance() -> dg.DagsterInstance:
    """`DagsterInstance.get()` with its storages created under a lock: safe under concurrent starts."""
    if not os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()  # Dagster's own error (or an ephemeral instance) without a home
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = dg.DagsterInstance.get()
            instance.get_runs(limit=1)  # touch run, event log and schedule storages: created and migrated here
            instance.event_log_storage.get_concurrency_keys()
            instance.schedule_storage and instance.schedule_storage.all_instigator_state()  # noqa: B018
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return instance


if __name__ == "__main__":
    print(f"Dagster instance ready: {ensure_instance().root_directory}")
