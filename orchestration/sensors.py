"""Alerting on failed asset checks (open-source Dagster has no check alerts; a failed check doesn't fail the run).

`quality_issue_alert_sensor` reads asset check evaluations (execution records) from the event log after its cursor, syncs the quality-issue
register for each partition with a failed check, and sends the agency notifications (also retrying failed ones and
escalating overdue issues on every tick). `trace_metadata` puts the 逐级溯源 trace into a check's result metadata.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from orchestration.resources import WarehouseResource
from zqdata.registry import Registry

log = logging.getLogger(__name__)

SENSOR_NAME = "quality_issue_alert_sensor"
EVENTS_PER_TICK = 1000
UNVERIFIED = ("open", "notified", "acknowledged", "resolved", "reopened")  # bounded work per tick; the cursor carries the rest to the next tick


@dataclass
class FailedChecks:
    partitions: list[str]
    checks: list[str]  # "<asset key>:<check name>[<partition>]"
    cursor: int | None  # id of the last check execution read
    unpartitioned: list[str] = field(default_factory=list)
    rechecked: list[str] = field(default_factory=list)  # partitions with passing checks (fixes to verify)


def _run_partitions(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The daily partitions a run covered: its partition tag, or the days of a backfill range."""
    run = instance.get_run_by_id(run_id)
    tags = run.tags if run else {}
    if tags.get("dagster/partition"):
        return [tags["dagster/partition"]]
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    if start and end:
        d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
        return [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]
    return []


def failed_check_partitions(
    instance: dg.DagsterInstance, check_keys: Sequence[dg.AssetCheckKey], cursor: int | None, limit: int = EVENTS_PER_TICK
) -> FailedChecks:
    """Failed asset check executions with an execution id above `cursor`, by partition, and the next cursor.

    Reads the event log's asset-check execution records (ids are global even on the run-sharded SQLite storage of
    `dagster dev`, where cross-run event queries need run-aware cursors). An execution still in progress holds the cursor
    back so its evaluation is not skipped; re-reading a failure is harmless (issues and messages are deduplicated).
    """
    storage = instance.event_log_storage
    after = cursor or 0
    out = FailedChecks(partitions=[], checks=[], cursor=cursor)
    newest, hold_back = after, None
    runs: dict[str, list[str]] = {}
    finished: dict[str, bool] = {}
    for key in check_keys:
        page: int | None = None
        while True:
            records = storage.get_asset_check_execution_history(key, limit=limit, cursor=page)
            fresh = [r for r in records if r.id > after]
            for r in fresh:
                newest = max(newest, r.id)
                if r.status == AssetCheckExecutionRecordStatus.PLANNED:
                    if r.run_id not in finished:
                        run = instance.get_run_by_id(r.run_id)
                        finished[r.run_id] = run is None or run.is_finished
                    if not finished[r.run_id]:
                        hold_back = r.id if hold_back is None else min(hold_back, r.id)
                    continue
                # The execution's own partition is often unset for partitioned runs: use the run's partition tags.
                parts = [r.partition] if r.partition else runs.setdefault(r.run_id, _run_partitions(instance, r.run_id))
                if r.status != AssetCheckExecutionRecordStatus.FAILED:
                    out.rechecked += [p for p in parts if p not in out.rechecked]
                    continue
                name = f"{key.asset_key.to_user_string()}:{key.name}"
                if not parts:
                    out.unpartitioned.append(name)
                for p in parts:
                    out.checks.append(f"{name}[{p}]")
                    if p not in out.partitions:
                        out.partitions.append(p)
            if len(records) < limit or len(fresh) < len(records):
                break
            page = records[-1].id  # older page (ids descending)
    next_cursor = newest if hold_back is None else hold_back - 1
    out.cursor = next_cursor if next_cursor > 0 else cursor
    return out


@dataclass
class AlertTick:
    cursor: int | None
    failed: FailedChecks
    sync_summaries: list[str]
    notify_summary: str

    def message(self) -> str:
        checks = "；".join(self.failed.checks[:10]) or "无新的未通过检查"
        return f"{checks} | {' | '.join(self.sync_summaries)} | 通知 {self.notify_summary}".strip(" |")


