"""The embedded default's event log keeps its SQLite connections (issue 15, fixed cost of a night;
orchestration/event_log.py): same files and schema as Dagster's own SQLite event log, one connection per run file
instead of one per statement group, bounded, safe beside other processes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from sqlalchemy import event
from sqlalchemy.engine import Engine

from orchestration import event_log
from orchestration.event_log import PooledSqliteEventLogStorage

REPO = Path(__file__).resolve().parents[1]


@dg.op
def emit(context) -> int:
    for i in range(40):
        context.log.info(f"event {i}")
    return 1


@dg.job
def chatty() -> None:
    emit()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    shutil.copy(REPO / "orchestration" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return tmp_path


class Connects:
    """Counts the new SQLite connections this process opens to event-log files (`history/runs/*.db`)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, dbapi_connection, _record) -> None:
        files = [row[2] for row in dbapi_connection.execute("PRAGMA database_list").fetchall()]
        self.count += any(Path(f).parent.name == "runs" for f in files if f)

    def __enter__(self) -> Connects:
        event.listen(Engine, "connect", self)
        return self

    def __exit__(self, *_exc) -> None:
        event.remove(Engine, "connect", self)


def _run_chatty(instance: dg.DagsterInstance) -> str:
    result = chatty.execute_in_process(instance=instance)
    assert result.success
    return result.run_id


def test_the_instance_file_gives_the_pooled_event_log_where_dagster_keeps_it(home):
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        run_id = _run_chatty(instance)
    assert (home / "history" / "runs" / f"{run_id}.db").is_file()
    # Dagster's own SQLite event log reads the same files: an instance keeps its history either way
    plain = SqliteEventLogStorage(str(home / "history" / "runs"))
    messages = [e.user_message for e in plain.get_logs_for_run(run_id)]
    assert sum(m.startswith("event ") for m in messages) == 40


def test_a_run_opens_a_handful_of_connections_not_one_per_event(home):
    with dg.DagsterInstance.get() as instance, Connects() as pooled:
        _run_chatty(instance)
    plain_home = home / "plain"
    plain_home.mkdir()
    with dg.DagsterInstance.from_config(str(plain_home)) as instance, Connects() as plain:  # Dagster's default
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        _run_chatty(instance)
    assert plain.count > 40, plain.count  # one per event (40 log lines and the run's own): the cost this storage removes
    assert pooled.count <= 3, pooled.count  # the run's file and the index, once each


@dg.asset(check_specs=[dg.AssetCheckSpec(f"rule_{i}", asset="checked") for i in range(20)])
def checked():
    yield dg.MaterializeResult()
    for i in range(20):
        yield dg.AssetCheckResult(check_name=f"rule_{i}", passed=i % 2 == 0)


def test_asset_check_events_do_not_open_a_connection_each(home):
    """Dagster asks `has_table` before storing every asset check event (and asset event with tags), through a new
    engine each time: the storage remembers the tables it found, so 20 checks do not open 20 connections."""
    with dg.DagsterInstance.get() as instance, Connects() as pooled:
        result = dg.materialize([checked], instance=instance)
        assert result.success
        evaluations = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("checked"), "rule_1"), limit=5)
        assert [e.status.value for e in evaluations] == ["FAILED"]  # stored and indexed as usual
    assert pooled.count <= 4, pooled.count
    storage = PooledSqliteEventLogStorage(str(home / "history" / "runs"))
    assert storage.has_table("asset_check_executions")
    assert not storage.has_table("no_such_table")  # only what exists is remembered


def test_connections_are_synchronous_normal(home):
    with dg.DagsterInstance.get() as instance:
        run_id = _run_chatty(instance)
        with instance.event_log_storage.run_connection(run_id) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL is 2)
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_the_kept_engines_are_bounded_and_an_evicted_run_is_still_read(home, monkeypatch):
    monkeypatch.setattr(event_log, "KEPT_SHARDS", 3)
    with dg.DagsterInstance.get() as instance:
        runs = [_run_chatty(instance) for _ in range(5)]
        storage = instance.event_log_storage
        assert len(storage._engines) <= 3
        assert runs[0] not in storage._engines
        assert len(storage.get_logs_for_run(runs[0])) == len(storage.get_logs_for_run(runs[-1]))


def _write_events(home: str, run_id: str, n: int) -> None:
    storage = PooledSqliteEventLogStorage(str(Path(home) / "history" / "runs"))
    for i in range(n):
        storage.store_event(dg.EventLogEntry(error_info=None, level="INFO", user_message=f"other {i}",
                                             run_id=run_id, timestamp=1.0 + i))


