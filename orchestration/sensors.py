"""The alert sensor: reads the event log, requests small runs; never opens a database file itself.

- After `gov/quality/findings` was recomputed by a run that did not also file the partition's issues (a partial
  materialization from the UI, say), it requests `quality_issue_sync` for that partition.
- After new `gov/quality/issues` materializations (the nightly job files issues itself), it requests
  `quality_issue_notifications` to deliver the agencies' messages.
- While messages wait for a retry, or when the next SLA escalation falls due (both read from the metadata of the latest
  `gov/quality/notifications` materialization), it requests that run again.

Every request has a run key derived from event-log storage ids, so a tick never requests the same work twice, and a
restarted daemon resumes from the cursor. `trace_metadata` puts the 逐级溯源 trace into a check's result metadata.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb

from zqdata.registry import Registry

log = logging.getLogger(__name__)

SENSOR_NAME = "quality_issue_alert_sensor"
INTERVAL_ENV = "ZQ_ALERT_SENSOR_INTERVAL_SECONDS"
RETRY_ENV = "ZQ_ALERT_RETRY_MINUTES"
EVENTS_PER_TICK = 500


@dataclass
class AlertPlan:
    """What one tick asks for: runs to request and the next cursor."""

    cursor: dict[str, int]
    sync_partitions: list[tuple[str, int]] = field(default_factory=list)  # (partition, findings storage id)
    notify_key: str | None = None
    notify_reason: str = ""

    def run_requests(self, sync_job: str, notify_job: str) -> list[dg.RunRequest]:
        out = [dg.RunRequest(run_key=f"sync:{p}:{sid}", job_name=sync_job, partition_key=p,
                             tags={"zq/requested_by": SENSOR_NAME}) for p, sid in self.sync_partitions]
        if self.notify_key:
            out.append(dg.RunRequest(run_key=self.notify_key, job_name=notify_job,
                                     tags={"zq/requested_by": SENSOR_NAME, "zq/reason": self.notify_reason}))
        return out


def _files_issues_itself(run: dg.DagsterRun | None, issues_key: dg.AssetKey, nightly_job: str) -> bool:
    if run is None:
        return False
    if run.asset_selection:  # a subset of assets (an in-process run of the whole job records an empty selection)
        return issues_key in run.asset_selection
    return run.job_name == nightly_job


def plan_alert_tick(instance: dg.DagsterInstance, cursor: dict[str, int], *, now: dt.datetime | None = None,
                    limit: int = EVENTS_PER_TICK) -> AlertPlan:
    """Read the event log after `cursor` and decide which runs to request (pure event-log reads)."""
    from assets.governance.issues import FINDINGS_KEY, ISSUES_KEY, NOTIFICATIONS_KEY
    from orchestration.jobs import NIGHTLY_JOB

    now = now or dt.datetime.now(dt.timezone.utc)
    plan = AlertPlan(cursor=dict(cursor))
    findings = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=FINDINGS_KEY, after_storage_id=cursor.get("findings")), limit=limit,
        ascending=True).records
    runs: dict[str, dg.DagsterRun | None] = {}
    for rec in findings:
        plan.cursor["findings"] = rec.storage_id
        run = runs.setdefault(rec.run_id, instance.get_run_by_id(rec.run_id))
        if rec.partition_key and not _files_issues_itself(run, ISSUES_KEY, NIGHTLY_JOB):
            plan.sync_partitions.append((rec.partition_key, rec.storage_id))
    filed = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ISSUES_KEY, after_storage_id=cursor.get("issues")), limit=limit,
        ascending=True).records
    if filed:
        plan.cursor["issues"] = filed[-1].storage_id
        plan.notify_key, plan.notify_reason = f"notify:issues:{filed[-1].storage_id}", "new issues filed"
        return plan
    latest = instance.fetch_materializations(NOTIFICATIONS_KEY, limit=1).records
    if not latest:
        return plan
    rec = latest[0]
    meta = rec.asset_materialization.metadata if rec.asset_materialization else {}
    pending = _meta(meta, "retry_pending", 0)
    retry_after = dt.timedelta(minutes=float(os.environ.get(RETRY_ENV) or 10))
    if pending and now.timestamp() - rec.timestamp >= retry_after.total_seconds():
        plan.notify_key, plan.notify_reason = f"notify:retry:{rec.storage_id}", f"{pending} messages to retry"
        return plan
    due = _meta(meta, "next_escalation_due", "")
    if due and dt.datetime.fromisoformat(due) <= now:
        plan.notify_key, plan.notify_reason = f"notify:escalate:{due}", "escalation due"
    return plan


def _meta(meta: dict[str, Any], key: str, default: Any) -> Any:
    value = meta.get(key)
    return default if value is None else getattr(value, "value", value)


def sensor_interval_seconds() -> int:
    """``ZQ_ALERT_SENSOR_INTERVAL_SECONDS`` (default 60)."""
    return max(1, int(os.environ.get(INTERVAL_ENV) or 60))


def build_alert_sensor() -> dg.SensorDefinition:
    from assets.governance.issues import NOTIFY_JOB, SYNC_JOB, issue_jobs

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=sensor_interval_seconds(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=issue_jobs(),
        description=(
            "数据质量问题告警：读取事件日志，为重算过质量明细的分区请求问题登记运行，为新登记的问题请求通知投递运行，"
            "并按需请求重试与升级。只读事件日志、只请求运行，不打开任何数据库文件。"
            " Reads the event log and requests issue-sync and notification runs (with run keys); opens no database."
        ),
    )
    def quality_issue_alert_sensor(context: dg.SensorEvaluationContext):
        cursor = json.loads(context.cursor) if context.cursor and context.cursor.startswith("{") else {}
        plan = plan_alert_tick(context.instance, cursor)
        requests = plan.run_requests(SYNC_JOB, NOTIFY_JOB)
        if plan.cursor != cursor:
            context.update_cursor(json.dumps(plan.cursor, sort_keys=True))
        if not requests:
            return dg.SkipReason("无新的质量明细或待投递通知 nothing new")
        return requests

    return quality_issue_alert_sensor


FINDINGS_ORDER = "severity, dataset, rule, delivery_file, row_number"  # the findings a check's trace shows first


def prefetch_finding_rows(gov_con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: str | dt.date,
                          limit: int = 20) -> None:
    """Inside `zqdata.warehouse.frozen_catalog`: read at once the source rows of the findings that `trace_metadata`
    shows for each (dataset, rule) of the partition (its first ``limit``), so that a day's traces of failed checks do
    not each read their own (issue 15). Only a shortcut: a trace reads what is not here itself."""
    from zqdata import lineage

    if not lineage.table_exists(gov_con, "quality", "findings"):
        return
    ids = [r[0] for r in gov_con.execute(
        f"select lineage_id from (select lineage_id, row_number() over (partition by dataset, rule order by "
        f"{FINDINGS_ORDER}) as n from quality.findings where partition_date = ?::date) "
        f"where n <= {int(limit)} and lineage_id is not null", [str(partition_date)]).fetchall()]
    lineage.prefetch_source_rows(gov_con, registry, ids)


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
    severity) or of given lineage ids, as Markdown and JSON. Empty when there is nothing to trace.

    Record values and finding details in it are masked by field classification (`zqdata.display`, via the trace).
    """
    from zqdata import lineage
    from zqdata.display import scrub_text

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
            f"select * from quality.findings where {' and '.join(where)} order by {FINDINGS_ORDER} limit {int(limit)}",
            params,
        )
        if not findings:
            return {}
    try:
        t = lineage.trace(gov_con, ops_con, registry, asset_key, lineage_ids=lineage_ids, finding=findings or None, max_rows=limit)
    except lineage.TraceError as exc:
        return {"trace_error": dg.MetadataValue.text(f"溯源失败: {scrub_text(str(exc))}")}
    return {
        "逐级溯源 trace": dg.MetadataValue.md(t.to_markdown()),
        "trace_json": dg.MetadataValue.json(t.to_dict()),
        "source_agencies": dg.MetadataValue.text("、".join(s.agency_name for s in t.sources) or "-"),
    }


def sensor_defs() -> dg.Definitions:
    """The alert sensor (it requests the jobs of assets.governance.issues)."""
    return dg.Definitions(sensors=[build_alert_sensor()])
