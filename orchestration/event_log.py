"""The embedded default's Dagster event log: SQLite, with its connections kept (issue 15, fixed cost of a night).

Dagster's `SqliteEventLogStorage` builds a new SQLAlchemy engine, opens a new SQLite connection and disposes of both
for every statement group: a 1,000-row night writes ~780 events through ~5,100 such connections (profiled: 3.2 s of a
24 s night, bench/notes.md item 10). `PooledSqliteEventLogStorage` is that storage with one change, in `_connect`:

- one engine per shard (a run's own file, or the index), kept for the process's next event of that shard; at most
  `KEPT_SHARDS` are kept (the least recently used are disposed of), so a long-lived webserver or daemon that reads many
  runs holds a bounded number of open files;
- its connections open with `PRAGMA synchronous=NORMAL`, SQLite's setting for WAL databases (the event log is in WAL
  mode): a commit no longer waits for the disk; an operating-system crash or power loss may lose the last events
  written, never corrupt the file. The production instance keeps its events in PostgreSQL (docs/deploy.md);
- in a forked child the parent's engines are dropped, never reused;
- an asset or asset check event is serialized once and its writes to the index shard are one transaction: Dagster's
  SQL storage serializes a check evaluation twice (its event row, then its check execution row), a range run's planned
  check once per day of the range, and commits the index once per statement group (profiled: ~3.8 ms an event, ~9,000
  events in a 30-day range run of 20,000-row days, 35 s of its 300 s; bench/notes.md item 15). The rows written are
  Dagster's own, made by Dagster's code (tests/test_event_log.py compares them with its storage's);
- a batch of events (a new run's planned asset and check events: Dagster batches them when DAGSTER_EVENT_BATCH_SIZE
  is set, which this storage sets) is one transaction of the index and of the run's file (`store_event_batch`);
- the newest materialization of one asset partition (`fetch_materializations` with that filter and limit 1: what
  Dagster asks for every `AssetCheckResult` of a partitioned step, the check's target; ~0.4 s of a 1,000-row night's
  ~150 check results, most of it decoding the same dbt model's materialization again, bench/notes.md item 23) is kept
  with its stamp: the partition's newest materialization row id and the asset's wipe details, read by one indexed
  query. The kept answer is given only while the stamp is unchanged (a new materialization, a wipe, deleted events:
  asked again), so the answer is always Dagster's own, also beside other processes writing the same event log;
- `has_table` remembers the tables it found: Dagster asks before every asset check event and every asset event with
  tags (a new engine and connection each time: 4.6 s of a 30-day range run, profiled), and a table, once migrated in,
  stays (`wipe` and `upgrade` forget them).

Everything else (schema, migrations, the file per run, the lock around each connection, watchers) is Dagster's own.
Configured in orchestration/dagster.yaml (`event_log_storage`); the files stay in `$DAGSTER_HOME/history/runs`, where the
default storage keeps them, so an existing instance keeps its history.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import dagster._check as check
import dagster._serdes as serdes
import sqlalchemy as db
from dagster._core.definitions.asset_key import AssetKey
from dagster._core.event_api import AssetRecordsFilter, EventRecordsResult
from dagster._core.storage.event_log.schema import AssetKeyTable, SqlEventLogStorageTable
from dagster._core.storage.sqlalchemy_compat import db_select
from dagster._config import Field, StringSource
from dagster._core.storage.event_log import sql_event_log
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, DagsterEventType
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine

KEPT_SHARDS = 16  # engines kept per process: the index and the runs written or read most recently
KEPT_LATEST = 4096  # newest materializations of asset partitions kept per process (a night reads ~30 distinct ones)


def default_base_dir() -> str:
    """`$DAGSTER_HOME/history/runs`: where Dagster's default SQLite storage keeps the event log."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise check.CheckError("DAGSTER_HOME 未设置 (DAGSTER_HOME is not set): the event log needs a base_dir")
    return os.path.join(home, "history", "runs")


_STORING = threading.local()  # .event: (the event this thread is storing, its serialized form)


def _serialize_once(value: Any, **kwargs: Any) -> str:
    """`serialize_value` as Dagster's SQL event log storage calls it: the event a `PooledSqliteEventLogStorage` is
    storing in this thread is serialized once, for every row that holds it; anything else as Dagster serializes it
    (`dagster._serdes.serialize_value`, looked up at each call)."""
    storing = getattr(_STORING, "event", None)
    if storing is not None and value is storing[0] and not kwargs:
        return storing[1]
    return serdes.serialize_value(value, **kwargs)


