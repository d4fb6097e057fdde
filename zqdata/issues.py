"""The quality-issue register (Art. 20): one issue per failing (dataset, rule, partition, agency), tracked until fixed.

The register lives in the operational DB (`zqdata.opdb`: tables `quality_issues` and `issue_events`), not in the gov
DuckDB file: people (`zq issues ack`), the alert sensor and the nightly run write it at any time without waiting on the
warehouse's single-writer lock. Lifecycle: open → notified → acknowledged → resolved (agency redelivered) → verified
(the check passes on the redelivered data), or reopened when the findings come back. `sync_issues` derives all of this
from `quality.findings` of the gov DB, which it only reads.

Closing is evidence-based (issue 12, finding 5): an issue is `verified` only when its rule was evaluated on the new
delivery and passed — the rule is in `quality.rule_catalog` for the partition, and the rule's checks saw rows of the
new delivery (the ODS for dbt/GX; the files accepted at ingestion for contract and delivery rules), among them rows
the issue was about. A rejected, missing or empty redelivery verifies nothing: the issue keeps its status. When the
rows the issue was about no longer exist at all (the redelivery dropped them) and the rule passed on the rows that are
there, the issue closes as `superseded`, a state of its own. Findings coming back reopen verified and superseded issues.

Concurrency: every status change reads the status and writes the new one in the same transaction (SQLite: the write
lock is taken at BEGIN; PostgreSQL: `SELECT … FOR UPDATE`). The bulk writers (`sync_issues`, `escalate_overdue`) also
lock the register table on PostgreSQL first, so they never deadlock with each other or with a delivery being recorded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import sqlalchemy as sa

from zqdata import display, lineage, opdb
from zqdata.opdb import issue_events as events_t
from zqdata.opdb import quality_issues as issues_t
from zqdata.opdb import transaction
from zqdata.registry import Registry
from zqdata.settings import TZ

log = logging.getLogger(__name__)

STATUSES = ("open", "notified", "acknowledged", "resolved", "verified", "superseded", "reopened")
OPEN_LIKE = ("open", "notified", "reopened")  # waiting for the agency; these escalate past the SLA
CLOSED = ("verified", "superseded")  # closed by a sync; the findings coming back reopen them
STATUS_CN = {
    "open": "待通知 open",
    "notified": "已通知 notified",
    "acknowledged": "已确认 acknowledged",
    "resolved": "已整改待复核 resolved",
    "verified": "已复核关闭 verified",
    "superseded": "记录已不存在关闭 superseded",
    "reopened": "重新打开 reopened",
}
SAMPLE_ROWS = 5
MAX_ROWS_LISTED = 100  # row numbers kept per delivery file in `affected_rows`; the trace and `zq issues show` give more


class IssueError(ValueError):
    """An unknown issue or a status change that is not allowed."""


@dataclass
class Issue:
    fingerprint: str
    issue_id: str
    partition_date: dt.date
    agency: str
    dataset: str
    rule: str
    dimension: str | None
    severity: str | None
    tools: str | None
    findings_count: int
    records_failed: int
    sample_rows: list[dict[str, Any]]
    affected_rows: list[dict[str, Any]]  # [{"file", "rows" (first 100 row numbers), "row_count"}], at the last sync
    trace: dict[str, Any]
    status: str
    first_seen_at: dt.datetime
    last_seen_at: dt.datetime | None
    open_since: dt.datetime | None
    notified_at: dt.datetime | None
    acknowledged_at: dt.datetime | None
    acknowledged_by: str | None
    resolved_at: dt.datetime | None
    resolution_note: str | None
    verified_at: dt.datetime | None
    escalated_at: dt.datetime | None
    reopen_count: int
    updated_at: dt.datetime


@dataclass
class SyncReport:
    partition_date: str
    opened: list[str] = field(default_factory=list)
    reopened: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)  # its rows no longer exist; the rule passed on the rest
    unverified: list[str] = field(default_factory=list)  # no finding, but the rule was not evaluated on new rows
    escalated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"分区 {self.partition_date}: 新增 {len(self.opened)}，重新打开 {len(self.reopened)}，仍未修复 {len(self.updated)}，"
            f"复核关闭 {len(self.verified)}，记录已不存在关闭 {len(self.superseded)}，未能复核 {len(self.unverified)}，"
            f"升级 {len(self.escalated)}"
        )


def fingerprint(dataset: str, rule: str, partition_date: str | dt.date, agency: str) -> str:
    """The issue's identity across reruns: sha256 of dataset|rule|partition|agency."""
    return hashlib.sha256(f"{dataset}|{rule}|{partition_date}|{agency}".encode()).hexdigest()