def run_alert_tick(
    instance: dg.DagsterInstance,
    check_keys: Sequence[dg.AssetCheckKey],
    cursor: int | None,
    gov: Callable[[], contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]],
    registry: Registry,
    settings: Any = None,
    *,
    now: dt.datetime | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> AlertTick:
    """One sensor tick: read new check executions, sync their partitions' issues, escalate overdue ones, send notifications.

    `gov()` opens the gov DB; it is held only for the DB work, never while sending (DuckDB allows one writer and the
    nightly job must not find it locked by a slow SMTP server).
    """
    from zqdata import alerting, issues

    s = settings or alerting.AlertSettings.from_env()
    failed = failed_check_partitions(instance, check_keys, cursor)
    with gov() as gov_con:
        # Passing re-checks matter too: they verify the fixes of that partition's open issues.
        to_sync = failed.partitions + [
            p for p in failed.rechecked if p not in failed.partitions and issues.list_issues(gov_con, partition_date=p, status=UNVERIFIED)
        ]
        summaries = [issues.sync_issues(gov_con, registry, p, now=now).summary() for p in to_sync]
        if not to_sync:
            escalated = issues.escalate_overdue(gov_con, registry, now)
            if escalated:
                summaries.append(f"升级 {len(escalated)} 个问题")
        enqueued = alerting.enqueue(gov_con, registry, s, now)
        messages = alerting.pending_messages(gov_con)
    attempts = alerting.send_messages(registry, s, messages, sleep=sleep) if messages else []
    report = alerting.NotifyReport(enqueued=enqueued, email_disabled=not s.email_enabled)
    if attempts:
        with gov() as gov_con:
            report.sent, report.failed = alerting.record_attempts(gov_con, messages, attempts)
    return AlertTick(cursor=failed.cursor, failed=failed, sync_summaries=summaries, notify_summary=report.summary())


@dg.sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "数据质量问题告警：读取事件日志中未通过的资产检查，登记质量问题并通知数源机构（邮件/Webhook，第二十条逐级溯源）。"
        " Reads failed asset check evaluations from the event log, syncs the quality-issue register, alerts the source agency."
    ),
)
def quality_issue_alert_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SkipReason:
    """Thin wrapper around `run_alert_tick`; never launches runs."""
    from zqdata.registry import registry

    cursor = int(context.cursor) if context.cursor else None
    # Every check of the code location (dbt tests, GX, gates, row accounting, boundary checks).
    check_keys = list(context.repository_def.asset_graph.asset_check_keys) if context.repository_def else []
    if not warehouse.gov_path().exists():
        return dg.SkipReason("市政务大数据平台数据库尚未创建 gov DB not created yet")
    try:
        tick = run_alert_tick(context.instance, check_keys, cursor, warehouse.gov, registry())
    except duckdb.IOException as exc:  # the nightly job holds the single DuckDB writer lock: try again next tick
        return dg.SkipReason(f"市政务大数据平台数据库正被占用，下次重试 gov DB busy: {exc}")
    if tick.cursor is not None:
        context.update_cursor(str(tick.cursor))
    if tick.failed.unpartitioned:
        context.log.warning(f"未分区的检查未通过，无法确定分区 unpartitioned failed checks: {tick.failed.unpartitioned}")
    return dg.SkipReason(tick.message())


def trace_metadata(
    gov_con: duckdb.DuckDBPyConnection,
    ops_con: duckdb.DuckDBPyConnection | None,
    registry: Registry,
    *,
    partition_date: str | dt.date,
    dataset: str | None = None,
    rules: Sequence[str] | None = None,
    severity: str | None = None,
    lineage_ids: Sequence[str] | None = None,
    asset_key: str = "gov/quality/findings",
    limit: int = 20,
) -> dict[str, dg.MetadataValue]:
    """逐级溯源 metadata for an `AssetCheckResult`: the trace of the partition's findings (optionally one dataset / rules /
    severity) or of given lineage ids, as Markdown and JSON. Empty when there is nothing to trace."""
    from zqdata import lineage

    findings: list[dict[str, Any]] = []
    if not lineage_ids:
        if not lineage.table_exists(gov_con, "quality", "findings"):
            return {}
        where, params = ["partition_date = ?::date"], [str(partition_date)]
        if dataset:
            where.append("dataset = ?")
            params.append(dataset)
        if rules:
            where.append("rule in (select unnest(?::varchar[]))")
            params.append(list(rules))
        if severity:
            where.append("severity = ?")
            params.append(severity)
        findings = lineage.fetch_dicts(
            gov_con,
            f"select * from quality.findings where {' and '.join(where)} order by severity, dataset, rule, delivery_file, row_number limit {int(limit)}",
            params,
        )
        if not findings:
            return {}
    try:
        t = lineage.trace(gov_con, ops_con, registry, asset_key, lineage_ids=lineage_ids, finding=findings or None, max_rows=limit)
    except lineage.TraceError as exc:
        return {"trace_error": dg.MetadataValue.text(f"溯源失败: {exc}")}
    return {
        "逐级溯源 trace": dg.MetadataValue.md(t.to_markdown()),
        "trace_json": dg.MetadataValue.json(t.to_dict()),
        "source_agencies": dg.MetadataValue.text("、".join(s.agency_name for s in t.sources) or "-"),
    }


def sensor_defs() -> dg.Definitions:
    """The alert sensor (needs the `warehouse` resource from orchestration.resources)."""
    return dg.Definitions(sensors=[quality_issue_alert_sensor])
