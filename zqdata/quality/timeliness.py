"""Delivery-level completeness and timeliness (Art. 20 完整性/时效性) from ``meta.deliveries`` and the registry SLAs.

A late delivery (arrived after the end of the partition day + ``sla_hours``, Asia/Shanghai) is a timeliness
finding; an expected delivery that is missing is a completeness finding and, once its deadline has passed, a
timeliness finding too. Nothing is skipped silently: every registered dataset gets a status in the report.

When a delivery arrived is a fact the agency cannot forge: the object store's time (file mtime / S3 LastModified,
the latest of the delivery's data files and manifest; ``meta.deliveries.arrived_at`` when ingestion records it).
The manifest's own ``delivered_at`` is kept beside it, and a claim earlier than the arrival beyond
``CLAIM_TOLERANCE`` is itself a finding. Only when the store has no time for the delivery (folder gone, store
unreachable, or a store time after the evaluation instant of a replay) is the recorded ``delivered_at`` used, and
the report says so. Delivery folders dated after today are reported to their agency (``delivery.future_folder``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from zqdata.landing import (
    MANIFEST_NAME,
    arrival_time,
    delivery_prefix,
    future_delivery_days,
    try_read_manifest,
)
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ
from zqdata.storage import ObjectStore

TOOL = "delivery"
RULE_LATE = "delivery.late"
RULE_MISSING = "delivery.missing"
RULE_MISSING_PAST_SLA = "delivery.missing_past_sla"
RULE_NO_DELIVERED_AT = "delivery.delivered_at_unknown"
RULE_CLAIM_BEFORE_ARRIVAL = "delivery.delivered_at_before_arrival"
RULE_FUTURE_FOLDER = "delivery.future_folder"
# A manifest's delivered_at may precede the store's arrival by this much (clock skew, upload of large files).
CLAIM_TOLERANCE = dt.timedelta(minutes=30)
# (rule, dimension, severity) of every rule this module evaluates, for the rule catalog behind quality.scores.
RULES: tuple[tuple[str, str, str], ...] = (
    (RULE_LATE, "timeliness", "warn"),  # late data is still usable: reported, never blocking
    (RULE_MISSING, "completeness", "error"),
    (RULE_MISSING_PAST_SLA, "timeliness", "error"),
    (RULE_NO_DELIVERED_AT, "timeliness", "warn"),
    # The agency's claimed delivery time is not what the store saw: reported, the store's time is used.
    (RULE_CLAIM_BEFORE_ARRIVAL, "timeliness", "warn"),
    # A folder dated after today: a wrong data date at the agency. Timeliness, like ingestion's future_partition;
    # a warning because it is not this partition's data (it must not block the partition's quality gate).
    (RULE_FUTURE_FOLDER, "timeliness", "warn"),
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
    delivered_at: dt.datetime | None = None  # the time judged: the store's arrival, else the recorded delivered_at
    files: int = 0
    claimed_at: dt.datetime | None = None  # the manifest's own delivered_at, kept beside the arrival
    time_source: str = ""  # store | manifest ('' when nothing arrived)


@dataclass
class TimelinessReport:
    partition_date: dt.date
    statuses: list[DeliveryStatus] = field(default_factory=list)
    findings: int = 0
    notes: list[str] = field(default_factory=list)

    def as_markdown(self) -> str:
        """The per-dataset delivery status as a Markdown table (Chinese headers)."""
        def fmt(t: dt.datetime | None) -> str:
            return t.astimezone(TZ).isoformat(timespec="minutes") if t else "—"

        source = {"store": "对象存储 store", "manifest": "清单/入库记录 manifest (未核实 unverified)"}
        lines = ["| 数据集 dataset | 机构 agency | 截止时间 deadline | 交付时间 delivered (依据 source) | "
                 "清单声明 manifest delivered_at | 状态 status |", "|---|---|---|---|---|---|"]
        for s in self.statuses:
            at = f"{fmt(s.delivered_at)} ({source.get(s.time_source, '—')})" if s.delivered_at else "—"
            lines.append(f"| {s.dataset} | {s.agency} | {s.deadline.isoformat(timespec='minutes')} | {at} | "
                         f"{fmt(s.claimed_at)} | {s.status} |")
        lines += [f"\n> {n}" for n in self.notes]
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


def _aware(at: object) -> dt.datetime | None:
    if isinstance(at, dt.datetime) and at.tzinfo is None:
        return at.replace(tzinfo=dt.timezone.utc)  # DuckDB returns naive UTC for TIMESTAMP columns
    return at if isinstance(at, dt.datetime) else None


def _deliveries(con: duckdb.DuckDBPyConnection, day: dt.date
                ) -> dict[str, list[tuple[str | None, dt.datetime | None, str | None, dt.datetime | None]]]:
    """(delivery_file, delivered_at, status, arrived_at) per dataset for the partition; empty when ingestion never ran.

    ``arrived_at`` is the store's arrival time when ingestion records it in meta.deliveries (else None)."""
    from zqdata.warehouse import relation_columns

    columns = set(relation_columns(con, "meta", "deliveries"))
    if not columns:
        return {}
    arrived = "arrived_at" if "arrived_at" in columns else "null"
    rows = con.execute(
        f"select dataset, delivery_file, delivered_at, status, {arrived} from meta.deliveries where partition_date = ?",
        [day],
    ).fetchall()
    out: dict[str, list] = {}
    for dataset, file, at, status, arrived_at in rows:
        out.setdefault(dataset, []).append((file, _aware(at), status, _aware(arrived_at)))
    return out


