"""The quality-issue register (Art. 20): one issue per failing (dataset, rule, partition, agency), tracked until fixed.

Tables in the gov DB: `governance.quality_issues` (one row per fingerprint) and `governance.issue_events` (every status
change). Lifecycle: open → notified → acknowledged → resolved (agency redelivered) → verified (the check passes on the
redelivered data), or reopened when the findings come back. `sync_issues` derives all of this from `quality.findings`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb

from zqdata import lineage
from zqdata.registry import Registry
from zqdata.settings import TZ

log = logging.getLogger(__name__)

STATUSES = ("open", "notified", "acknowledged", "resolved", "verified", "reopened")
OPEN_LIKE = ("open", "notified", "reopened")  # waiting for the agency; these escalate past the SLA
STATUS_CN = {
    "open": "待通知 open",
    "notified": "已通知 notified",
    "acknowledged": "已确认 acknowledged",
    "resolved": "已整改待复核 resolved",
    "verified": "已复核关闭 verified",
    "reopened": "重新打开 reopened",
}
SAMPLE_ROWS = 5

DDL = """
create schema if not exists governance;
create table if not exists governance.quality_issues (
    fingerprint      varchar primary key,   -- sha256(dataset|rule|partition|agency)
    issue_id         varchar not null,      -- QI-<first 12 hex>, what people type
    partition_date   date not null,
    agency           varchar not null,
    dataset          varchar not null,
    rule             varchar not null,
    dimension        varchar,
    severity         varchar,
    tools            varchar,
    findings_count   integer,
    records_failed   integer,
    sample_rows      varchar,               -- JSON list of masked finding rows
    trace            varchar,               -- JSON of lineage.Trace
    status           varchar not null,
    first_seen_at    timestamptz not null,
    last_seen_at     timestamptz,
    open_since       timestamptz,           -- SLA clock: when it was (re)opened
    notified_at      timestamptz,
    acknowledged_at  timestamptz,
    acknowledged_by  varchar,
    resolved_at      timestamptz,
    resolution_note  varchar,
    verified_at      timestamptz,
    escalated_at     timestamptz,
    reopen_count     integer not null default 0,
    updated_at       timestamptz not null
);
create sequence if not exists governance.issue_event_seq;
create table if not exists governance.issue_events (
    event_id     bigint primary key default nextval('governance.issue_event_seq'),
    fingerprint  varchar not null,
    issue_id     varchar not null,
    event        varchar not null,   -- opened|updated|notified|acknowledged|resolved|verified|reopened|escalated
    from_status  varchar,
    to_status    varchar,
    actor        varchar,
    note         varchar,
    event_at     timestamptz not null
);
"""


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
    escalated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"分区 {self.partition_date}: 新增 {len(self.opened)}，重新打开 {len(self.reopened)}，仍未修复 {len(self.updated)}，"
            f"复核关闭 {len(self.verified)}，升级 {len(self.escalated)}"
        )


def fingerprint(dataset: str, rule: str, partition_date: str | dt.date, agency: str) -> str:
    """The issue's identity across reruns: sha256 of dataset|rule|partition|agency."""
    return hashlib.sha256(f"{dataset}|{rule}|{partition_date}|{agency}".encode()).hexdigest()


def issue_id_of(fp: str) -> str:
    return f"QI-{fp[:12]}"


def ensure_tables(gov_con: duckdb.DuckDBPyConnection) -> None:
    gov_con.execute(DDL)


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(TZ)).astimezone(TZ)


def _event(con: duckdb.DuckDBPyConnection, fp: str, event: str, frm: str | None, to: str | None, at: dt.datetime, actor: str | None = None, note: str | None = None) -> None:
    con.execute(
        "insert into governance.issue_events (fingerprint, issue_id, event, from_status, to_status, actor, note, event_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
        [fp, issue_id_of(fp), event, frm, to, actor, note, at],
    )



