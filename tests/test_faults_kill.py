"""kill -9 of `zq nightly` at ingestion, in dbt and in the boundary crossing, then a rerun = an undisturbed run
(issue 17, the fault suite).

Each kill comes once the step has started writing (its DuckDB file's WAL appears or changes after the step's start;
for dbt, once the dbt child runs). The next `zq nightly` marks the killed run failed and frees its pool slot, and the
last rerun's tables equal, row for row, those of a run that was never disturbed. The dbt child dies with its parent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from test_nightly_e2e import DAY, ROWS_PER_DAY, _env, _run, _snapshot

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 900  # generous bound on each condition
KEY = "fault-test-key-not-a-secret-0123456789"


def _zq_env(data_dir: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZQ_")}
    env.update({"DAGSTER_HOME": str(home), "ZQ_DATA_DIR": str(data_dir), "ZQ_STORE_BACKEND": "local",
                "ZQ_PSEUDONYM_KEY": KEY, "ZQ_SIMULATE": "1", "ZQ_SIM_ROWS_PER_DAY": str(ROWS_PER_DAY),
                "ZQ_SIM_DEFECT_RATE": "0.01", "ZQ_SIM_SEED": "7", "PYTHONPATH": str(REPO)})
    return env


def _zq_nightly(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zqdata.cli", "nightly", "--date", DAY.isoformat()], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _started_steps(instance: dg.DagsterInstance) -> list[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="nightly_aggregation"), limit=1)
    if not runs:
        return []
    return [e.dagster_event.step_key for e in instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START)]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _dbt_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if "dbt" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")] if out else []


def _kill_when(proc: subprocess.Popen, home: Path, step_prefix: str, wal: Path | None) -> list[int]:
    """SIGKILL `proc` once a step starting with `step_prefix` has begun writing; returns dbt children seen."""
    deadline = time.monotonic() + WAIT_S
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while not any(s.startswith(step_prefix) for s in _started_steps(instance)):
            assert proc.poll() is None, f"zq nightly ended before {step_prefix} started"
            assert time.monotonic() < deadline, f"{step_prefix} never started"
            time.sleep(0.05)
    children: list[int] = []
    seen = _mtime(wal) if wal else 0.0
    while time.monotonic() < deadline and proc.poll() is None:
        if step_prefix == "gov_dbt_models":
            children = _dbt_children(proc.pid)
            if children:
                time.sleep(1.0)  # let dbt start writing models
                break
        elif _mtime(wal) != seen:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"zq nightly ended before it could be killed in {step_prefix}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_at_ingestion_dbt_and_boundary_then_rerun_equals_an_undisturbed_run(tmp_path, monkeypatch):
    undisturbed = tmp_path / "undisturbed"
    _env(monkeypatch, undisturbed)
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", KEY)
    with dg.instance_for_test() as instance:
        result, summary = _run(DAY, instance)
        assert result.success, summary.checks_failed
    expected = {**_snapshot(undisturbed / "warehouse" / "gov_platform.duckdb"),
                **_snapshot(undisturbed / "warehouse" / "ops_platform.duckdb")}

    data, home = tmp_path / "faulted", tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    env = _zq_env(data, home)
    gov_wal = data / "warehouse" / "gov_platform.duckdb.wal"
    ops_wal = data / "warehouse" / "ops_platform.duckdb.wal"
    faults = 0
    for step, wal in (("gov__ods__", gov_wal), ("gov_dbt_models", None), ("boundary_crossing", ops_wal)):
        children = _kill_when(_zq_nightly(env), home, step, wal)
        faults += 1
        deadline = time.monotonic() + WAIT_S
        while any(_alive(c) for c in children):  # the dbt child dies with the killed step process
            assert time.monotonic() < deadline, "dbt outlived the killed run"
            time.sleep(0.1)
    rerun = _zq_nightly(env)
    assert rerun.wait(timeout=3 * WAIT_S) == 0
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="nightly_aggregation"))
        statuses = sorted(r.status.value for r in runs)
        assert statuses == ["FAILURE"] * faults + ["SUCCESS"], statuses  # no run left STARTED
        assert not instance.event_log_storage.get_concurrency_run_ids()  # every pool slot was given back
    got = {**_snapshot(data / "warehouse" / "gov_platform.duckdb"), **_snapshot(data / "warehouse" / "ops_platform.duckdb")}
    assert got.keys() == expected.keys()
    assert [t for t in expected if got[t] != expected[t]] == []