def issue_id_of(fp: str) -> str:
    return f"QI-{fp[:12]}"


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(TZ)).astimezone(TZ)


def _day(partition_date: str | dt.date) -> dt.date:
    return partition_date if isinstance(partition_date, dt.date) else dt.date.fromisoformat(str(partition_date))


def _event(conn: sa.Connection, fp: str, event: str, frm: str | None, to: str | None, at: dt.datetime, actor: str | None = None, note: str | None = None) -> None:
    conn.execute(
        sa.insert(events_t).values(
            fingerprint=fp, issue_id=issue_id_of(fp), event=event, from_status=frm, to_status=to, actor=actor, note=note, event_at=at
        )
    )


def _lock_register(conn: sa.Connection) -> None:
    """Bulk writers: one at a time on PostgreSQL (readers are not blocked); SQLite's BEGIN IMMEDIATE already did it.

    Taken before any row lock, so a bulk writer never holds rows while waiting (no deadlock with `FOR UPDATE` users).
    """
    opdb.lock_for_append(conn, issues_t)


@contextlib.contextmanager
def _reading(db: sa.Engine | sa.Connection) -> Iterator[sa.Connection]:
    """A connection to read with: the caller's (inside its transaction) or a short one of the engine."""
    if isinstance(db, sa.Connection):
        yield db
    else:
        with db.connect() as conn:
            yield conn


def _update(conn: sa.Connection, fp: str, **values: Any) -> None:
    conn.execute(sa.update(issues_t).where(issues_t.c.fingerprint == fp).values(**values))


# --------------------------------------------------------------------------- reading the gov DB (read only)


def _failing_groups(gov_con: duckdb.DuckDBPyConnection, partition_date: str) -> list[dict[str, Any]]:
    """quality.findings of the partition grouped by (agency, dataset, rule), with counts, the first sample rows and the
    affected delivery files and rows."""
    if not lineage.table_exists(gov_con, "quality", "findings"):
        return []
    groups = lineage.fetch_dicts(
        gov_con,
        """
        select agency, dataset, rule,
               min(dimension) as dimension,
               case when bool_or(severity = 'error') then 'error' else 'warn' end as severity,
               string_agg(distinct tool, ',' order by tool) as tools,
               count(*) as findings_count,
               -- records: row-level findings only; a file- or dataset-level finding is about no record of its own
               count(distinct case when lineage_id is not null or row_number is not null
                                   then coalesce(lineage_id, delivery_file || '#' || row_number::varchar) end)
                   as records_failed
        from quality.findings
        where partition_date = ?::date
        group by all
        order by dataset, rule, agency
        """,
        [partition_date],
    )
    samples = lineage.fetch_dicts(
        gov_con,
        f"""
        select * from quality.findings
        where partition_date = ?::date
        qualify row_number() over (partition by agency, dataset, rule order by delivery_file, row_number nulls first, field) <= {SAMPLE_ROWS}
        """,
        [partition_date],
    )
    files = gov_con.execute(
        f"""select agency, dataset, rule, coalesce(delivery_file, '') as file,
                   list(distinct row_number order by row_number)[1:{MAX_ROWS_LISTED}] as rows,
                   count(distinct row_number) as row_count
            from quality.findings where partition_date = ?::date
            group by all order by file""",
        [partition_date],
    ).fetchall()
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        by_key.setdefault((s["agency"], s["dataset"], s["rule"]), []).append(s)
    affected: dict[tuple, list[dict[str, Any]]] = {}
    for agency, dataset, rule, file, rows, n in files:
        affected.setdefault((agency, dataset, rule), []).append(
            {"file": file, "rows": [int(x) for x in (rows or []) if x is not None], "row_count": int(n)}
        )
    for g in groups:
        key = (g["agency"], g["dataset"], g["rule"])
        g["samples"] = by_key.get(key, [])
        g["affected_rows"] = affected.get(key, [])
    return groups


