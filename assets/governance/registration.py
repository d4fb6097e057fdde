"""Registration (登记, Art. 17) and the disclosure report (信息披露, Art. 21) as Dagster assets, group `governance_reports`.

- `governance/registrations` (not partitioned; job `registration_sync`, daily 01:30 Asia/Shanghai): syncs the register
  in the operational DB with the registry and the products' output columns in the dbt manifest
  (`zqdata.governance.registration.sync_registrations`): imports the registry's codes, files change records. It opens
  no warehouse file (no pool).
- `governance/disclosure_report` (yearly partitions from 2025; job `disclosure_report`, 1 March 09:00 for the previous
  year): builds the year's disclosure report and publishes JSON, Markdown and HTML to the published store under
  `reports/disclosure/<year>/`.
"""

import datetime as dt
import functools

import dagster as dg

from assets.governance.reports import governance_asset
from orchestration.partitions import TZ_NAME, yearly_partitions
from zqdata.registry import registry
from zqdata.settings import TZ

REGISTRATIONS_KEY = dg.AssetKey(["governance", "registrations"])
DISCLOSURE_KEY = dg.AssetKey(["governance", "disclosure_report"])
REGISTRATION_JOB = "registration_sync"
DISCLOSURE_JOB = "disclosure_report"
FIRST_DISCLOSURE_YEAR = yearly_partitions.start.year  # the first yearly partition (the measures: 2025-05-01)


def disclosure_year_for(scheduled: dt.datetime) -> int:
    """The year a disclosure run at ``scheduled`` reports on: the previous calendar year (Shanghai time)."""
    return scheduled.astimezone(TZ).year - 1


def build_registrations_asset() -> dg.AssetsDefinition:
    @governance_asset(
        REGISTRATIONS_KEY, {"sqlite"}, (
            "登记（第十七条）：将登记目录中数据资源与数据产品的登记编码导入运营数据库；数据集字段或产品输出列（dbt 清单）"
            "与最近一次登记内容不同时自动提交变更登记。只读登记目录与 dbt 清单，写运营数据库，不打开数仓文件。"
            " Syncs registration records (Art. 17) with the registry and the products' output columns: imports the "
            "registry's codes and files a change record when a dataset's fields or a product's columns changed."))
    def registrations(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from zqdata import opdb
        from zqdata.governance import registration as r

        try:
            columns = r.product_columns_from_manifest()
        except FileNotFoundError:
            context.log.warning("未找到 dbt 清单 dbt_project/target/manifest.json（make dbt-parse），本次不同步产品登记")
            columns = {}
        db = opdb.get_engine()
        report = r.sync_registrations(db, registry(), columns, actor=f"dagster:{context.run.run_id}")
        context.log.info(report.summary())
        without_code = [s.subject for s in r.catalogue(db, registry()) if not s.deliverable]
        return dg.MaterializeResult(metadata={
            "created": len(report.created),
            "imported": len(report.imported),
            "applied": len(report.applied),
            "changed": len(report.changed),
            "created_records": dg.MetadataValue.md(r.markdown_table(report.created)),
            "skipped_products": ", ".join(report.skipped),
            "without_code_or_cancelled": ", ".join(without_code),
            "operational_db": opdb.describe(db),
        })

    return registrations


def build_disclosure_asset() -> dg.AssetsDefinition:
    @governance_asset(
        DISCLOSURE_KEY, {"sqlite"}, (
            "年度信息披露报告（第二十一条）：期间内有效的授权（对象、内容、范围、期限、公益/经营性）、数据产品与服务目录及登记编码、"
            "数据使用情况（按产品、按使用方类别的交付次数与行数、拒绝次数）。不含个人信息与凭证。发布 JSON、Markdown 与 HTML 至"
            "发布存储 reports/disclosure/<年度>/。"
            " The year's disclosure report (Art. 21): authorizations in force, product and service catalogue with "
            "registration codes, data use; published as JSON, Markdown and self-contained HTML."),
        partitions_def=yearly_partitions, deps=[REGISTRATIONS_KEY])
    def disclosure_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from zqdata import opdb
        from zqdata.governance import disclosure
        from zqdata.publish import published_store

        period = disclosure.Period.year(int(context.partition_key))
        report = disclosure.build_disclosure(opdb.get_engine(), registry(), period)
        published = disclosure.publish_disclosure(published_store(), report)
        totals = report["data_use"]["totals"]
        context.log.info(f"信息披露报告 {period.label} 已发布 published: {published.prefix}/")
        return dg.MaterializeResult(metadata={
            "period": f"{period.start} – {period.end}",
            "authorizations": len(report["authorizations"]),
            "products": len(report["catalogue"]["products"]),
            "deliveries": totals["deliveries"],
            "rows_delivered": totals["rows"],
            "refusals": totals["refusals"],
            "published": dg.MetadataValue.json(published.keys),
            "report": dg.MetadataValue.md(disclosure.render_markdown(report).decode("utf-8")),
        })

    return disclosure_report


@functools.cache
def registration_jobs() -> tuple:
    sync = dg.define_asset_job(
        REGISTRATION_JOB, selection=[REGISTRATIONS_KEY], executor_def=dg.in_process_executor,
        description="同步登记记录（第十七条）。Syncs the registration records with the registry and the dbt manifest.",
    )
    report = dg.define_asset_job(
        DISCLOSURE_JOB, selection=[DISCLOSURE_KEY],
        executor_def=dg.in_process_executor,
        description="生成并发布年度信息披露报告（第二十一条）。Builds and publishes a year's disclosure report.",
    )
    return sync, report


def build_schedules() -> list[dg.ScheduleDefinition]:
    sync_job, report_job = registration_jobs()
    sync = dg.ScheduleDefinition(
        name="registration_sync_0130", job=sync_job, cron_schedule="30 1 * * *", execution_timezone=TZ_NAME,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="每天 01:30（北京时间）同步登记，变更自动申请。Daily registration sync at 01:30 Asia/Shanghai.",
    )

    @dg.schedule(
        name="disclosure_report_0301", job=report_job, cron_schedule="0 9 1 3 *", execution_timezone=TZ_NAME,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="每年 3 月 1 日 09:00（北京时间）生成上一年度的信息披露报告（3 月底前披露）。"
                    " On 1 March, the previous year's disclosure report (due by the end of March).",
    )
    def disclosure_schedule(context: dg.ScheduleEvaluationContext):
        year = disclosure_year_for(context.scheduled_execution_time)
        if year < FIRST_DISCLOSURE_YEAR:
            return dg.SkipReason(f"{year} 年早于办法施行 (before the measures took effect)")
        return dg.RunRequest(run_key=f"disclosure-{year}", partition_key=str(year))

    return [sync, disclosure_schedule]


def registration_defs() -> dg.Definitions:
    """Registration and disclosure: assets, their jobs and schedules (built on call)."""
    return dg.Definitions(assets=[build_registrations_asset(), build_disclosure_asset()],
                          jobs=list(registration_jobs()), schedules=build_schedules())