def test_events_written_by_another_process_are_read_by_a_kept_connection(home):
    with dg.DagsterInstance.get() as instance:
        run_id = _run_chatty(instance)
        storage = instance.event_log_storage
        before = len(storage.get_logs_for_run(run_id))  # the run's file now has a kept engine in this process
        proc = multiprocessing.get_context("spawn").Process(target=_write_events, args=(str(home), run_id, 7))
        proc.start()
        proc.join(timeout=300)
        assert proc.exitcode == 0
        assert len(storage.get_logs_for_run(run_id)) == before + 7


def test_wipe_closes_the_kept_engines_and_removes_the_history(home):
    with dg.DagsterInstance.get() as instance:
        run_id = _run_chatty(instance)
        storage = instance.event_log_storage
        assert storage._engines
        assert run_id in storage._engines
        storage.wipe()
        assert run_id not in storage._engines  # (the index is created again by the wipe itself)
        assert not (home / "history" / "runs" / f"{run_id}.db").exists()
        assert storage.get_logs_for_run(run_id) == []


def test_a_forked_child_does_not_reuse_the_parents_connections(home):
    with dg.DagsterInstance.get() as instance:
        run_id = _run_chatty(instance)
        storage = instance.event_log_storage
        parent_engine = storage._engines[run_id]
        storage._engines_pid = -1  # as seen from a forked child: the pid the engines were made in is not its own
        assert len(storage.get_logs_for_run(run_id)) > 40
        assert storage._engines[run_id] is not parent_engine


@dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2025-06-01"),
          backfill_policy=dg.BackfillPolicy.single_run(),
          check_specs=[dg.AssetCheckSpec(f"day_rule_{i}", asset="daily_checked") for i in range(3)])
def daily_checked(context):
    for key in context.partition_keys:
        yield dg.AssetMaterialization(asset_key="daily_checked", partition=key, metadata={"rows": len(key)})
        for i in range(3):
            yield dg.AssetCheckEvaluation(asset_key=dg.AssetKey("daily_checked"), check_name=f"day_rule_{i}",
                                          passed=(i + len(key)) % 2 == 0, partition=key,
                                          metadata={"trace": {"levels": [key, i, {"agency": "samr"}]}})
    yield dg.MaterializeResult(asset_key="daily_checked")
    for i in range(3):
        yield dg.Output(None, output_name=f"daily_checked_day_rule_{i}")


def _range_run(instance: dg.DagsterInstance) -> str:
    result = dg.materialize([daily_checked], instance=instance, tags={
        "dagster/asset_partition_range_start": "2025-06-01", "dagster/asset_partition_range_end": "2025-06-05"})
    assert result.success
    return result.run_id


def _index_rows(path: Path) -> dict[str, list]:
    import sqlite3

    with sqlite3.connect(path) as con:
        return {
            "asset_check_executions": con.execute(
                "select asset_key, check_name, partition, execution_status, evaluation_event is not null, "
                "materialization_event_storage_id is not null from asset_check_executions order by 1, 2, 3").fetchall(),
            "events": con.execute("select dagster_event_type, asset_key, partition, count(*) from event_logs "
                                  "group by 1, 2, 3 order by 1, 2, 3").fetchall(),
            "asset_keys": con.execute("select asset_key, last_materialization is not null from asset_keys "
                                      "order by 1").fetchall(),
        }


def _range_run_counting_index_commits(counting=lambda: True) -> tuple[list[str], list[int]]:
    """`_range_run` on the instance of DAGSTER_HOME: the types of the events it stored, and one entry per commit of the
    index shard made while `counting()` held."""
    from sqlalchemy import event as sa_event

    commits: list[int] = []

    def on_commit(conn) -> None:
        if counting() and conn.engine.url.database and conn.engine.url.database.endswith("index.db"):
            commits.append(1)

    with dg.DagsterInstance.get() as instance:
        sa_event.listen(Engine, "commit", on_commit)
        try:
            run_id = _range_run(instance)
        finally:
            sa_event.remove(Engine, "commit", on_commit)
        return [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event], commits