def _checked_datasets(gov_con: duckdb.DuckDBPyConnection, partition_date: str) -> set[str] | None:
    """Datasets whose quality was (re)evaluated for the partition (quality.scores), or None if scores are not kept.

    Guards against verifying issues merely because findings for a dataset were not computed yet.
    """
    if not lineage.table_exists(gov_con, "quality", "scores"):
        return None
    rows = gov_con.execute("select distinct dataset from quality.scores where partition_date = ?::date", [partition_date]).fetchall()
    return {r[0] for r in rows} if rows else None


# Which delivered rows a rule's checks see: dbt and GX read the ODS (through staging); the contract ('pandera') and
# delivery rules check the files ingestion accepted (their rows are in the ODS or, failing a row rule, in quarantine).
ODS_TOOLS = frozenset({"dbt", "gx"})
# meta.deliveries statuses of files whose rows no row rule checked: not delivered, rejected, quarantined as a whole
UNCHECKED_FILE_STATUSES = frozenset({"missing", "rejected", "quarantined", "duplicate", "error"})


@dataclass
class _Evidence:
    """What the gov DB records about the partition's evaluation (read before the register is written)."""

    rules: set[tuple[str, str]] | None  # (dataset, rule) of quality.rule_catalog; None when no catalog is kept
    deliveries: dict[str, list[tuple[str | None, str | None, int]]] | None  # dataset -> [(file, status, rows checked)]
    ods_rows: dict[str, int]  # dataset -> rows of the partition in the ODS


def _evidence(gov_con: duckdb.DuckDBPyConnection, day: str, datasets: Iterable[str]) -> _Evidence:
    rules = None
    if lineage.table_exists(gov_con, "quality", "rule_catalog"):
        rules = {(d, r) for d, r in gov_con.execute(
            "select distinct dataset, rule from quality.rule_catalog where partition_date = ?::date", [day]).fetchall()}
    deliveries = None
    if lineage.table_exists(gov_con, "meta", "deliveries"):
        deliveries = {}
        for ds, file, status, rows, accepted in gov_con.execute(
            "select dataset, delivery_file, status, coalesce(rows_delivered, 0), coalesce(rows_accepted, 0)"
            " from meta.deliveries where partition_date = ?::date", [day]
        ).fetchall():
            # a file whose status is `error` for a file-level finding (checksum or count mismatch, no manifest) still
            # had its rows read and checked when some were accepted
            if status == "error" and accepted > 0:
                status = "checked_with_file_error"
            deliveries.setdefault(ds, []).append((file, status, int(rows)))
    ods_rows = {}
    for ds in set(datasets):
        if lineage.table_exists(gov_con, "ods", ds):
            ods_rows[ds] = gov_con.execute(
                f"select count(*) from ods.{_ident(ds)} where _partition_date = ?::date", [day]).fetchone()[0]
    return _Evidence(rules, deliveries, ods_rows)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rows_present(gov_con: duckdb.DuckDBPyConnection, day: str, dataset: str, affected: Sequence[Mapping[str, Any]],
                  *, ods: bool, quarantine: bool, files: set[str] | None = None) -> int:
    """How many of the rows an issue was about (its `affected_rows`: delivery file and row numbers) are in the
    partition's ODS and/or quarantine now, counting only `files` when given. Row numbers beyond the first
    MAX_ROWS_LISTED kept in the register count as "any row after the last one listed"."""
    conds, params = [], []
    for f in affected:
        rows = [int(r) for r in f.get("rows") or []]
        if not rows or (files is not None and f.get("file") not in files):
            continue
        more = int(f.get("row_count") or 0) > len(rows)
        conds.append("(_delivery_file = ? and (list_contains(?, _row_number) or (? and _row_number > ?)))")
        params += [f.get("file"), rows, more, max(rows)]
    if not conds:
        return 0
    where = " or ".join(conds)
    tables = []
    if ods and lineage.table_exists(gov_con, "ods", dataset):
        tables.append((f"ods.{_ident(dataset)}", "_partition_date = ?::date", [day]))
    if quarantine and lineage.table_exists(gov_con, "quarantine", "rows"):
        tables.append(("quarantine.rows", "_partition_date = ?::date and _dataset = ?", [day, dataset]))
    return sum(gov_con.execute(f"select count(*) from {t} where {w} and ({where})", [*p, *params]).fetchone()[0]
               for t, w, p in tables)