BATCH_SIZE_ENV = "DAGSTER_EVENT_BATCH_SIZE"  # Dagster's switch: >0 sends batchable events to `store_event_batch`
EVENT_BATCH_SIZE = 1000  # events per batch: a run's planned events at once (~190 for a night, more for a range)


def enable_event_batches() -> None:
    """Dagster batches a run's planned events (and an output's asset events) only when DAGSTER_EVENT_BATCH_SIZE is
    set in the process that stores them: set here, where this storage is made (every process using the instance),
    unless the operator set it. dbt's sealed steps never see it (dbt_guard.sealed_env)."""
    os.environ.setdefault(BATCH_SIZE_ENV, str(EVENT_BATCH_SIZE))


def _synchronous_normal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _one_partitions_newest(records_filter: Any, limit: int, cursor: str | None,
                           ascending: bool) -> tuple[str, str] | None:
    """(asset key string, partition) when a materializations query asks exactly for the newest materialization of
    one asset partition, else None."""
    if (limit != 1 or cursor is not None or ascending or not isinstance(records_filter, AssetRecordsFilter)
            or records_filter.asset_partitions is None or len(records_filter.asset_partitions) != 1):
        return None
    if any(getattr(records_filter, f) is not None for f in records_filter._fields  # any other bound: Dagster's
           if f not in ("asset_key", "asset_partitions")):
        return None
    return records_filter.asset_key.to_string(), records_filter.asset_partitions[0]


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose engines and connections are kept per shard (see the module docstring)."""

    def __init__(self, base_dir: str | None = None, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_pid = os.getpid()
        self._tables_present: set[str] = set()
        self._held = threading.local()  # .conns: {shard: the connection this thread's `store_event` holds open}
        self._latest: OrderedDict[tuple[str, str], tuple[tuple[Any, Any, Any], EventRecordsResult]] = OrderedDict()
        self._latest_lock = threading.Lock()
        super().__init__(base_dir or default_base_dir(), inst_data=inst_data)
        self._db_lock = threading.RLock()  # `store_event` holds the index's connection while Dagster opens the run's
        sql_event_log.serialize_value = _serialize_once  # the module's name for it; a no-op outside `store_event`
        enable_event_batches()

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: dict[str, Any]) -> PooledSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> Engine:
        """The kept engine of `shard` (created on first use). Called under `_db_lock`."""
        if self._engines_pid != os.getpid():  # a forked child: the parent's connections are not ours
            self._engines = OrderedDict()
            self._engines_pid = os.getpid()
        engine = self._engines.get(shard)
        if engine is not None:
            self._engines.move_to_end(shard)
            return engine
        engine = create_engine(self.conn_string_for_shard(shard), pool_size=1, max_overflow=2,
                               connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
        event.listen(engine, "connect", _synchronous_normal)
        self._engines[shard] = engine
        while len(self._engines) > KEPT_SHARDS:
            _, old = self._engines.popitem(last=False)
            old.dispose()
        return engine

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:  # type: ignore[override]
        held = getattr(self._held, "conns", {}).get(shard)
        if held is not None:  # inside `store_event`: its open transaction
            yield held
            return
        with self._db_lock:
            check.str_param(shard, "shard")
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def store_event(self, event: Any) -> None:
        """Dagster's `store_event`, with the event serialized once and an asset (check) event's index writes (its
        event row, the asset's or check execution's row, tags) in one transaction of the index shard."""
        indexed = event.is_dagster_event and event.dagster_event_type in (ASSET_EVENTS | ASSET_CHECK_EVENTS)
        _STORING.event = (event, serdes.serialize_value(event))
        try:
            if not indexed:
                super().store_event(event)
                return
            with self._holding(INDEX_SHARD_NAME):
                super().store_event(event)
        finally:
            _STORING.event = None

    def store_event_batch(self, events: Any) -> None:
        """A batch of events (Dagster sends the planned asset and check events of a new run as one when
        DAGSTER_EVENT_BATCH_SIZE is set, which this storage sets: `enable_event_batches`) in ONE transaction of the
        index and one of each run's file, instead of one each per event (a 1,000-row night plans ~190 assets and
        checks: ~0.5 s of its run creation, bench/notes.md 17). The rows are those `store_event` writes one by one;
        on an error nothing of the batch stays stored and Dagster stores the events one by one. The run files commit
        before the index: when the index's commit fails after theirs, the batch's rows are deleted from them again
        (two SQLite files have no common commit)."""
        if not events:
            return
        per_run = Counter(e.run_id for e in events)
        written: dict[str, list[int]] = {}  # run id -> the ids of the batch's rows in its file
        runs_committed = False
        try:
            with self._holding(INDEX_SHARD_NAME):
                with contextlib.ExitStack() as stack:
                    for run_id in per_run:
                        stack.enter_context(self._holding(run_id))
                    for event in events:
                        self.store_event(event)
                    for run_id, n in per_run.items():  # the file's newest rows: its write lock is held since the first
                        written[run_id] = self._newest_ids(run_id, n)
                runs_committed = True
        except BaseException:
            if runs_committed:
                for run_id, ids in written.items():
                    with self._connect(run_id) as conn:
                        conn.execute(SqlEventLogStorageTable.delete().where(SqlEventLogStorageTable.c.id.in_(ids)))
            raise

    def _newest_ids(self, shard: str, n: int) -> list[int]:
        table = SqlEventLogStorageTable
        with self._connect(shard) as conn:
            return [r[0] for r in conn.execute(db_select([table.c.id]).order_by(table.c.id.desc()).limit(n))]

    @contextlib.contextmanager
    def _holding(self, shard: str) -> Iterator[None]:
        """This thread's writes to `shard` go through one connection and transaction until the block ends (holding
        `_db_lock`, re-entrant, until the commit); a shard already held stays with its holder."""
        conns = self._held.__dict__.setdefault("conns", {})
        if shard in conns:
            yield
            return
        with self._connect(shard) as conn:
            conns[shard] = conn
            try:
                yield
            finally:
                conns.pop(shard, None)

    def fetch_materializations(self, records_filter: AssetKey | AssetRecordsFilter, limit: int,
                               cursor: str | None = None, ascending: bool = False) -> EventRecordsResult:
        """Dagster's answer; the newest materialization of one asset partition is kept and given again while its stamp
        (`_partition_stamp`) is unchanged."""
        key = _one_partitions_newest(records_filter, limit, cursor, ascending)
        if key is None:
            return super().fetch_materializations(records_filter, limit, cursor, ascending)
        stamp = self._partition_stamp(*key)  # read before the answer: a write in between only makes a later miss
        with self._latest_lock:
            kept = self._latest.get(key)
            if kept is not None and kept[0] == stamp:
                self._latest.move_to_end(key)
                return kept[1]
        result = super().fetch_materializations(records_filter, limit, cursor, ascending)
        with self._latest_lock:
            self._latest[key] = (stamp, result)
            self._latest.move_to_end(key)
            while len(self._latest) > KEPT_LATEST:
                self._latest.popitem(last=False)
        return result

    def _partition_stamp(self, asset_key: str, partition: str) -> tuple[Any, Any, Any]:
        """(newest ASSET_MATERIALIZATION row id of the asset partition, that row's run, the asset's wipe details) in
        one statement, answered by the indexes Dagster's own lookup uses. The run is part of it because SQLite gives
        a new row the id of a deleted last one: a run deleted (here or by another process) and the partition
        materialized again by another run has the same newest id."""
        table = SqlEventLogStorageTable
        newest = (db_select([db.func.max(table.c.id)])
                  .where(db.and_(table.c.asset_key == asset_key,
                                 table.c.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION.value,
                                 table.c.partition == partition))
                  .scalar_subquery())
        run = db_select([table.c.run_id]).where(table.c.id == newest).limit(1).scalar_subquery()
        details = (db_select([AssetKeyTable.c.asset_details]).where(AssetKeyTable.c.asset_key == asset_key)
                   .limit(1).scalar_subquery())
        with self.index_connection() as conn:
            row = conn.execute(db_select([newest, run, details])).fetchone()
        return (row[0], row[1], row[2]) if row is not None else (None, None, None)

    def has_table(self, table_name: str) -> bool:
        # called with `_db_lock` held (while storing an event): answered without it, as Dagster's own does
        if table_name in self._tables_present:
            return True
        present = super().has_table(table_name)
        if present:
            self._tables_present.add(table_name)
        return present

    def _dispose_engines(self) -> None:
        self._tables_present = set()
        with self._latest_lock:
            self._latest.clear()
        with self._db_lock:
            engines, self._engines = self._engines, OrderedDict()
        for engine in engines.values():
            engine.dispose()

    def delete_events(self, run_id: str) -> None:
        super().delete_events(run_id)
        with self._latest_lock:  # this process's kept answers may name the run (another process's: `_partition_stamp`)
            self._latest.clear()

    def wipe(self) -> None:
        self._dispose_engines()  # the files are removed: no connection may outlive them
        super().wipe()

    def upgrade(self) -> None:
        self._dispose_engines()
        super().upgrade()

    def dispose(self) -> None:
        self._dispose_engines()
        super().dispose()