def test_a_range_runs_check_events_are_indexed_as_dagsters_own_storage_indexes_them(home):
    """The pooled storage's one transaction and one serialization per event (below) change nothing it stores: the
    index shard of a range run with per-day check evaluations holds what Dagster's own SQLite storage makes of it."""
    with dg.DagsterInstance.get() as instance:
        _range_run(instance)
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("daily_checked"), "day_rule_1")])
        assert list(latest.values())[0].event.dagster_event.event_specific_data.metadata["trace"].data["levels"][2] \
            == {"agency": "samr"}  # the stored evaluation event reads back whole
    plain_home = home / "plain"
    plain_home.mkdir()
    with dg.DagsterInstance.from_config(str(plain_home)) as instance:
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        _range_run(instance)
    pooled, plain = _index_rows(home / "history" / "runs" / "index.db"), _index_rows(
        plain_home / "history" / "runs" / "index.db")
    assert len(pooled["asset_check_executions"]) == 15  # 3 checks × 5 days
    assert pooled == plain


def test_an_event_is_serialized_once_and_its_index_writes_commit_once(home, monkeypatch):
    """Dagster's SQL storage serializes an asset check evaluation twice (the event row, then the check's execution
    row) and a range run's planned check once per day of the range; it commits the index shard once per statement
    group. Profiled over a 30-day range run: ~3.8 ms an event, ~9,000 events (bench/notes.md item 15)."""
    import dagster._serdes as serdes
    from dagster._core.events.log import EventLogEntry

    serialized: list[str] = []
    plain_serialize = serdes.serialize_value

    def counting(value, *args, **kwargs):
        if isinstance(value, EventLogEntry):
            serialized.append(value.dagster_event.event_type_value if value.dagster_event else "log")
        return plain_serialize(value, *args, **kwargs)

    monkeypatch.setattr(serdes, "serialize_value", counting)
    stored, index_commits = _range_run_counting_index_commits()
    assert stored.count("ASSET_CHECK_EVALUATION") == 15
    assert serialized.count("ASSET_CHECK_EVALUATION") == 15  # once per evaluation (Dagster's own: twice)
    assert stored.count("ASSET_CHECK_EVALUATION_PLANNED") == 3  # one per check, for the range's 5 days
    assert serialized.count("ASSET_CHECK_EVALUATION_PLANNED") == 3  # (Dagster's own: once more per day)
    assert serialized.count("ASSET_MATERIALIZATION") == stored.count("ASSET_MATERIALIZATION") == 10
    # the index: one commit per asset (check) event, where Dagster's storage commits a check evaluation's event row
    # and its execution row apart
    indexed = sum(t.startswith("ASSET_") for t in stored)
    assert len(index_commits) <= indexed + 4, (len(index_commits), indexed)


def test_a_runs_planned_events_are_one_transaction_of_the_index(home, monkeypatch):
    """Issue 15: a new run's planned asset and check events (one per asset and check of the job; ~190 for a night)
    are stored as one batch: one commit of the index shard instead of one per event, with the same rows as Dagster's
    own storage writes (the range test above compares the index with it)."""
    from dagster._core.instance.runs.run_domain import RunDomain

    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    planning = []
    real = RunDomain._log_asset_planned_events

    def counted(self, *args, **kwargs):
        planning.append(True)
        try:
            return real(self, *args, **kwargs)
        finally:
            planning.pop()

    monkeypatch.setattr(RunDomain, "_log_asset_planned_events", counted)
    stored, commits = _range_run_counting_index_commits(lambda: bool(planning))
    assert os.environ["DAGSTER_EVENT_BATCH_SIZE"] == "1000"  # set by the storage, for this process
    planned = stored.count("ASSET_MATERIALIZATION_PLANNED") + stored.count("ASSET_CHECK_EVALUATION_PLANNED")
    assert planned == 8, stored  # the asset on each of the range's 5 days, and its three checks
    assert len(commits) == 1, (commits, stored)


