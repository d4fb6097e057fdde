"""The platform as a service: `dagster dev` (webserver + daemon + code server), the alert sensor, backfills through the
run queue, and the CLI and consumers working at the same time, with one writer per DuckDB file by construction.

The module starts one `dagster dev` with a PATH that does not contain the venv (as a new user's shell), after two
nights run in-process (`zq nightly`): day A is published (consumers read it), day B is the partition two concurrent
runs rebuild. Volumes are tiny: the behaviour under concurrency is under test, not speed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus
import pytest

from tests.procs import free_port, wait_until
from test_nightly_e2e import _snapshot

from zqdata.settings import repo_root

pytestmark = pytest.mark.slow

DAY_A, DAY_B = dt.date(2025, 6, 1), dt.date(2025, 6, 2)
BACKFILL = [(dt.date(2025, 6, 3) + dt.timedelta(days=i)).isoformat() for i in range(4)]  # embedded: one range run
IN_PROGRESS = (BulkActionStatus.REQUESTED, BulkActionStatus.FAILING, BulkActionStatus.CANCELING)
LOCATION = "zhaoqing_public_data"
CONSUMER, CREDENTIAL, PRODUCT = "zq_rural_bank", "zq-demo-rural-bank-2025", "ops_sme_credit_profile"
LOCK_ERROR = "Could not set lock"
PACE_SECONDS = 10.0  # between rounds of CLI calls (each call is a Python process; the runs need the 2 cores)
BOUND = 1500.0  # seconds: generous bound for the backfill on a shared 2-core machine; the test waits on conditions


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _wait(condition, what: str, bound: float = BOUND, every: float = 1.0):
    return wait_until(condition, what, bound, every)


class Service:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.home = root / "dagster_home"
        self.home.mkdir(parents=True)
        shutil.copy(repo_root() / "orchestration" / "dagster.yaml", self.home / "dagster.yaml")
        self.port = free_port()
        self.env = {
            # a new user's shell: the venv is not on PATH
            "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            "DAGSTER_HOME": str(self.home), "ZQ_DATA_DIR": str(self.data), "ZQ_STORE_BACKEND": "local",
            "ZQ_PSEUDONYM_KEY": "service-test-key-not-a-secret-0123456789",
            "ZQ_AUDIT_KEY": "service-test-audit-key-not-a-secret-0123456789", "ZQ_SIM_ROWS_PER_DAY": "400",
            "ZQ_SIM_DEFECT_RATE": "0.01", "ZQ_SIM_SEED": "11", "ZQ_QUALITY_MAX_ERROR_RATE": "0.5", "ZQ_ALERT_SENSOR_INTERVAL_SECONDS": "5",
            "ZQ_CONSUMER_CREDENTIAL": CREDENTIAL, "ZQ_DUCKDB_MEMORY_LIMIT": "512MB",
        }
        self.log = root / "dagster_dev.log"
        self.proc: subprocess.Popen | None = None

    def zq(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([_bin("zq"), *args], env=self.env, capture_output=True, text=True, timeout=900)
        if check:
            assert res.returncode == 0, f"zq {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        return res

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_bin("dagster"), "dev", "-w", str(repo_root() / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=repo_root(), env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert "errors" not in body, body
        return body["data"]

    def instance(self) -> dg.DagsterInstance:
        os.environ["DAGSTER_HOME"] = str(self.home)
        return dg.DagsterInstance.get()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    svc = Service(tmp_path_factory.mktemp("service"))
    old_home = os.environ.get("DAGSTER_HOME")
    svc.zq("nightly", "--date", DAY_A.isoformat(), "--days", "2")  # day A published, day B to rebuild concurrently
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        if old_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old_home


LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _location_state(svc: Service):
    try:
        data = svc.graphql(LOCATION_QUERY)
    except OSError:
        return None  # webserver not answering yet
    entries = data["workspaceOrError"].get("locationEntries") or []
    states = {e["name"]: e["locationOrLoadError"] for e in entries}
    state = states.get(LOCATION)
    return state if state and state["__typename"] in ("RepositoryLocation", "PythonError") else None


def test_code_location_loads_under_dagster_dev_without_the_venv_on_path(service):
    state = _wait(lambda: _location_state(service), "the code location to load", bound=600)
    assert state["__typename"] == "RepositoryLocation", state


BACKFILL_MUTATION = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def _launch_partition_run(svc: Service, day: str) -> str:
    params = {"selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                           "jobName": "nightly_aggregation"},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": day}]}, "runConfigData": {}}
    res = svc.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert res["__typename"] == "LaunchRunSuccess", res
    return res["run"]["runId"]


def _step_intervals(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    from dagster._core.events import DagsterEventType

    start, end = {}, {}
    for rec in instance.all_logs(run_id):
        ev = rec.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type == DagsterEventType.STEP_START:
            start[ev.step_key] = rec.timestamp
        elif ev.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            end[ev.step_key] = rec.timestamp
    return {k: (start[k], end[k]) for k in start if k in end}


def _pool_of_steps() -> dict[str, str]:
    from orchestration.definitions import defs

    job = defs().get_repository_def().get_job("nightly_aggregation")
    return {node.name: node.definition.pool for node in job.graph.nodes if node.definition.pool}


def _why_not_success(instance: dg.DagsterInstance, runs: list) -> str:
    """Each run that did not succeed: its status and the failure messages of its event log (for the CI log)."""
    from dagster._core.events import DagsterEventType

    lines = []
    for r in runs:
        if r.status == dg.DagsterRunStatus.SUCCESS:
            continue
        lines.append(f"{r.run_id} {r.tags.get('dagster/partition')} {r.status}")
        for rec in instance.all_logs(r.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE,
                                                        DagsterEventType.ENGINE_EVENT}):
            ev = rec.dagster_event
            if ev is not None and (ev.event_type != DagsterEventType.ENGINE_EVENT or "rror" in (ev.message or "")):
                error = getattr(ev.event_specific_data, "error", None)
                lines.append(f"  {ev.event_type_value} {ev.step_key or ''}: {(ev.message or '')[:200]} "
                             f"{(error.message if error is not None else '')[:500]}")
    return "\n".join(lines)


def test_backfill_sensor_cli_and_consumers_at_the_same_time_without_lock_fights(service):
    svc = service
    _wait(lambda: _location_state(svc), "the code location to load", bound=600)
    gov_db, ops_db = svc.data / "warehouse" / "gov_platform.duckdb", svc.data / "warehouse" / "ops_platform.duckdb"
    before_b = {"gov": _day_rows(_snapshot(gov_db), DAY_B), "ops": _day_rows(_snapshot(ops_db), DAY_B)}
    open_ids = [i["issue_id"] for i in json.loads(svc.zq("issues", "list", "--partition", DAY_A.isoformat(),
                                                          "--json").stdout) if i["status"] in ("open", "notified")]
    assert open_ids, "day A should have quality issues to acknowledge"

    params = {"selector": {"partitionSetName": "nightly_aggregation_partition_set",
                           "repositorySelector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}},
              "partitionNames": BACKFILL}
    res = svc.graphql(BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
    assert res["__typename"] == "LaunchBackfillSuccess", res
    backfill_id = res["backfillId"]
    pair = [_launch_partition_run(svc, DAY_B.isoformat()) for _ in range(2)]  # the same partition, requested together

    instance = svc.instance()
    cli: list[subprocess.CompletedProcess] = []

    def runs_done() -> bool:
        # the backfill's runs as its policy cuts them (embedded: ONE run over the range, orchestration/ranges.py):
        # done when the daemon says the backfill is and every run it launched, and the pair, have finished
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        mine = [instance.get_run_by_id(r) for r in pair]
        return (backfill is not None and backfill.status not in IN_PROGRESS and bool(runs)
                and all(r.is_finished for r in [*runs, *mine]))

    deadline = time.monotonic() + BOUND
    i = 0
    paced = threading.Event()  # never set: a pause between rounds, so the CLI does not starve the runs of CPU
    while not runs_done():  # people and consumers keep working while the runs go
        assert time.monotonic() < deadline, "backfill did not finish within the bound"
        paced.wait(PACE_SECONDS)
        if i < len(open_ids):
            cli.append(svc.zq("issues", "ack", open_ids[i], "--by", "数源机构 张工", check=False))
        cli.append(svc.zq("issues", "list", check=False))
        cli.append(svc.zq("deliver", "--consumer", CONSUMER, "--product", PRODUCT, "--date", DAY_A.isoformat(),
                          "--out", str(svc.root / "consumer"), check=False))
        i += 1

    failed_cli = [c for c in cli if c.returncode != 0]
    assert not failed_cli, "\n".join(f"{c.args}: {c.stdout}{c.stderr}" for c in failed_cli[:3])
    assert i >= 2 and sum("已交付" in c.stdout for c in cli) >= 2  # deliveries really happened during the runs

    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id})) + [instance.get_run_by_id(r) for r in pair]
    assert {day for r in runs for day in _run_days(r)} == {*BACKFILL, DAY_B.isoformat()}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), _why_not_success(instance, runs)

    # the alert sensor requested the notification run after the issues the runs filed, and it succeeded
    notify = _wait(lambda: [r for r in instance.get_runs(dg.RunsFilter(job_name="quality_issue_notifications"))
                            if r.tags.get("zq/requested_by") == "quality_issue_alert_sensor"
                            and r.status == dg.DagsterRunStatus.SUCCESS], "a notification run requested by the sensor",
                   bound=600)
    assert len({r.tags.get("dagster/run_key") for r in notify}) == len(notify)  # never the same work twice
    from dagster._core.scheduler.instigation import InstigatorType, TickStatus

    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
              if s.name == "quality_issue_alert_sensor"]
    ticks = [t for s in states for t in instance.get_ticks(s.instigator_origin_id, s.selector_id)]
    assert ticks and not [t for t in ticks if t.status == TickStatus.FAILURE], [t.error for t in ticks if t.error][:2]

    # no lock fight anywhere: run logs, the service's own log, the CLI
    messages = [rec.message or "" for r in [*runs, *notify] for rec in instance.all_logs(r.run_id)]
    assert not [m for m in messages if LOCK_ERROR in m]
    assert LOCK_ERROR not in svc.log.read_text(errors="replace")
    assert not [c for c in cli if LOCK_ERROR in c.stderr + c.stdout]

    # the two runs of day B: no two steps of the same pool ran at the same time, and the result equals one run
    pools = _pool_of_steps()
    a, b = (_step_intervals(instance, r) for r in pair)
    for step_a, (s1, e1) in a.items():
        for step_b, (s2, e2) in b.items():
            if pools.get(step_a) and pools.get(step_a) == pools.get(step_b):
                assert e1 <= s2 or e2 <= s1, f"{step_a} and {step_b} overlapped in pool {pools[step_a]}"
    after_b = {"gov": _day_rows(_snapshot(gov_db), DAY_B), "ops": _day_rows(_snapshot(ops_db), DAY_B)}
    assert after_b["gov"] == before_b["gov"]
    # On ops, day B may have lost rows since before the backfill: the later days' crossings apply their consent
    # revocations to every partition (retroactive). The pair must equal one run of day B made after it, alone.
    single = _launch_partition_run(svc, DAY_B.isoformat())
    _wait(lambda: instance.get_run_by_id(single).is_finished, "a single run of day B", bound=BOUND)
    assert instance.get_run_by_id(single).status == dg.DagsterRunStatus.SUCCESS
    assert {"gov": _day_rows(_snapshot(gov_db), DAY_B), "ops": _day_rows(_snapshot(ops_db), DAY_B)} == after_b


def _run_days(run: dg.DagsterRun) -> list[str]:
    """The partitions a run covers: its partition, or every day of its range (a single-run backfill)."""
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    start = dt.date.fromisoformat(run.tags["dagster/asset_partition_range_start"])
    end = dt.date.fromisoformat(run.tags["dagster/asset_partition_range_end"])
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _day_rows(snapshot: dict[str, list[tuple]], day: dt.date) -> dict[str, list[tuple]]:
    """The rows of `day` in every table (rows carrying the day, or all rows of tables without a date column)."""
    return {t: [r for r in rows if day in r or not any(isinstance(v, dt.date) for v in r)] for t, rows in snapshot.items()}
