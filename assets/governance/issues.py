"""The quality-issue register as Dagster assets (Art. 20: 逐级溯源, the agency alerted, the issue tracked until fixed).

- `gov/quality/issues` (daily partitions, in the nightly job): files and updates the partition's issues from
  quality.findings into the operational database, and puts the agency messages in the outbox. It reads the gov DB, so
  it holds the gov pool; it writes no warehouse file.
- `gov/quality/notifications` (not partitioned, its own small job): delivers the outbox (SMTP or the local Maildir,
  webhooks), retries failed messages, escalates overdue issues. It opens no warehouse file at all. The alert sensor
  requests it after new issues, and again while messages fail or an escalation falls due.
"""


import datetime as dt
import functools

import dagster as dg

from assets.governance.quality import FINDINGS_KEY
from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import WarehouseResource
from zqdata.registry import registry

ISSUES_KEY = dg.AssetKey(["gov", "quality", "issues"])
NOTIFICATIONS_KEY = dg.AssetKey(["gov", "quality", "notifications"])
SYNC_JOB = "quality_issue_sync"
NOTIFY_JOB = "quality_issue_notifications"


def issues_table(rows: list) -> dg.TableMetadataValue:
    """Open issues per agency × dataset × Art. 20 dimension, as a table in the UI."""
    from zqdata.lineage import dimension_label

    reg = registry()
    grouped: dict[tuple, dict] = {}
    for i in rows:
        g = grouped.setdefault((i.agency, i.dataset, i.dimension or ""), {"issues": 0, "records": 0, "errors": 0, "ids": []})
        g["issues"] += 1
        g["records"] += int(i.records_failed or 0)
        g["errors"] += i.severity == "error"
        g["ids"].append(i.issue_id)
    records = [
        dg.TableRecord({
            "agency": f"{reg.agencies[a].name} ({a})" if a in reg.agencies else a,
            "dataset": ds,
            "dimension": dimension_label(dim or None),
            "issues": g["issues"],
            "error_issues": g["errors"],
            "records_failed": g["records"],
            "issue_ids": ", ".join(g["ids"][:5]) + (" …" if len(g["ids"]) > 5 else ""),
        })
        for (a, ds, dim), g in sorted(grouped.items())
    ]
    schema = dg.TableSchema(columns=[
        dg.TableColumn("agency", "string", description="数源机构 agency"),
        dg.TableColumn("dataset", "string"),
        dg.TableColumn("dimension", "string", description="第二十条质量维度 Art. 20 dimension"),
        dg.TableColumn("issues", "int"),
        dg.TableColumn("error_issues", "int", description="错误级 error severity"),
        dg.TableColumn("records_failed", "int"),
        dg.TableColumn("issue_ids", "string"),
    ])
    return dg.MetadataValue.table(records, schema=schema)


def build_issues_asset() -> dg.AssetsDefinition:
    @dg.asset(
        key=ISSUES_KEY,
        group_name="governance",
        partitions_def=daily_partitions,
        backfill_policy=nightly_backfill_policy(),
        deps=[FINDINGS_KEY],
        pool=GOV_POOL,
        kinds={"duckdb", "sqlite"},
        description=(
            "数据质量问题登记（第二十条）：按（数据集、规则、分区、数源机构）登记问题，重新交付后自动复核关闭或重新打开，"
            "超过时限升级；并为各数源机构生成通知（发件箱）。写入运营数据库（SQLite/PostgreSQL），不写数仓文件。"
            " Files and updates the partition's quality issues in the operational DB and queues the agencies' messages."
        ),
    )
    def quality_issues(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        from zqdata import alerting, issues, opdb
        from zqdata.warehouse import frozen_catalog

        reg = registry()
        db = opdb.get_engine()
        events = DayEvents(context, partition_days(context))
        # one read-only gov connection for all the days, under the step's gov pool: its catalog cannot change, so the
        # traces of the day's issues ask it which tables exist once (`frozen_catalog`)
        with warehouse.gov(read_only=True) as gov, frozen_catalog(gov):
            for day in events.days:  # a range run: each day's issues, earliest first (a later day may verify one)
                report = issues.sync_issues(gov, db, reg, day)
                queued = alerting.enqueue(db, reg, alerting.AlertSettings.from_env())
                current = issues.list_issues(db, partition_date=day)
                unverified = [i for i in current if i.status not in issues.CLOSED]
                context.log.info(f"{day}: {report.summary()}；新通知 {len(queued)} 条")
                yield from events.materialize(day, None, issue_metadata(unverified, report, queued, db))
        yield from events.finish()

    return quality_issues


def issue_metadata(unverified: list, report, queued: list, db) -> dict:
    """What the issues step records for a day."""
    from zqdata import opdb

    return {
        "open_issues_by_agency": issues_table(unverified),
        "open_issues": len(unverified),
        "opened": len(report.opened),
        "reopened": len(report.reopened),
        "verified": len(report.verified),
        "escalated": len(report.escalated),
        "messages_queued": len(queued),
        "operational_db": opdb.describe(db),
    }


def build_notifications_asset() -> dg.AssetsDefinition:
    @dg.asset(
        key=NOTIFICATIONS_KEY,
        group_name="governance",
        deps=[ISSUES_KEY],
        kinds={"sqlite"},
        description=(
            "质量问题通知投递：向数源机构发送发件箱中的消息（SMTP，未配置时写入本地 Maildir 发件箱；Webhook），失败重试，"
            "逾期升级至数据管理机构。只使用运营数据库，不打开数仓文件。"
            " Delivers the outbox to the agencies, retries failures, escalates overdue issues."
        ),
    )
    def quality_issue_notifications(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from zqdata import alerting, issues, opdb

        reg = registry()
        db = opdb.get_engine()
        settings = alerting.AlertSettings.from_env()
        escalated = issues.escalate_overdue(db, reg)
        report = alerting.notify_issues(db, reg, settings)
        counts = alerting.outbox_counts(db)
        due = issues.next_escalation_due(db, reg)
        context.log.info(report.summary() + (f"；升级 {len(escalated)} 个问题" if escalated else ""))
        return dg.MaterializeResult(metadata={
            "queued": len(report.enqueued),
            "sent": len(report.sent),
            "failed": len(report.failed),
            "escalated": len(escalated),
            "outbox": dg.MetadataValue.json(counts),
            "email_transport": settings.email_transport,
            "maildir": dg.MetadataValue.path(str(settings.maildir)),
            # the sensor reads these two from the event log to decide on the next run
            "retry_pending": counts.get("failed", 0) + counts.get("pending", 0),
            "next_escalation_due": due.isoformat() if due else "",
        })

    return quality_issue_notifications


@functools.cache
def issue_jobs() -> tuple:
    sync = dg.define_asset_job(
        SYNC_JOB, selection=[ISSUES_KEY], executor_def=dg.in_process_executor,
        description="为一个分区重新登记质量问题（夜间作业之外重算了质量问题明细时由告警传感器请求）。",
    )
    notify = dg.define_asset_job(
        NOTIFY_JOB, selection=[NOTIFICATIONS_KEY], executor_def=dg.in_process_executor,
        description="投递质量问题通知、重试与升级（由告警传感器请求）。Delivers issue notifications.",
    )
    return (sync, notify)


def issues_defs() -> dg.Definitions:
    return dg.Definitions(assets=[build_issues_asset(), build_notifications_asset()], jobs=list(issue_jobs()))