@dataclass
class _StoreFacts:
    arrived_at: dt.datetime | None = None  # latest LastModified of the day's folder (data files + manifest)
    claimed_at: dt.datetime | None = None  # the manifest's delivered_at
    future_days: list[dt.date] = field(default_factory=list)


def _store_facts(store: ObjectStore, ds: Dataset, day: dt.date, today: dt.date, future: bool = True) -> _StoreFacts:
    """The day's folder facts; the dataset's future-dated folders only with ``future`` (listing them reads every
    delivery folder of the dataset: each day of a year's backfill did, though only the latest day reports them)."""
    objects = store.list(delivery_prefix(ds.agency, ds.code, day))
    facts = _StoreFacts(arrival_time(objects),
                        future_days=future_delivery_days(store, ds.agency, ds.code, today) if future else [])
    if any(o.key.endswith("/" + MANIFEST_NAME) for o in objects):
        manifest, _ = try_read_manifest(store, ds.agency, ds.code, day)  # an invalid one is ingestion's finding
        facts.claimed_at = manifest.delivered_at if manifest else None
    return facts


def _resolve_store(store: ObjectStore | None, report: TimelinessReport) -> ObjectStore | None:
    if store is not None:
        return store
    try:
        from zqdata.storage import store_from_env

        return store_from_env()
    except Exception as exc:  # noqa: BLE001 - reported; timeliness falls back to the recorded times
        report.notes.append(f"对象存储不可用，交付时间按入库记录判断 (landing store unavailable, recorded times used): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def evaluate_deliveries(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                        now: dt.datetime | None = None, store: ObjectStore | None = None
                        ) -> tuple[TimelinessReport, list[dict]]:
    """Status of every registered dataset's delivery for the day and the findings it implies (not written).

    ``store``: the landing store whose times are the arrival times (default: the store configured by the environment).
    Future-dated folders are reported when the evaluated partition is the latest one (the night's run), so a backfill
    or a recomputation of older days does not file the same folder again for every day."""
    now = (now or dt.datetime.now(TZ)).astimezone(TZ)
    by_dataset = _deliveries(con, partition_date)
    report = TimelinessReport(partition_date)
    findings: list[dict] = []
    landing_store = _resolve_store(store, report)
    report_future = partition_date >= now.date() - dt.timedelta(days=1)
    for ds in registry.datasets.values():
        deadline = delivery_deadline(partition_date, ds.delivery.sla_hours)
        prefix = delivery_prefix(ds.agency, ds.code, partition_date)
        facts = _StoreFacts()
        if landing_store is not None:
            try:
                facts = _store_facts(landing_store, ds, partition_date, now.date(), future=report_future)
            except Exception as exc:  # noqa: BLE001 - the store failed (after its retries): stop asking it
                report.notes.append(f"对象存储读取失败，交付时间按入库记录判断 (landing store failed, recorded times "
                                    f"used): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                landing_store = None
        if report_future:
            for day in facts.future_days:
                folder = delivery_prefix(ds.agency, ds.code, day)
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_FUTURE_FOLDER, "timeliness", "warn", folder,
                    f"交付目录日期在未来：{folder} 的数据日期 {day.isoformat()} 晚于今天 {now.date().isoformat()}（北京时间），"
                    f"该目录不会入库，请核对数据日期后按正确日期重新交付 (future-dated delivery folder {day.isoformat()}, "
                    f"not ingested)"))
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
        recorded = [r[1] for r in delivered if r[1] is not None]
        claimed = facts.claimed_at or (max(recorded) if recorded else None)
        arrivals = [r[3] for r in delivered if r[3] is not None]
        arrived = max(arrivals) if arrivals else facts.arrived_at
        if arrived is not None and arrived > now + CLAIM_TOLERANCE:
            # The store's clock is after the evaluation instant (a replay with an earlier `now`): not comparable.
            report.notes.append(f"{ds.code}: 对象存储时间 {arrived.astimezone(TZ).isoformat(timespec='minutes')} 晚于评估时间，"
                                f"按入库记录判断 (store time after the evaluation time; recorded time used)")
            arrived = None
        if arrived is not None:
            status = DeliveryStatus(ds.code, ds.agency, deadline, "on_time", arrived, len(delivered), claimed, "store")
            if arrived > deadline:
                status.status = "late"
                late_h = (arrived - deadline).total_seconds() / 3600
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_LATE, "timeliness", "warn", prefix,
                    f"逾期交付：对象存储到达时间 {arrived.astimezone(TZ).isoformat(timespec='minutes')}，晚于时限 "
                    f"{deadline.isoformat(timespec='minutes')}（分区日结束后 {ds.delivery.sla_hours} 小时）{late_h:.1f} 小时"
                    + (f"；清单声明交付时间 {claimed.astimezone(TZ).isoformat(timespec='minutes')}" if claimed else "")
                    + " (late delivery, by the store's arrival time)"))
            if facts.claimed_at is not None and facts.claimed_at < arrived - CLAIM_TOLERANCE:
                gap_h = (arrived - facts.claimed_at).total_seconds() / 3600
                findings.append(_finding(
                    partition_date, ds.agency, ds.code, RULE_CLAIM_BEFORE_ARRIVAL, "timeliness", "warn",
                    prefix + MANIFEST_NAME,
                    f"清单声明的交付时间 {facts.claimed_at.astimezone(TZ).isoformat(timespec='minutes')} 早于对象存储记录的"
                    f"到达时间 {arrived.astimezone(TZ).isoformat(timespec='minutes')} {gap_h:.1f} 小时（容差 "
                    f"{int(CLAIM_TOLERANCE.total_seconds() // 60)} 分钟），时效按到达时间判断，请核对清单 delivered_at "
                    f"(manifest delivered_at earlier than the actual arrival; arrival used)"))
            report.statuses.append(status)
            continue
        # No store time for this delivery: the recorded delivered_at (manifest, else the file time at ingestion).
        status = DeliveryStatus(ds.code, ds.agency, deadline, "on_time", max(recorded) if recorded else None,
                                len(delivered), claimed, "manifest" if recorded else "")
        for file, at, _, _ in delivered:
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
                              now: dt.datetime | None = None, store: ObjectStore | None = None) -> TimelinessReport:
    """Replace this module's delivery findings of the partition in quality.findings; return the status report."""
    from zqdata.quality.scores import ensure_quality_tables

    ensure_quality_tables(con)
    report, findings = evaluate_deliveries(con, registry, partition_date, now, store)
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
