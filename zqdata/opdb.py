"""The operational database: small, concurrent writes that must never wait on (or block) a warehouse file.

DuckDB allows one writing process per file, and the nightly run holds the gov and ops files for minutes. What people and
the service write at any time — the quality-issue register and its events (Art. 20), the alert outbox and its attempts,
the hash-chained delivery audit log (Art. 25), registration records (Art. 17) and data demand requests (Art. 18) —
lives here instead, in a database made for many small writers:

- embedded default: SQLite in WAL mode, ``<ZQ_DATA_DIR>/operational/operational.sqlite`` (readers never block the
  writer; writers queue on SQLite's lock with a generous busy timeout; every transaction takes the write lock up front
  with ``BEGIN IMMEDIATE``, so two writers never deadlock on a lock upgrade);
- production: PostgreSQL, ``ZQ_OPDB_URL=postgresql+psycopg2://user@host/db`` (the password from the environment
  variable ``ZQ_OPDB_PASSWORD`` or the URL, never from the repo).

The tables are defined once, here (SQLAlchemy Core), and created on first use. Times are stored as ISO 8601 text in
Asia/Shanghai (+08:00), so both engines store and sort them the same way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from zqdata.settings import TZ, get_settings

URL_ENV = "ZQ_OPDB_URL"
PASSWORD_ENV = "ZQ_OPDB_PASSWORD"
SQLITE_BUSY_TIMEOUT_MS = 120_000  # a writer waits this long for another; each transaction here takes milliseconds


class AwareDateTime(sa.types.TypeDecorator):
    """A timezone-aware datetime stored as ISO 8601 text in Asia/Shanghai (same on SQLite and PostgreSQL)."""

    impl = sa.String(40)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: times in the operational DB carry their zone")
        return value.astimezone(TZ).isoformat(timespec="microseconds")

    def process_result_value(self, value, dialect):
        return None if value is None else dt.datetime.fromisoformat(value).astimezone(TZ)


metadata = sa.MetaData()

quality_issues = sa.Table(
    "quality_issues", metadata,
    sa.Column("fingerprint", sa.String(64), primary_key=True),  # sha256(dataset|rule|partition|agency)
    sa.Column("issue_id", sa.String(20), nullable=False, unique=True),  # QI-<first 12 hex>, what people type
    sa.Column("partition_date", sa.Date, nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),
    sa.Column("dataset", sa.String(128), nullable=False),
    sa.Column("rule", sa.String(256), nullable=False),
    sa.Column("dimension", sa.String(32)),
    sa.Column("severity", sa.String(16)),
    sa.Column("tools", sa.String(128)),
    sa.Column("findings_count", sa.Integer),
    sa.Column("records_failed", sa.Integer),
    sa.Column("sample_rows", sa.Text),  # JSON list of masked finding rows
    sa.Column("affected_rows", sa.Text),  # JSON [{file, rows (first 100), row_count}] for the agency's message
    sa.Column("trace", sa.Text),  # JSON of lineage.Trace
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("first_seen_at", AwareDateTime, nullable=False),
    sa.Column("last_seen_at", AwareDateTime),
    sa.Column("open_since", AwareDateTime),  # SLA clock: when it was (re)opened
    sa.Column("notified_at", AwareDateTime),
    sa.Column("acknowledged_at", AwareDateTime),
    sa.Column("acknowledged_by", sa.String(256)),
    sa.Column("resolved_at", AwareDateTime),
    sa.Column("resolution_note", sa.Text),
    sa.Column("verified_at", AwareDateTime),
    sa.Column("escalated_at", AwareDateTime),
    sa.Column("reopen_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", AwareDateTime, nullable=False),
    sa.Index("ix_quality_issues_partition", "partition_date", "status"),
    # what the nightly alerting asks of every open issue (messages due, SLA escalation), answered from the index alone:
    # the rows carry their trace (~6 KB), and reading 16,000 open issues whole after a year took ~0.2 s a query
    sa.Index("ix_quality_issues_open", "status", "escalated_at", "open_since", "agency", "reopen_count", "dataset",
             "fingerprint"),
)

issue_events = sa.Table(
    "issue_events", metadata,
    sa.Column("event_id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, index=True),
    sa.Column("issue_id", sa.String(20), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),  # opened|notified|acknowledged|resolved|verified|superseded|reopened|escalated
    sa.Column("from_status", sa.String(16)),
    sa.Column("to_status", sa.String(16)),
    sa.Column("actor", sa.String(256)),
    sa.Column("note", sa.Text),
    sa.Column("event_at", AwareDateTime, nullable=False),
)

notifications = sa.Table(
    "notifications", metadata,
    sa.Column("notification_id", sa.String(20), primary_key=True),  # sha256(fingerprint|channel|status_event)[:20]
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("issue_id", sa.String(20), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),  # webhook URLs are resolved from the registry at send time
    sa.Column("channel", sa.String(16), nullable=False),  # email | webhook
    sa.Column("status_event", sa.String(64), nullable=False),  # opened | reopened#<n> | escalated#<n>[@agency]
    sa.Column("recipient", sa.String(256)),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # JSON posted to the webhook
    sa.Column("status", sa.String(16), nullable=False),  # pending | sent | failed
    sa.Column("transport", sa.String(16)),  # smtp | maildir | http: how it was delivered
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", AwareDateTime, nullable=False),
    sa.Column("last_attempt_at", AwareDateTime),
    sa.Column("sent_at", AwareDateTime),
    sa.UniqueConstraint("fingerprint", "channel", "status_event"),
    sa.Index("ix_notifications_status", "status"),  # the outbox counts, without reading the messages
)

notification_attempts = sa.Table(
    "notification_attempts", metadata,
    sa.Column("attempt_id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("notification_id", sa.String(20), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("attempted_at", AwareDateTime, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
)

audit_deliveries = sa.Table(
    "audit_deliveries", metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),  # the chain's order; unique by the key
    sa.Column("consumer", sa.String(128), nullable=False),
    sa.Column("scenario", sa.String(128), nullable=False),
    sa.Column("product", sa.String(128), nullable=False),
    sa.Column("partition_date", sa.Date),
    sa.Column("delivered_at", sa.String(40), nullable=False),  # ISO 8601 text, +08:00: the hashed form is exact
    sa.Column("outcome", sa.String(16), nullable=False),  # delivered | denied
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("file_sha256", sa.String(64), nullable=False),
    sa.Column("snapshot", sa.String(256), nullable=False, server_default=""),  # the published snapshot handed over
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("record_hash", sa.String(64), nullable=False),
)


# The published-snapshot updates a committed purge still owes (zqdata.revocation.owe_purge): recorded right after the
# crossing's ops commit, deleted once the snapshots follow it (`settle_owed_purges`, first thing of every boundary
# step's follow-up). A snapshot store that failed once is caught up by the next boundary step, whatever its days.
owed_snapshot_purges = sa.Table(
    "owed_snapshot_purges", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("recorded_at", sa.String(40), nullable=False),
    sa.Column("purge", sa.Text, nullable=False),  # JSON: partition_date, ended, purged, purged_lineage, product_days
)


# Registration (登记, Art. 17; zqdata/governance/registration.py): one row per registration record of a subject (a
# dataset, a product or a service), its procedure state, and every state change in `registration_events`.
registrations = sa.Table(
    "registrations", metadata,
    sa.Column("registration_id", sa.String(20), primary_key=True),  # RG-<12 hex of sha256(kind|subject|seq)>
    sa.Column("subject_kind", sa.String(16), nullable=False),  # dataset | product | service
    sa.Column("subject", sa.String(128), nullable=False),  # dataset code, product name, service name
    sa.Column("seq", sa.Integer, nullable=False),  # the subject's n-th record
    sa.Column("record_type", sa.String(16), nullable=False),  # first | change | correction | cancellation
    sa.Column("state", sa.String(16), nullable=False),  # applied|accepted|formal_review|public_notice|code_assigned|rejected
    sa.Column("code", sa.String(64)),  # the registration code once assigned (a change keeps the subject's code)
    sa.Column("registered_on", sa.Date),  # when the code was assigned
    sa.Column("version", sa.Text, nullable=False),  # canonical JSON of what is registered (fields, output columns)
    sa.Column("version_hash", sa.String(64), nullable=False),  # sha256 of `version`
    sa.Column("previous_hash", sa.String(64)),  # the version a change replaces
    sa.Column("origin", sa.String(16), nullable=False),  # registry (imported) | sync (detected) | cli
    sa.Column("note", sa.Text),
    sa.Column("applied_by", sa.String(256), nullable=False),
    sa.Column("applied_at", AwareDateTime, nullable=False),
    sa.Column("updated_at", AwareDateTime, nullable=False),
    sa.UniqueConstraint("subject_kind", "subject", "seq"),
    sa.Index("ix_registrations_code", "code"),
)

registration_events = sa.Table(
    "registration_events", metadata,
    sa.Column("event_id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("registration_id", sa.String(20), nullable=False, index=True),
    sa.Column("event", sa.String(16), nullable=False),  # applied | imported | advanced | rejected
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("event_at", AwareDateTime, nullable=False),
)

# Data demand requests (数据需求, Art. 18; zqdata/governance/demand.py): unmet needs of the operator, routed to the
# agency that holds the data, and their state changes.
demand_requests = sa.Table(
    "demand_requests", metadata,
    sa.Column("demand_id", sa.String(20), primary_key=True),  # DR-<12 hex>
    sa.Column("scenario", sa.String(128), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),  # routed to: the agency of the datasets
    sa.Column("datasets", sa.Text, nullable=False),  # JSON list of dataset codes
    sa.Column("fields", sa.Text, nullable=False),  # JSON list of "dataset.field" wanted (may not exist yet)
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # submitted | coordinating | agreed | declined | fulfilled
    sa.Column("registration_id", sa.String(20)),  # the registration record that fulfilled it
    sa.Column("requested_by", sa.String(256), nullable=False),
    sa.Column("requested_at", AwareDateTime, nullable=False),
    sa.Column("updated_at", AwareDateTime, nullable=False),
    sa.Index("ix_demand_requests_state", "state", "agency"),
)

demand_events = sa.Table(
    "demand_events", metadata,
    sa.Column("event_id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("demand_id", sa.String(20), nullable=False, index=True),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("event_at", AwareDateTime, nullable=False),
)


def default_url() -> str:
    """SQLite in the data folder (embedded default)."""
    path = get_settings().data_dir / "operational" / "operational.sqlite"
    return f"sqlite:///{path}"


def configured_url() -> URL:
    """``ZQ_OPDB_URL`` (password from ``ZQ_OPDB_PASSWORD`` when the URL has none), else the embedded SQLite file."""
    raw = os.environ.get(URL_ENV, "").strip() or default_url()
    try:
        url = make_url(raw)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"{URL_ENV} 不是有效的 SQLAlchemy URL (not a valid database URL): {exc}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"{URL_ENV}: 仅支持 sqlite 与 postgresql (only sqlite and postgresql), got {url.get_backend_name()!r}")
    if url.password is None and os.environ.get(PASSWORD_ENV):
        url = url.set(password=os.environ[PASSWORD_ENV])
    return url


def get_engine(url: str | URL | None = None) -> sa.Engine:
    """The engine of the operational DB (configured URL by default), tables created. One engine per URL and process."""
    return _engine(str(configured_url() if url is None else make_url(url).render_as_string(hide_password=False)))


@functools.cache
def _engine(url: str) -> sa.Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    for table in metadata.sorted_tables:  # an index added since the tables were made (create_all makes tables only)
        for index in table.indexes:
            index.create(engine, checkfirst=True)
    return engine


def _sqlite_on_connect(dbapi_con, _record) -> None:
    dbapi_con.isolation_level = None  # the driver's own transaction handling off: BEGIN is ours (below)
    cur = dbapi_con.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer, the writer doesn't block readers
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on a read→write upgrade


@contextlib.contextmanager
def transaction(engine: sa.Engine | None = None) -> Iterator[sa.Connection]:
    """One transaction (committed at the end of the block, rolled back on an error)."""
    with (engine or get_engine()).begin() as conn:
        yield conn


def lock_for_append(conn: sa.Connection, table: sa.Table) -> None:
    """Serialize the writers of `table` (chained appends, bulk updates) for the rest of the transaction, readers not
    blocked: PostgreSQL takes a SHARE ROW EXCLUSIVE table lock; SQLite's BEGIN IMMEDIATE already did it."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE")


def describe(engine: sa.Engine | None = None) -> str:
    """Where the operational DB is, without its password (for summaries and logs)."""
    return (engine or get_engine()).url.render_as_string(hide_password=True)