def test_a_batch_that_fails_midway_leaves_nothing_and_is_stored_event_by_event(home, monkeypatch):
    """An error on the third event of the batch rolls the first two back; Dagster then stores the events one by one:
    each planned event is stored once, none twice."""
    calls = {"n": 0}
    real = PooledSqliteEventLogStorage.store_event

    def flaky(self, event_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk hiccup")
        return real(self, event_)

    monkeypatch.setattr(PooledSqliteEventLogStorage, "store_event", flaky)
    with dg.DagsterInstance.get() as instance:
        run_id = _range_run(instance)
        stored = [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event]
        index_planned = [r for r in _index_rows(home / "history" / "runs" / "index.db")["events"]
                         if r[0].endswith("_PLANNED")]
    assert calls["n"] > 8
    assert stored.count("ASSET_MATERIALIZATION_PLANNED") == 5 and stored.count("ASSET_CHECK_EVALUATION_PLANNED") == 3
    assert sum(r[3] for r in index_planned) == 8, index_planned  # the index: each once


# ---------------------------------------------------------------- the newest materialization of an asset partition

DAILY = dg.DailyPartitionsDefinition(start_date="2025-06-01")


@dg.asset(partitions_def=DAILY, check_specs=[dg.AssetCheckSpec(f"rule_{i}", asset="daily") for i in range(3)])
def daily(context):
    yield dg.MaterializeResult()
    for i in range(3):
        yield dg.AssetCheckResult(check_name=f"rule_{i}", passed=True)


class FullLookups:
    """Counts Dagster's own materialization lookups (a record query and its decoding) the pooled storage makes."""

    def __init__(self, monkeypatch) -> None:
        from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

        self.count = 0
        real = SqlEventLogStorage.fetch_materializations

        def counted(storage, *args, **kwargs):
            self.count += isinstance(storage, PooledSqliteEventLogStorage)
            return real(storage, *args, **kwargs)

        monkeypatch.setattr(SqlEventLogStorage, "fetch_materializations", counted)


def _newest(storage, partition: str, key: str = "daily"):
    from dagster._core.event_api import AssetRecordsFilter

    records = storage.fetch_materializations(AssetRecordsFilter(asset_key=dg.AssetKey(key),
                                                                asset_partitions=[partition]), limit=1).records
    return records[0].storage_id if records else None


def _report(instance, partition: str, key: str = "daily") -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))


