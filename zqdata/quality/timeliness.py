"""Delivery-level completeness and timeliness (Art. 20 完整性/时效性) from ``meta.deliveries`` and the registry SLAs.

A late delivery (delivered after the end of the partition day + ``sla_hours``, Asia/Shanghai) is a timeliness
finding; an expected delivery that is missing is a completeness finding and, once its deadline has passed, a
timeliness finding too. Nothing is skipped silently: every registered dataset gets a status in the report.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from zqdata.landing import delivery_prefix
from zqdata.registry import Registry
from zqdata.settings import TZ

TOOL = "delivery"
RULE_LATE = "delivery.late"
RULE_MISSING = "delivery.missing"
RULE_MISSING_PAST_SLA = "delivery.missing_past_sla"
RULE_NO_DELIVERED_AT = "delivery.delivered_at_unknown"
# (rule, dimension, severity) of every rule this module evaluates, for the rule catalog behind quality.scores.
RULES: tuple[tuple[str, str, str], ...] = (
    (RULE_LATE, "timeliness", "warn"),  # late data is still usable: reported, never blocking
    (RULE_MISSING, "completeness", "error"),
    (RULE_MISSING_PAST_SLA, "timeliness", "error"),
    (RULE_NO_DELIVERED_AT, "timeliness", "warn"),
)

FINDING_COLUMNS = [
    "partition_date", "agency", "dataset", "tool", "rule", "dimension", "severity",
    "delivery_file", "row_number", "lineage_id", "field", "detail",
]


@dataclass
class DeliveryStatus:
    dataset: str
    agency: str
    deadline: dt.datetime
    status: str  # on_time | late | missing | pending (missing, not yet due) | unknown_time
    delivered_at: dt.datetime | None = None
    files: int = 0


@dataclass
class TimelinessReport:
    partition_date: dt.date
    statuses: list[DeliveryStatus] = field(default_factory=list)
    findings: int = 0

    def as_markdown(self) -> str:
        """The per-dataset delivery status as a Markdown table (Chinese headers)."""
        lines = ["| 数据集 dataset | 机构 agency | 截止时间 deadline | 交付时间 delivered_at | 状态 status |", "|---|---|---|---|---|"]
        for s in self.statuses:
            at = s.delivered_at.astimezone(TZ).isoformat(timespec="minutes") if s.delivered_at else "—"
            lines.append(f"| {s.dataset} | {s.agency} | {s.deadline.isoformat(timespec='minutes')} | {at} | {s.status} |")
        return "\n".join(lines)


def delivery_deadline(partition_date: dt.date, sla_hours: int) -> dt.datetime:
    """End of the partition day in Asia/Shanghai plus the dataset's SLA hours."""
    day_end = dt.datetime.combine(partition_date + dt.timedelta(days=1), dt.time(0), tzinfo=TZ)
    return day_end + dt.timedelta(hours=sla_hours)


def _finding(day: dt.date, agency: str, dataset: str, rule: str, dimension: str, severity: str,
             delivery_file: str, detail: str) -> dict:
    return {"partition_date": day, "agency": agency, "dataset": dataset, "tool": TOOL, "rule": rule,
            "dimension": dimension, "severity": severity, "delivery_file": delivery_file, "row_number": None,
            "lineage_id": None, "field": None, "detail": detail}