def _failing_groups(gov_con: duckdb.DuckDBPyConnection, partition_date: str) -> list[dict[str, Any]]:
    """quality.findings of the partition grouped by (agency, dataset, rule), with counts and the first sample rows."""
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
               count(distinct coalesce(lineage_id, delivery_file || '#' || coalesce(row_number::varchar, ''))) as records_failed
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
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        by_key.setdefault((s["agency"], s["dataset"], s["rule"]), []).append(s)
    for g in groups:
        g["samples"] = by_key.get((g["agency"], g["dataset"], g["rule"]), [])
    return groups


def _checked_datasets(gov_con: duckdb.DuckDBPyConnection, partition_date: str) -> set[str] | None:
    """Datasets whose quality was (re)evaluated for the partition (quality.scores), or None if scores are not kept.

    Guards against verifying issues merely because findings for a dataset were not computed yet.
    """
    if not lineage.table_exists(gov_con, "quality", "scores"):
        return None
    rows = gov_con.execute("select distinct dataset from quality.scores where partition_date = ?::date", [partition_date]).fetchall()
    return {r[0] for r in rows} if rows else None


def sync_issues(
    gov_con: duckdb.DuckDBPyConnection,
    registry: Registry,
    partition_date: str | dt.date,
    *,
    now: dt.datetime | None = None,
    ops_con: duckdb.DuckDBPyConnection | None = None,
) -> SyncReport:
    """Derive the partition's issues from `quality.findings`: open new ones, reopen returning ones, verify fixed ones, escalate."""
    day = str(partition_date)
    at = _now(now)
    ensure_tables(gov_con)
    report = SyncReport(partition_date=day)
    groups = _failing_groups(gov_con, day)
    gov_con.execute("begin transaction")
    try:
        seen: set[str] = set()
        for g in groups:
            agency = g["agency"] or (registry.datasets[g["dataset"]].agency if g["dataset"] in registry.datasets else "")
            fp = fingerprint(g["dataset"], g["rule"], day, agency)
            seen.add(fp)
            samples = [lineage.finding_for_display(s) for s in g["samples"]]
            tr = _trace_json(gov_con, ops_con, registry, g["samples"])
            cur = gov_con.execute("select status from governance.quality_issues where fingerprint = ?", [fp]).fetchone()
            values = [g["dimension"], g["severity"], g["tools"], g["findings_count"], g["records_failed"], json.dumps(samples, ensure_ascii=False), tr]
            if cur is None:
                gov_con.execute(
                    """insert into governance.quality_issues
                       (fingerprint, issue_id, partition_date, agency, dataset, rule, dimension, severity, tools, findings_count,
                        records_failed, sample_rows, trace, status, first_seen_at, last_seen_at, open_since, reopen_count, updated_at)
                       values (?, ?, ?::date, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, 0, ?)""",
                    [fp, issue_id_of(fp), day, agency, g["dataset"], g["rule"], *values, at, at, at, at],
                )
                _event(gov_con, fp, "opened", None, "open", at, note=f"{g['records_failed']} 条记录未通过")
                report.opened.append(issue_id_of(fp))
                continue
            status = cur[0]
            gov_con.execute(
                """update governance.quality_issues set dimension = ?, severity = ?, tools = ?, findings_count = ?,
                   records_failed = ?, sample_rows = ?, trace = ?, last_seen_at = ?, updated_at = ? where fingerprint = ?""",
                [*values, at, at, fp],
            )
            if status in ("resolved", "verified"):
                gov_con.execute(
                    """update governance.quality_issues set status = 'reopened', open_since = ?, escalated_at = null,
                       reopen_count = reopen_count + 1, verified_at = null where fingerprint = ?""",
                    [at, fp],
                )
                _event(gov_con, fp, "reopened", status, "reopened", at, note=f"重新交付后仍有 {g['records_failed']} 条记录未通过")
                report.reopened.append(issue_id_of(fp))
            else:
                report.updated.append(issue_id_of(fp))
        checked = _checked_datasets(gov_con, day)
        for fp, status, ds in gov_con.execute(
            "select fingerprint, status, dataset from governance.quality_issues where partition_date = ?::date and status <> 'verified'",
            [day],
        ).fetchall():
            if fp in seen or (checked is not None and ds not in checked):
                continue
            # The check passes on the current data of the partition (redelivered and re-checked): the fix is verified.
            gov_con.execute(
                "update governance.quality_issues set status = 'verified', verified_at = ?, updated_at = ? where fingerprint = ?",
                [at, at, fp],
            )
            _event(gov_con, fp, "verified", status, "verified", at, note="复核通过：该规则在当前数据上不再失败")
            report.verified.append(issue_id_of(fp))
        report.escalated = _escalate(gov_con, registry, at)
        gov_con.execute("commit")
    except Exception:
        gov_con.execute("rollback")
        raise
    log.info("质量问题同步 %s", report.summary())
    return report