def test_each_check_of_a_partitioned_step_targets_that_runs_materialization(home, monkeypatch):
    """Dagster looks up the check's target (the newest materialization of the step's partition) for every
    AssetCheckResult: the first lookup of a step is Dagster's own, the others are given again unchanged, and a later
    run's checks target that run's materialization, never the kept one."""
    from dagster._core.event_api import AssetRecordsFilter

    plain = SqliteEventLogStorage(str(home / "history" / "runs"))  # Dagster's own, on the same files
    lookups = FullLookups(monkeypatch)
    with dg.DagsterInstance.get() as instance:
        for night in range(2):
            before = lookups.count
            result = dg.materialize([daily], instance=instance, partition_key="2025-06-02")
            assert result.success
            after = lookups.count
            [mat] = plain.fetch_materializations(AssetRecordsFilter(
                asset_key=dg.AssetKey("daily"), asset_partitions=["2025-06-02"]), limit=1).records
            assert mat.run_id == result.run_id
            targets = [e.dagster_event.event_specific_data.target_materialization_data
                       for e in instance.all_logs(result.run_id)
                       if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
            assert len(targets) == 3 and {(t.storage_id, t.run_id) for t in targets} == {
                (mat.storage_id, result.run_id)}, (night, targets, mat)
            assert after - before == 1, after - before  # three checks, one of Dagster's own lookups


def test_the_kept_answer_is_dagsters_own_after_every_change(home, monkeypatch):
    """A new materialization of the partition (here or by another writer), a wipe: the next answer is Dagster's own
    storage's; another partition's materialization leaves the kept answer standing; other queries are not kept."""
    from dagster._core.event_api import AssetRecordsFilter

    plain = SqliteEventLogStorage(str(home / "history" / "runs"))  # Dagster's own, on the same files
    lookups = FullLookups(monkeypatch)
    with dg.DagsterInstance.get() as instance, dg.DagsterInstance.get() as other:
        storage = instance.event_log_storage
        assert _newest(storage, "2025-06-02") is None
        _report(instance, "2025-06-02")
        first = _newest(storage, "2025-06-02")
        assert first is not None and first == _newest(plain, "2025-06-02")
        n = lookups.count
        assert _newest(storage, "2025-06-02") == first and lookups.count == n  # unchanged: given again
        _report(instance, "2025-06-03")  # another partition
        assert _newest(storage, "2025-06-02") == first and lookups.count == n
        _report(other, "2025-06-02")  # another writer (its own storage object, as another process)
        second = _newest(storage, "2025-06-02")
        assert second == _newest(plain, "2025-06-02") and second > first
        instance.wipe_assets([dg.AssetKey("daily")])
        assert _newest(storage, "2025-06-02") is None and _newest(plain, "2025-06-02") is None
        _report(instance, "2025-06-02")
        assert _newest(storage, "2025-06-02") == _newest(plain, "2025-06-02") is not None
        n = lookups.count
        for query in (dict(records_filter=AssetRecordsFilter(asset_key=dg.AssetKey("daily"),
                                                             asset_partitions=["2025-06-02"]), limit=2),
                      dict(records_filter=AssetRecordsFilter(asset_key=dg.AssetKey("daily"),
                                                             asset_partitions=["2025-06-02", "2025-06-03"]), limit=1),
                      dict(records_filter=AssetRecordsFilter(asset_key=dg.AssetKey("daily"),
                                                             asset_partitions=["2025-06-02"], after_storage_id=1),
                           limit=1),
                      dict(records_filter=dg.AssetKey("daily"), limit=1)):
            for _ in range(2):
                assert storage.fetch_materializations(**query).records == plain.fetch_materializations(**query).records
        assert lookups.count - n == 8  # neither is one partition's newest: each asked every time


@pytest.mark.parametrize("deleted_by", ["this instance", "another process"])
def test_a_deleted_run_and_the_partition_materialized_again_give_the_new_runs_answer(home, deleted_by):
    """The newest materialization of a partition whose run was deleted, then materialized again by a new run: the new
    run's (Dagster's own answer), and its checks target it. SQLite gives the new row the deleted row's id when that
    row was the file's last, so the newest id alone does not tell the two runs apart."""
    plain = SqliteEventLogStorage(str(home / "history" / "runs"))
    with dg.DagsterInstance.get() as instance, dg.DagsterInstance.get() as other:
        storage = instance.event_log_storage
        first = dg.materialize([daily], instance=instance, partition_key="2025-06-02")
        assert _newest(storage, "2025-06-02") == _newest(plain, "2025-06-02") is not None
        (instance if deleted_by == "this instance" else other).delete_run(first.run_id)
        assert _newest(plain, "2025-06-02") is None
        again = dg.materialize([daily], instance=instance, partition_key="2025-06-02")
        from dagster._core.event_api import AssetRecordsFilter

        [mat] = plain.fetch_materializations(AssetRecordsFilter(
            asset_key=dg.AssetKey("daily"), asset_partitions=["2025-06-02"]), limit=1).records
        assert mat.run_id == again.run_id
        [kept] = storage.fetch_materializations(AssetRecordsFilter(
            asset_key=dg.AssetKey("daily"), asset_partitions=["2025-06-02"]), limit=1).records
        assert (kept.storage_id, kept.run_id) == (mat.storage_id, again.run_id)
        targets = [e.dagster_event.event_specific_data.target_materialization_data
                   for e in instance.all_logs(again.run_id)
                   if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(targets) == 3 and {(t.storage_id, t.run_id) for t in targets} == {(mat.storage_id, again.run_id)}


def test_a_batch_whose_index_commit_fails_leaves_no_copy_in_the_run_file(home):
    """The run's file commits its part of a batch before the index: when the index's COMMIT then fails (an I/O
    error), the batch's rows leave the run file again, and Dagster's event-by-event fallback stores each planned event
    once in both files (before: the run file held the batch twice)."""
    import sqlite3

    from sqlalchemy import event as sa_event

    armed = {"on": True}

    def fail_the_index_commit_of_the_planned_batch(conn) -> None:
        if armed["on"] and (conn.engine.url.database or "").endswith("index.db") and conn.exec_driver_sql(
                "SELECT count(*) FROM event_logs WHERE dagster_event_type LIKE '%_PLANNED'").scalar():
            armed["on"] = False
            raise sqlite3.OperationalError("disk I/O error (injected at COMMIT)")

    sa_event.listen(Engine, "commit", fail_the_index_commit_of_the_planned_batch)
    try:
        with dg.DagsterInstance.get() as instance:
            run_id = _range_run(instance)
            stored = [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event]
    finally:
        sa_event.remove(Engine, "commit", fail_the_index_commit_of_the_planned_batch)
    assert not armed["on"]  # the fault fired
    index_planned = [r for r in _index_rows(home / "history" / "runs" / "index.db")["events"]
                     if r[0].endswith("_PLANNED")]
    assert stored.count("ASSET_MATERIALIZATION_PLANNED") == 5 and stored.count("ASSET_CHECK_EVALUATION_PLANNED") == 3
    assert sum(r[3] for r in index_planned) == 8, index_planned