def _closing(gov_con: duckdb.DuckDBPyConnection, ev: _Evidence, day: str, issue: Mapping[str, Any]) -> tuple[str, str]:
    """("verified" | "superseded" | "unverified", the reason in Chinese) for an issue whose findings are absent now."""
    ds, rule = issue["dataset"], issue["rule"]
    if ev.rules is not None and (ds, rule) not in ev.rules:
        return "unverified", "未能复核：该规则未在本次交付上执行"
    tools = {t for t in (issue["tools"] or "").split(",") if t}
    reads_ods = not tools or bool(tools & ODS_TOOLS)  # unknown tool: the strictest evidence
    files = ev.deliveries.get(ds, []) if ev.deliveries is not None else None
    if reads_ods:
        checked_rows, checked_files = ev.ods_rows.get(ds, 0), None
    elif files is None:  # no delivery accounting kept: the ODS is what is known to have been checked
        checked_rows, checked_files = ev.ods_rows.get(ds, 0), None
    else:
        accepted = [(f, n) for f, st, n in files if st not in UNCHECKED_FILE_STATUSES]
        checked_rows, checked_files = sum(n for _, n in accepted), {f for f, _ in accepted if f}
    affected = json.loads(issue["affected_rows"] or "[]")
    if not any(f.get("rows") for f in affected):  # a delivery- or dataset-level issue: no rows of its own
        if reads_ods or files is None:
            ok = checked_rows > 0
        else:  # the delivery was read: not missing, not rejected as a whole
            ok = any(st not in ("missing", "rejected") for _, st, _ in files)
        return ("verified", "复核通过：该规则在重新交付的数据上已执行且通过") if ok else (
            "unverified", "未能复核：重新交付被拒收、未交付或没有可检查的记录")
    if checked_rows == 0:
        return "unverified", "未能复核：重新交付被拒收、为空或未交付，该规则没有检查任何记录"
    if _rows_present(gov_con, day, ds, affected, ods=True, quarantine=not reads_ods, files=checked_files):
        return "verified", f"复核通过：该规则在重新交付的 {checked_rows} 条记录上已执行且通过，包括原问题记录"
    if _rows_present(gov_con, day, ds, affected, ods=True, quarantine=True):
        return "unverified", "未能复核：原问题记录仍在，但未经该规则检查（整文件或因其他规则被隔离）"
    return "superseded", f"原问题记录在重新交付中已不存在；该规则在新交付的 {checked_rows} 条记录上已执行且通过"


def _failed_note(group: Mapping[str, Any]) -> str:
    n = int(group.get("records_failed") or 0)
    return f"{n} 条记录未通过" if n else "交付文件或数据集级问题，不涉及单条记录 (file- or dataset-level)"


def _trace_json(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection | None, registry: Registry, samples: Sequence[Mapping[str, Any]]) -> str:
    return _trace_and_samples(gov_con, ops_con, registry, samples)[0]