def _deliveries(con: duckdb.DuckDBPyConnection, day: dt.date) -> dict[str, list[tuple[str | None, dt.datetime | None, str | None]]]:
    """(delivery_file, delivered_at, status) per dataset for the partition; empty when ingestion never ran."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = 'meta' and table_name = 'deliveries'"
    ).fetchone()[0]
    if not exists:
        return {}
    rows = con.execute(
        "select dataset, delivery_file, delivered_at, status from meta.deliveries where partition_date = ?", [day]
    ).fetchall()
    out: dict[str, list] = {}
    for dataset, file, at, status in rows:
        if isinstance(at, dt.datetime) and at.tzinfo is None:
            at = at.replace(tzinfo=dt.timezone.utc)  # DuckDB returns naive UTC for TIMESTAMP columns
        out.setdefault(dataset, []).append((file, at, status))
    return out


def evaluate_deliveries(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                        now: dt.datetime | None = None) -> tuple[TimelinessReport, list[dict]]:
    """Status of every registered dataset's delivery for the day and the findings it implies (not written)."""
    now = now or dt.datetime.now(TZ)
    by_dataset = _deliveries(con, partition_date)
    report = TimelinessReport(partition_date)
    findings: list[dict] = []
    for ds in registry.datasets.values():
        deadline = delivery_deadline(partition_date, ds.delivery.sla_hours)
        prefix = delivery_prefix(ds.agency, ds.code, partition_date)
        delivered = [r for r in by_dataset.get(ds.code, []) if (r[2] or "") != "missing"]
        if not delivered:
            status = DeliveryStatus(ds.code, ds.agency, deadline, "missing" if now > deadline else "pending")
            findings.append(_finding(
                partition_date, ds.agency, ds.code, RULE_MISSING, "completeness", "error", prefix,
                f"应交付的数据未交付：{ds.name}（{ds.code}）{partition_date} 分区没有交付文件 "
                f"(expected delivery missing at landing/{prefix})"))
            if now > deadline:
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_MISSING_PAST_SLA, "timeliness", "error", prefix,
                    f"已超过交付时限 {deadline.isoformat(timespec='minutes')}（分区日结束后 {ds.delivery.sla_hours} 小时）仍未交付 "
                    f"(missing past its SLA)"))
            report.statuses.append(status)
            continue
        times = [r[1] for r in delivered if r[1] is not None]
        status = DeliveryStatus(ds.code, ds.agency, deadline, "on_time", max(times) if times else None, len(delivered))
        for file, at, _ in delivered:
            if at is None:
                status.status = "unknown_time"
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_NO_DELIVERED_AT, "timeliness", "warn", file or prefix,
                    "交付时间未知：清单与对象存储均未提供交付时间，无法判断是否按时 (delivered_at unknown)"))
            elif at > deadline:
                status.status = "late"
                late_h = (at - deadline).total_seconds() / 3600
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_LATE, "timeliness", "warn", file or prefix,
                    f"逾期交付：交付时间 {at.astimezone(TZ).isoformat(timespec='minutes')}，晚于时限 "
                    f"{deadline.isoformat(timespec='minutes')}（分区日结束后 {ds.delivery.sla_hours} 小时）{late_h:.1f} 小时 "
                    f"(late delivery)"))
        report.statuses.append(status)
    report.findings = len(findings)
    return report, findings


def write_findings(con: duckdb.DuckDBPyConnection, findings: list[dict]) -> None:
    """Append finding dicts (ARCHITECTURE.md layout) to quality.findings in bulk via Arrow."""
    if not findings:
        return
    tbl = pa.Table.from_pylist(findings, schema=pa.schema([
        ("partition_date", pa.date32()), ("agency", pa.string()), ("dataset", pa.string()), ("tool", pa.string()),
        ("rule", pa.string()), ("dimension", pa.string()), ("severity", pa.string()),
        ("delivery_file", pa.string()), ("row_number", pa.int32()), ("lineage_id", pa.string()),
        ("field", pa.string()), ("detail", pa.string()),
    ]))
    con.register("_zq_new_findings", tbl)
    try:
        con.execute(f"insert into quality.findings ({', '.join(FINDING_COLUMNS)}) "
                    f"select {', '.join(FINDING_COLUMNS)} from _zq_new_findings")
    finally:
        con.unregister("_zq_new_findings")


def collect_delivery_findings(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                              now: dt.datetime | None = None) -> TimelinessReport:
    """Replace this module's delivery findings of the partition in quality.findings; return the status report."""
    from zqdata.quality.scores import ensure_quality_tables

    ensure_quality_tables(con)
    report, findings = evaluate_deliveries(con, registry, partition_date, now)
    rules = [r[0] for r in RULES]
    con.execute("begin")
    try:
        # Only this module's rules: ingestion writes other tool='delivery' rules (manifest, checksum) itself.
        con.execute(
            f"delete from quality.findings where partition_date = ? and tool = ? and rule in ({', '.join('?' * len(rules))})",
            [partition_date, TOOL, *rules],
        )
        write_findings(con, findings)
        _register_rules(con, registry, partition_date)
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return report


def _register_rules(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date) -> None:
    """Catalog this module's rules for every dataset, leaving ingestion's tool='delivery' rules in place."""
    rules = [r[0] for r in RULES]
    con.execute(
        f"delete from quality.rule_catalog where partition_date = ? and tool = ? and rule in ({', '.join('?' * len(rules))})",
        [partition_date, TOOL, *rules],
    )
    con.executemany(
        "insert into quality.rule_catalog (partition_date, dataset, tool, rule, dimension, severity) values (?, ?, ?, ?, ?, ?)",
        [[partition_date, code, TOOL, rule, dim, sev] for code in registry.datasets for rule, dim, sev in RULES],
    )
