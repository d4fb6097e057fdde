"""The production mode on one machine (issue 16): the same days embedded and distributed give the same data, and a
worker killed mid-step fails the run without publishing half of anything; the partition's re-run succeeds.

Embedded: ``run_nightly`` in process on two DuckDB files (the default). Distributed: ``orchestration.distributed``
— PostgreSQL (instance storage, operational DB, the lakes' catalogs), moto as the S3 stand-in, Redis, two Celery
workers (``boundary``: gov + boundary queues; ``ops``: ops queue, no gov credential) and the two DuckLakes; the days
as one backfill whose runs start at once. Skipped, with the reason, only when PostgreSQL or Redis cannot be installed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest

from procs import wait_until
from zqdata import lakes

DAYS = [dt.date(2025, 6, 1) + dt.timedelta(days=i) for i in range(3)]
ROWS_PER_DAY = 300
SEED_ENV = {"ZQ_SIMULATE": "1", "ZQ_SIM_ROWS_PER_DAY": str(ROWS_PER_DAY), "ZQ_SIM_DEFECT_RATE": "0.01",
            "ZQ_SIM_SEED": "7", "ZQ_PSEUDONYM_KEY": "distributed-test-key-not-a-secret-0123456789",
            "ZQ_DUCKDB_MEMORY_LIMIT": "1GB", "ZQ_STORE_BACKEND": "local"}
# Columns that record when or by which run something was written, not what the data is.
RUN_COLUMNS = ("_ingested_at", "ingested_at", "quarantined_at", "created_at", "updated_at", "updated_at_run",
               "arrived_at", "run_id", "_run_id", "evaluated_at", "computed_at", "synced_at", "checked_at",
               "recorded_at", "built_at", "failed_at", "published_at", "loaded_at", "decided_at", "validated_at")
RUN_TYPES = ("TIMESTAMP",)
# The leak gate's identifier index: one row per (kind, value) and its first day; concurrent days on a DuckLake may
# each add a value before seeing the other's commit, so it is compared by its content (kind, value, first day).
IDENTIFIER_INDEX = "leakgate.gov_identifiers"
# The data path (as in test_nightly_e2e): a re-run of a partition reproduces these tables exactly; bookkeeping tables
# (deliveries seen, check history) may record the re-run itself.
DATA_SCHEMAS = ("ods", "quarantine", "staging", "intermediate", "desensitized", "products")

# Generous on a shared 2-core machine (a backfill here takes 400–1,100 s), yet a hang cannot take the whole CI run's time
BOUND = 1800.0

pytestmark = pytest.mark.slow


def _services_or_skip() -> None:
    from orchestration.distributed import install_services

    if [p for names in lakes.EXTENSION_PACKAGES.values() for p in names[:1]
            if __import__("importlib.util").util.find_spec(p) is None]:
        pytest.skip("DuckDB extension packages not installed (pip install -c constraints.txt -e .)")
    missing = install_services()
    if missing:
        if os.environ.get("CI"):
            raise RuntimeError(f"{', '.join(missing)} missing on CI: `make test` should have installed them")
        pytest.skip(f"{', '.join(missing)} not installed and could not be installed (apt-get install "
                    f"{' '.join(missing)} as root)")


def _checksums(domain: str) -> dict[str, tuple[int, int, int]]:
    """Every table of the domain's warehouse (this process's mode), without run-time columns; the identifier index
    by content."""
    from zqdata import warehouse

    with warehouse.connect(domain, read_only=True) as con:
        sums = warehouse.domain_checksums(con, RUN_COLUMNS, RUN_TYPES)
        if IDENTIFIER_INDEX in sums:
            con.execute(f"CREATE TEMP VIEW _zq_index AS SELECT kind, value, min(first_day) AS first_day "
                        f"FROM {IDENTIFIER_INDEX} GROUP BY ALL")
            sums[IDENTIFIER_INDEX] = lakes.table_checksum(con, "_zq_index")
    return sums


def _issue_register() -> list[tuple]:
    from zqdata import issues, opdb

    engine = opdb.get_engine()
    out = []
    for day in DAYS:
        for i in issues.list_issues(engine, partition_date=day):
            out.append((str(i.partition_date), i.agency, i.dataset, i.rule, str(i.dimension), i.severity,
                        i.status, i.records_failed))
    return sorted(out)


def _published(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "published" / "snapshots"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("ZQ_") and name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):
    """The days on the embedded default, one after another: checksums, issue register, timing."""
    _services_or_skip()
    from orchestration.nightly import run_nightly

    mp = pytest.MonkeyPatch()
    data_dir = tmp_path_factory.mktemp("embedded") / "data"
    _env(mp, {**SEED_ENV, "ZQ_DATA_DIR": str(data_dir)})
    started = time.monotonic()
    try:
        with dg.instance_for_test() as instance:
            for day in DAYS:
                result, summary = run_nightly(day, instance)
                assert result.success, summary.checks_failed
        seconds = time.monotonic() - started
        yield {"gov": _checksums("gov"), "ops": _checksums("ops"), "issues": _issue_register(), "seconds": seconds}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory):
    """The platform of `make distributed` with its two workers, after the same days as one backfill."""
    _services_or_skip()
    from orchestration import distributed as dist

    base = tmp_path_factory.mktemp("distributed")
    mp = pytest.MonkeyPatch()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ZQ_")}, **SEED_ENV}
    with dist.platform(base, rows_per_day=ROWS_PER_DAY, environ=env) as p, dist.workers(p):
        _env(mp, p.env)
        try:
            started = time.monotonic()
            outcomes = dist.backfill(p, [d.isoformat() for d in DAYS], bound=BOUND)
            seconds = time.monotonic() - started
            print("\n" + "\n".join(dist.summary_lines(outcomes)))
            yield {"platform": p, "outcomes": outcomes, "seconds": seconds}
        finally:
            mp.undo()


def test_the_same_days_embedded_and_distributed_give_the_same_tables_and_issues(embedded, distributed) -> None:
    outcomes = distributed["outcomes"]
    assert all(o["success"] for o in outcomes), outcomes
    from orchestration.distributed import step_hosts

    hosts = {h.split("@")[0] for o in outcomes for h in step_hosts(o["run_id"]).values()}
    assert hosts == {"boundary", "ops"}, hosts  # both workers took steps
    print(f"\n[distributed] embedded {embedded['seconds']:.0f}s (days in turn), distributed "
          f"{distributed['seconds']:.0f}s (days at once on 2 workers)")
    # dq_audit.<test>: dbt's store-failures table holds the failing rows of the LAST build of each test, whichever day
    # that was (days in turn embedded, in any order distributed); what is kept of it is quality.findings, compared
    lake = {domain: {t: v for t, v in _checksums(domain).items() if not t.startswith("dq_audit.")}
            for domain in ("gov", "ops")}
    embedded = {**embedded, **{d: {t: v for t, v in embedded[d].items() if not t.startswith("dq_audit.")}
                               for d in ("gov", "ops")}}
    only = {d: sorted(set(lake[d]) ^ set(embedded[d])) for d in lake}
    differ = {d: {t: (embedded[d][t], lake[d][t]) for t in lake[d] if t in embedded[d] and lake[d][t] != embedded[d][t]}
              for d in lake}
    print(f"[distributed] tables compared: gov {len(lake['gov'])}, ops {len(lake['ops'])}; "
          f"only on one side {only}; different {differ}")
    assert not any(only.values()) and not any(differ.values()), (only, differ)
    assert all(sum(n for n, _, _ in lake[d].values()) > 0 for d in lake)
    assert _issue_register() == embedded["issues"]


def _pool_children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a Celery worker's pool processes)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _step_started(instance: dg.DagsterInstance, run_id: str, step: str) -> bool:
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    return any(r.dagster_event.step_key == step for r in records)


def test_a_worker_killed_mid_step_fails_the_run_publishes_nothing_half_and_the_rerun_succeeds(distributed) -> None:
    from orchestration import distributed as dist
    from orchestration.instance import ensure_instance
    from zqdata.settings import get_settings

    p = distributed["platform"]
    day = DAYS[0].isoformat()

    def data_path() -> dict[str, tuple[int, int, int]]:
        return {t: v for domain in ("gov", "ops") for t, v in _checksums(domain).items()
                if t.split(".")[0] in DATA_SCHEMAS or t.startswith("scenario_")}

    before = data_path()
    published = _published(get_settings().data_dir)
    assert published, "the backfill published snapshots"
    instance = ensure_instance()
    known = {r.run_id for r in instance.get_runs()}

    proc = dist.start_run_process(p, day, "kill-test")
    try:
        run_id = wait_until(lambda: next((r.run_id for r in instance.get_runs() if r.run_id not in known), None),
                            "the run to be created", 300)
        wait_until(lambda: _step_started(instance, run_id, "gov_dbt_models"), "gov_dbt_models to start", 600, 0.5)
        worker = p.workers["boundary"]
        children = wait_until(lambda: _pool_children(worker.pid), "the boundary worker's pool processes", 60)
        for child in children:  # the step is in one of them: the worker loses its process mid-step
            os.kill(child, signal.SIGKILL)
        out, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            dist.stop_process(proc)
    outcome = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert not outcome["success"], outcome
    assert any("gov_dbt_models" in f or "WorkerLost" in f for f in outcome["failures"]), outcome
    # nothing half-published: every snapshot file and pointer is exactly as before the killed run
    assert _published(get_settings().data_dir) == published

    # the worker replaces its pool processes; the partition's re-run succeeds and gives the same tables
    rerun = dist.backfill(p, [day], bound=BOUND)
    assert rerun[0]["success"], rerun
    assert data_path() == before
    assert _published(get_settings().data_dir) == published