def _trace_json(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection | None, registry: Registry, samples: Sequence[Mapping[str, Any]]) -> str:
    try:
        t = lineage.trace(gov_con, ops_con, registry, "gov/quality/findings", finding=list(samples))
        return t.to_json()
    except (lineage.TraceError, KeyError, duckdb.Error) as exc:  # a trace failure must not lose the issue itself
        log.warning("溯源失败 trace failed: %s", exc)
        return json.dumps({"error": f"溯源失败: {exc}"}, ensure_ascii=False)


def escalate_overdue(gov_con: duckdb.DuckDBPyConnection, registry: Registry, now: dt.datetime | None = None) -> list[str]:
    """Escalate issues still open/notified/reopened past their dataset's SLA hours; returns the escalated issue ids."""
    ensure_tables(gov_con)
    gov_con.execute("begin transaction")
    try:
        out = _escalate(gov_con, registry, _now(now))
        gov_con.execute("commit")
    except Exception:
        gov_con.execute("rollback")
        raise
    return out


def _escalate(gov_con: duckdb.DuckDBPyConnection, registry: Registry, at: dt.datetime) -> list[str]:
    out = []
    rows = gov_con.execute(
        f"""select fingerprint, dataset, status, open_since from governance.quality_issues
            where escalated_at is null and status in {OPEN_LIKE}"""
    ).fetchall()
    for fp, ds, status, since in rows:
        ds_def = registry.datasets.get(ds)
        if ds_def is None or since is None:
            continue
        hours = ds_def.delivery.sla_hours
        if at - since > dt.timedelta(hours=hours):
            gov_con.execute("update governance.quality_issues set escalated_at = ?, updated_at = ? where fingerprint = ?", [at, at, fp])
            _event(gov_con, fp, "escalated", status, status, at, note=f"超过 {hours} 小时（数据集时限 SLA）仍未处理，已升级")
            out.append(issue_id_of(fp))
    return out


# --------------------------------------------------------------------------- people's actions


def _resolve_id(gov_con: duckdb.DuckDBPyConnection, issue_id: str) -> tuple[str, str]:
    ensure_tables(gov_con)
    key = issue_id.strip()
    prefix = key[3:] if key.upper().startswith("QI-") else key
    rows = gov_con.execute(
        "select fingerprint, status from governance.quality_issues where issue_id = ? or fingerprint like ? || '%'", [key, prefix.lower()]
    ).fetchall()
    if not rows:
        raise IssueError(f"没有质量问题 {issue_id!r} (unknown issue)")
    if len(rows) > 1:
        raise IssueError(f"问题编号 {issue_id!r} 不唯一，请给出更长的编号 (ambiguous)")
    return rows[0][0], rows[0][1]


def _transition(gov_con: duckdb.DuckDBPyConnection, issue_id: str, event: str, allowed: Sequence[str], to: str, sets: str, params: list[Any], at: dt.datetime, actor: str | None, note: str | None) -> Issue:
    fp, status = _resolve_id(gov_con, issue_id)
    if status not in allowed:
        raise IssueError(
            f"问题 {issue_id_of(fp)} 当前状态为 {STATUS_CN[status]}，不能执行 {event} (allowed from: {', '.join(allowed)})"
        )
    gov_con.execute("begin transaction")
    try:
        gov_con.execute(f"update governance.quality_issues set status = ?, {sets}, updated_at = ? where fingerprint = ?", [to, *params, at, fp])
        _event(gov_con, fp, event, status, to, at, actor, note)
        gov_con.execute("commit")
    except Exception:
        gov_con.execute("rollback")
        raise
    return get_issue(gov_con, fp)