def _trace_and_samples(
    gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection | None, registry: Registry,
    samples: Sequence[Mapping[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    """(trace JSON, sample findings for display). The samples are the trace's findings: their details were masked by
    field classification with the rows' raw values at hand; without a trace, by classification alone."""
    try:
        t = lineage.trace(gov_con, ops_con, registry, "gov/quality/findings", finding=list(samples))
        return t.to_json(), t.findings[: len(samples)]
    except (lineage.TraceError, KeyError, duckdb.Error) as exc:  # a trace failure must not lose the issue itself
        err = display.scrub_text(str(exc))  # an engine error may quote a value: free text, pattern scrub
        log.warning("溯源失败 trace failed: %s", err)
        return (json.dumps({"error": f"溯源失败: {err}"}, ensure_ascii=False),
                [lineage.finding_for_display(s, registry) for s in samples])


# --------------------------------------------------------------------------- sync and escalation


def sync_issues(
    gov_con: duckdb.DuckDBPyConnection,
    db: sa.Engine,
    registry: Registry,
    partition_date: str | dt.date,
    *,
    now: dt.datetime | None = None,
    ops_con: duckdb.DuckDBPyConnection | None = None,
) -> SyncReport:
    """Derive the partition's issues from `quality.findings` (gov DB, only read): open new ones, reopen returning ones,
    close fixed ones (verified or superseded, on evidence: module docstring), escalate overdue ones — all in one
    transaction of the operational DB `db`."""
    day = _day(partition_date)
    at = _now(now)
    report = SyncReport(partition_date=day.isoformat())
    # Everything the gov DB can tell is read first: the operational transaction below never waits on DuckDB.
    groups = _failing_groups(gov_con, day.isoformat())
    checked = _checked_datasets(gov_con, day.isoformat())
    failing = {fingerprint(g["dataset"], g["rule"], day, g["agency"]
                           or (registry.datasets[g["dataset"]].agency if g["dataset"] in registry.datasets else ""))
               for g in groups}
    with _reading(db) as conn:  # the partition's issues without findings now: how each may close (gov DB evidence)
        candidates = [dict(r) for r in conn.execute(
            sa.select(issues_t.c.fingerprint, issues_t.c.dataset, issues_t.c.rule, issues_t.c.tools,
                      issues_t.c.affected_rows)
            .where(issues_t.c.partition_date == day, issues_t.c.status.not_in(CLOSED))
        ).mappings() if r["fingerprint"] not in failing]
    evidence = _evidence(gov_con, day.isoformat(), [c["dataset"] for c in candidates])
    closing = {c["fingerprint"]: _closing(gov_con, evidence, day.isoformat(), c) for c in candidates
               if checked is None or c["dataset"] in checked}
    # the traces below read their sample rows from one read per dataset (inside frozen_catalog; else each its own)
    lineage.prefetch_source_rows(gov_con, registry, [s["lineage_id"] for g in groups for s in g["samples"]
                                                     if s.get("lineage_id")])
    prepared = []
    for g in groups:
        agency = g["agency"] or (registry.datasets[g["dataset"]].agency if g["dataset"] in registry.datasets else "")
        fp = fingerprint(g["dataset"], g["rule"], day, agency)
        values = {
            "dimension": g["dimension"],
            "severity": g["severity"],
            "tools": g["tools"],
            "findings_count": int(g["findings_count"]),
            "records_failed": int(g["records_failed"]),
            "affected_rows": json.dumps(g["affected_rows"], ensure_ascii=False),
        }
        trace_json, samples = _trace_and_samples(gov_con, ops_con, registry, g["samples"])
        values["sample_rows"] = json.dumps(samples, ensure_ascii=False)
        values["trace"] = trace_json
        prepared.append((fp, agency, g, values))

    with transaction(db) as conn:
        _lock_register(conn)
        seen: set[str] = set()
        for fp, agency, g, values in prepared:
            seen.add(fp)
            cur = conn.execute(sa.select(issues_t.c.status).where(issues_t.c.fingerprint == fp).with_for_update()).first()
            if cur is None:
                conn.execute(
                    sa.insert(issues_t).values(
                        fingerprint=fp, issue_id=issue_id_of(fp), partition_date=day, agency=agency, dataset=g["dataset"],
                        rule=g["rule"], **values, status="open", first_seen_at=at, last_seen_at=at, open_since=at,
                        reopen_count=0, updated_at=at,
                    )
                )
                _event(conn, fp, "opened", None, "open", at, note=_failed_note(g))
                report.opened.append(issue_id_of(fp))
                continue
            status = cur.status
            _update(conn, fp, **values, last_seen_at=at, updated_at=at)
            if status in ("resolved", *CLOSED):
                _update(
                    conn, fp, status="reopened", open_since=at, escalated_at=None,
                    reopen_count=issues_t.c.reopen_count + 1, verified_at=None,
                )
                _event(conn, fp, "reopened", status, "reopened", at, note="重新交付后仍未通过：" + _failed_note(g))
                report.reopened.append(issue_id_of(fp))
            else:
                report.updated.append(issue_id_of(fp))
        rows = conn.execute(
            sa.select(issues_t.c.fingerprint, issues_t.c.status, issues_t.c.dataset)
            .where(issues_t.c.partition_date == day, issues_t.c.status.not_in(CLOSED))
            .order_by(issues_t.c.fingerprint)
            .with_for_update()
        ).all()
        for fp, status, ds in rows:
            if fp in seen or (checked is not None and ds not in checked):
                continue
            # No finding now. Closed only on evidence that the rule was evaluated on the redelivered rows and passed.
            outcome, note = closing.get(fp, ("unverified", "未能复核：问题在读取复核证据后才登记"))
            if outcome == "unverified":
                report.unverified.append(issue_id_of(fp))
                continue
            _update(conn, fp, status=outcome, updated_at=at, **({"verified_at": at} if outcome == "verified" else {}))
            _event(conn, fp, outcome, status, outcome, at, note=note)
            (report.verified if outcome == "verified" else report.superseded).append(issue_id_of(fp))
        report.escalated = _escalate(conn, registry, at)
    log.info("质量问题同步 %s", report.summary())
    return report


def escalate_overdue(db: sa.Engine, registry: Registry, now: dt.datetime | None = None) -> list[str]:
    """Escalate issues still open/notified/reopened at or past their dataset's SLA hours; returns the escalated ids."""
    with transaction(db) as conn:
        _lock_register(conn)
        return _escalate(conn, registry, _now(now))


# open, notified or reopened, not yet escalated, with an SLA clock: what escalation waits for
_WAITING = (issues_t.c.escalated_at.is_(None), issues_t.c.status.in_(OPEN_LIKE), issues_t.c.open_since.is_not(None))


def _overdue_candidates(conn: sa.Connection, *, lock: bool, registry: Registry | None = None,
                        at: dt.datetime | None = None) -> list[sa.Row]:
    """Open, not escalated issues with an SLA clock; with ``registry`` and ``at``, only those open since before ``at``
    minus the shortest SLA of the registry (the others cannot be overdue: open issues pile up, and reading every one
    each night grew with history; issue 15)."""
    q = (
        sa.select(issues_t.c.fingerprint, issues_t.c.dataset, issues_t.c.status, issues_t.c.open_since)
        .where(*_WAITING)
        .order_by(issues_t.c.fingerprint)
    )
    slas = [ds.delivery.sla_hours for ds in (registry.datasets.values() if registry is not None else [])]
    if at is not None and slas:
        q = q.where(issues_t.c.open_since <= at - dt.timedelta(hours=min(slas)))
    return conn.execute(q.with_for_update() if lock else q).all()


def _sla(registry: Registry, dataset: str) -> dt.timedelta | None:
    ds = registry.datasets.get(dataset)
    return None if ds is None else dt.timedelta(hours=ds.delivery.sla_hours)


def _escalate(conn: sa.Connection, registry: Registry, at: dt.datetime) -> list[str]:
    out = []
    for fp, ds, status, since in _overdue_candidates(conn, lock=True, registry=registry, at=at):
        sla = _sla(registry, ds)
        if sla is None or at < since + sla:
            continue
        _update(conn, fp, escalated_at=at, updated_at=at)
        hours = registry.datasets[ds].delivery.sla_hours
        _event(conn, fp, "escalated", status, status, at, note=f"超过 {hours} 小时（数据集时限 SLA）仍未处理，已升级")
        out.append(issue_id_of(fp))
    return out


def next_escalation_due(db: sa.Engine | sa.Connection, registry: Registry) -> dt.datetime | None:
    """The earliest moment an open/notified/reopened, not yet escalated issue reaches its dataset's SLA (from then on
    `escalate_overdue` escalates it), or None when no issue is waiting for escalation."""
    c = issues_t.c
    earliest = sa.func.min(c.open_since, type_=issues_t.c.open_since.type)  # ISO text in one zone: ordered as times
    with _reading(db) as conn:  # per dataset, in SQL: open issues pile up (16,000 after a year in the simulation)
        rows = conn.execute(sa.select(c.dataset, earliest).where(*_WAITING).group_by(c.dataset)).all()
    dues = [since + sla for ds, since in rows if since is not None and (sla := _sla(registry, ds)) is not None]
    return min(dues) if dues else None


# --------------------------------------------------------------------------- people's actions


def _find(conn: sa.Connection, issue_id: str, *, lock: bool = False) -> tuple[str, str]:
    """(fingerprint, status) of an issue given its id (QI-…) or a fingerprint prefix; locked for update if asked."""
    key = issue_id.strip()
    prefix = (key[3:] if key.upper().startswith("QI-") else key).lower()
    if not prefix:
        raise IssueError("请给出问题编号 (issue id required)")
    q = sa.select(issues_t.c.fingerprint, issues_t.c.status).where(
        sa.or_(issues_t.c.issue_id == key, issues_t.c.fingerprint.startswith(prefix, autoescape=True))
    ).order_by(issues_t.c.fingerprint).limit(2)
    rows = conn.execute(q.with_for_update() if lock else q).all()
    if not rows:
        raise IssueError(f"没有质量问题 {issue_id!r} (unknown issue)")
    if len(rows) > 1:
        raise IssueError(f"问题编号 {issue_id!r} 不唯一，请给出更长的编号 (ambiguous)")
    return rows[0][0], rows[0][1]


def _transition(db: sa.Engine, issue_id: str, event: str, allowed: Sequence[str], to: str, values: dict[str, Any], at: dt.datetime, actor: str | None, note: str | None) -> Issue:
    with transaction(db) as conn:
        fp, status = _find(conn, issue_id, lock=True)  # read and write the status in one transaction
        if status not in allowed:
            raise IssueError(
                f"问题 {issue_id_of(fp)} 当前状态为 {STATUS_CN[status]}，不能执行 {event} (allowed from: {', '.join(allowed)})"
            )
        _update(conn, fp, status=to, **values, updated_at=at)
        _event(conn, fp, event, status, to, at, actor, note)
        return _get(conn, fp)


def acknowledge(db: sa.Engine, issue_id: str, by: str, note: str | None = None, now: dt.datetime | None = None) -> Issue:
    """The agency acknowledges the issue (确认)."""
    if not by.strip():
        raise IssueError("确认人不能为空 (--by is required)")
    at = _now(now)
    return _transition(db, issue_id, "acknowledged", OPEN_LIKE, "acknowledged", {"acknowledged_at": at, "acknowledged_by": by}, at, by, note)


def resolve(db: sa.Engine, issue_id: str, note: str, by: str | None = None, now: dt.datetime | None = None) -> Issue:
    """The agency says it fixed the data and redelivered (已整改); the next sync verifies or reopens it."""
    if not note.strip():
        raise IssueError("请说明整改情况 (--note is required)")
    at = _now(now)
    return _transition(db, issue_id, "resolved", (*OPEN_LIKE, "acknowledged"), "resolved", {"resolved_at": at, "resolution_note": note}, at, by, note)


def mark_notified(conn: sa.Connection, fp: str, channel: str, now: dt.datetime | None = None) -> bool:
    """Record (in the caller's transaction) that the agency was notified on a channel; open/reopened issues become
    notified. Returns whether the status changed."""
    at = _now(now)
    row = conn.execute(sa.select(issues_t.c.status).where(issues_t.c.fingerprint == fp).with_for_update()).first()
    if row is None:
        raise IssueError(f"没有质量问题 {fp}")
    if row.status not in ("open", "reopened"):
        _event(conn, fp, "notified", row.status, row.status, at, note=f"通道 {channel}")
        return False
    _update(conn, fp, status="notified", notified_at=at, updated_at=at)
    _event(conn, fp, "notified", row.status, "notified", at, note=f"通道 {channel}")
    return True


# --------------------------------------------------------------------------- reading


def _issue(row: Mapping[str, Any]) -> Issue:
    d = dict(row)
    d["sample_rows"] = json.loads(d["sample_rows"] or "[]")
    d["affected_rows"] = json.loads(d["affected_rows"] or "[]")
    d["trace"] = json.loads(d["trace"] or "{}")
    d["findings_count"] = int(d["findings_count"] or 0)
    d["records_failed"] = int(d["records_failed"] or 0)
    return Issue(**d)


def _get(conn: sa.Connection, fp: str) -> Issue:
    return _issue(conn.execute(sa.select(issues_t).where(issues_t.c.fingerprint == fp)).mappings().one())


def issues_by_fingerprint(conn: sa.Connection, fingerprints: Iterable[str]) -> dict[str, Issue]:
    """{fingerprint: issue} of the given issues, read in pages."""
    fps, out = sorted(set(fingerprints)), {}
    for i in range(0, len(fps), 500):
        for row in conn.execute(sa.select(issues_t).where(issues_t.c.fingerprint.in_(fps[i:i + 500]))).mappings():
            out[row["fingerprint"]] = _issue(row)
    return out


def get_issue(db: sa.Engine | sa.Connection, issue_id: str) -> Issue:
    with _reading(db) as conn:
        fp, _ = _find(conn, issue_id)
        return _get(conn, fp)


def list_issues(
    db: sa.Engine | sa.Connection,
    *,
    status: Iterable[str] | None = None,
    agency: str | None = None,
    partition_date: str | dt.date | None = None,
    dataset: str | None = None,
) -> list[Issue]:
    """Issues filtered by status, agency, partition and dataset; newest partition first, then agency, dataset, rule."""
    q = sa.select(issues_t)
    if status:
        status = list(status)
        bad = [s for s in status if s not in STATUSES]
        if bad:
            raise IssueError(f"未知状态 {bad}; statuses: {', '.join(STATUSES)}")
        q = q.where(issues_t.c.status.in_(status))
    if agency:
        q = q.where(issues_t.c.agency == agency)
    if dataset:
        q = q.where(issues_t.c.dataset == dataset)
    if partition_date:
        q = q.where(issues_t.c.partition_date == _day(partition_date))
    with _reading(db) as conn:
        out = [_issue(r) for r in conn.execute(q).mappings()]
    # Sorted here: the same order on both engines (PostgreSQL's collation would differ from SQLite's for text).
    out.sort(key=lambda i: (i.agency, i.dataset, i.rule))
    out.sort(key=lambda i: i.partition_date, reverse=True)
    return out


def issue_events(db: sa.Engine | sa.Connection, issue_id: str) -> list[dict[str, Any]]:
    with _reading(db) as conn:
        fp, _ = _find(conn, issue_id)
        rows = conn.execute(sa.select(events_t).where(events_t.c.fingerprint == fp).order_by(events_t.c.event_id)).mappings()
        return [dict(r) for r in rows]
