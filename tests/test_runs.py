"""A run whose process is killed (kill -9) does not stay STARTED holding its pool slot: the next `zq nightly` start
(`sweep_orphaned_runs`) marks it failed and frees the slot; a live process's run is left alone (issue 17, finding 1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from orchestration.runs import PID_TAG, process_alive, process_tags, sweep_orphaned_runs

REPO = Path(__file__).resolve().parents[1]
POOL = "zq_test_pool"
WAIT_S = 240  # generous bound on a condition, never a fixed sleep

WORKER = textwrap.dedent(f"""
    import sys, time
    from pathlib import Path
    import dagster as dg
    from orchestration.runs import process_tags

    marker = Path(sys.argv[1])

    @dg.op(pool={POOL!r})
    def hold_the_pool():
        marker.write_text("holding")
        time.sleep(3600)

    @dg.job
    def long_night():
        hold_the_pool()

    long_night.execute_in_process(instance=dg.DagsterInstance.get(), tags=process_tags())
""")


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def instance_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def claimed(instance: dg.DagsterInstance) -> int:
    return len(instance.event_log_storage.get_concurrency_info(POOL).claimed_slots)


def test_a_killed_in_process_run_is_marked_failed_and_its_pool_slot_freed(instance_home, tmp_path):
    marker = tmp_path / "holding"
    env = {**os.environ, "DAGSTER_HOME": str(instance_home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(marker)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, "the run to hold its pool slot")
        with dg.DagsterInstance.get() as instance:
            [run] = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.STARTED and run.tags[PID_TAG] == str(proc.pid)
            assert sweep_orphaned_runs(instance) == []  # its process is alive: left alone
            assert claimed(instance) == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=WAIT_S)
            # before the sweep (today's behaviour): STARTED forever, slot held
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
            assert claimed(instance) == 1
            assert sweep_orphaned_runs(instance) == [run.run_id]
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
            assert claimed(instance) == 0
            assert sweep_orphaned_runs(instance) == []  # once only
    finally:
        if proc.poll() is None:
            proc.kill()


def test_process_identity_survives_pid_reuse():
    tags = process_tags()
    assert process_alive(os.getpid(), tags["zq/proc_start"])
    assert not process_alive(os.getpid(), str(int(tags["zq/proc_start"]) + 1))  # same pid, another process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not process_alive(dead.pid, "")