def acknowledge(gov_con: duckdb.DuckDBPyConnection, issue_id: str, by: str, note: str | None = None, now: dt.datetime | None = None) -> Issue:
    """The agency acknowledges the issue (确认)."""
    if not by.strip():
        raise IssueError("确认人不能为空 (--by is required)")
    at = _now(now)
    return _transition(gov_con, issue_id, "acknowledged", OPEN_LIKE, "acknowledged", "acknowledged_at = ?, acknowledged_by = ?", [at, by], at, by, note)


def resolve(gov_con: duckdb.DuckDBPyConnection, issue_id: str, note: str, by: str | None = None, now: dt.datetime | None = None) -> Issue:
    """The agency says it fixed the data and redelivered (已整改); the next sync verifies or reopens it."""
    if not note.strip():
        raise IssueError("请说明整改情况 (--note is required)")
    at = _now(now)
    return _transition(gov_con, issue_id, "resolved", (*OPEN_LIKE, "acknowledged"), "resolved", "resolved_at = ?, resolution_note = ?", [at, note], at, by, note)


def mark_notified(gov_con: duckdb.DuckDBPyConnection, fp: str, channel: str, now: dt.datetime | None = None) -> bool:
    """Record that the agency was notified on a channel; open/reopened issues become notified. Returns whether status changed."""
    at = _now(now)
    row = gov_con.execute("select status from governance.quality_issues where fingerprint = ?", [fp]).fetchone()
    if row is None:
        raise IssueError(f"没有质量问题 {fp}")
    if row[0] not in ("open", "reopened"):
        _event(gov_con, fp, "notified", row[0], row[0], at, note=f"通道 {channel}")
        return False
    gov_con.execute("update governance.quality_issues set status = 'notified', notified_at = ?, updated_at = ? where fingerprint = ?", [at, at, fp])
    _event(gov_con, fp, "notified", row[0], "notified", at, note=f"通道 {channel}")
    return True


# --------------------------------------------------------------------------- reading


def _issue(row: Mapping[str, Any]) -> Issue:
    d = dict(row)
    d["sample_rows"] = json.loads(d["sample_rows"] or "[]")
    d["trace"] = json.loads(d["trace"] or "{}")
    return Issue(**d)


def get_issue(gov_con: duckdb.DuckDBPyConnection, issue_id: str) -> Issue:
    fp, _ = _resolve_id(gov_con, issue_id)
    rows = lineage.fetch_dicts(gov_con, "select * from governance.quality_issues where fingerprint = ?", [fp])
    return _issue(rows[0])


def list_issues(
    gov_con: duckdb.DuckDBPyConnection,
    *,
    status: Sequence[str] | None = None,
    agency: str | None = None,
    partition_date: str | dt.date | None = None,
    dataset: str | None = None,
) -> list[Issue]:
    """Issues filtered by status, agency, partition and dataset; newest partition first."""
    ensure_tables(gov_con)
    where, params = [], []
    if status:
        bad = [s for s in status if s not in STATUSES]
        if bad:
            raise IssueError(f"未知状态 {bad}; statuses: {', '.join(STATUSES)}")
        where.append("status in (select unnest(?::varchar[]))")
        params.append(list(status))
    for col, v in (("agency", agency), ("dataset", dataset)):
        if v:
            where.append(f"{col} = ?")
            params.append(v)
    if partition_date:
        where.append("partition_date = ?::date")
        params.append(str(partition_date))
    sql = "select * from governance.quality_issues" + (" where " + " and ".join(where) if where else "")
    sql += " order by partition_date desc, agency, dataset, rule"
    return [_issue(r) for r in lineage.fetch_dicts(gov_con, sql, params)]


def issue_events(gov_con: duckdb.DuckDBPyConnection, issue_id: str) -> list[dict[str, Any]]:
    fp, _ = _resolve_id(gov_con, issue_id)
    return lineage.fetch_dicts(gov_con, "select * from governance.issue_events where fingerprint = ? order by event_id", [fp])
