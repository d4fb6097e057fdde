"""Runs end in a true state: a run executed in a process that died (kill -9, OOM, a lost machine) is marked failed.

`zq nightly` executes its runs in its own process (`execute_in_process`), where the daemon's run monitoring cannot see
the worker. Each such run is tagged with the host, pid and the process's start time (so a reused pid is not mistaken
for it); `sweep_orphaned_runs` — called when `zq nightly` starts and by the alert sensor — marks every STARTING/STARTED
run of this host whose process is gone as FAILURE and frees the pool slots it held, so later runs do not wait on a dead
one and the sensor's cursor moves on.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg

HOST_TAG, PID_TAG, PROC_START_TAG = "zq/host", "zq/pid", "zq/proc_start"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces or parentheses: split after its closing parenthesis
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags naming this process, for runs it executes itself."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PROC_START_TAG: _proc_start(os.getpid()) or ""}


def process_alive(pid: int, start: str) -> bool:
    current = _proc_start(pid)
    return current is not None and (not start or current == start)


def sweep_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark the in-process runs of this host whose process is gone as failed and free their pool slots; their ids."""
    host = socket.gethostname()
    runs = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED], tags={HOST_TAG: host}))
    swept = []
    for run in runs:
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or process_alive(int(pid), run.tags.get(PROC_START_TAG, "")):
            continue
        instance.report_run_failed(run, message=(
            f"运行所在进程已不存在（pid {pid}，{host}），标记为失败 (the process executing this run is gone: "
            "killed or crashed; rerun the partition)"))
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        swept.append(run.run_id)
    return swept


def run_executes(context: object, *step_names: str) -> bool:
    """Whether the step's run executes any of ``step_names``: its job has the step and the run's step selection,
    when it has one, names it (a step preparing something a later step of the same run uses)."""
    steps, job = context.run.step_keys_to_execute, context.job_def  # type: ignore[attr-defined]
    return any(job.has_node_named(name) and (steps is None or name in steps) for name in step_names)
