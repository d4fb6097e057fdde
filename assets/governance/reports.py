"""Governance reports as Dagster assets (Arts. 22, 28, 30): thin wrappers around ``zqdata.governance``.

- ``governance/agency_evaluation``: yearly partitions from 2025, the annual evaluation of source agencies (Art. 22),
  scheduled on 1 March for the previous year;
- ``governance/quarterly_operations_report``: quarterly partitions (first days of Jan/Apr/Jul/Oct, from 2025-04-01), the
  operator's quarterly report (Art. 28), scheduled on the first day of each quarter for the quarter that ended;
- ``governance/compliance_matrix``: not partitioned, the compliance matrix and risk list (Art. 30), scheduled on the
  first day of each quarter too, and materialized on demand for any day (config ``as_of_date``).

Each publishes HTML (charts inline), Markdown and JSON to the published store under ``reports/<kind>/<period>/``. The
two partitioned assets read the gov DuckDB file read-only and hold its pool; none writes a warehouse file.

The daily nightly job leaves this group out (``reports_selection()``): the reports' partitions are not days.
"""


import datetime as dt
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from orchestration.partitions import REPORTS_GROUP as GROUP
from orchestration.partitions import TZ_NAME, quarterly_partitions, yearly_partitions
from orchestration.pools import GOV_POOL
from orchestration.resources import WarehouseResource

EVALUATION_KEY = dg.AssetKey(["governance", "agency_evaluation"])
QUARTERLY_KEY = dg.AssetKey(["governance", "quarterly_operations_report"])
COMPLIANCE_KEY = dg.AssetKey(["governance", "compliance_matrix"])
EVALUATION_JOB = "governance_agency_evaluation"
QUARTERLY_JOB = "governance_quarterly_operations_report"
COMPLIANCE_JOB = "governance_compliance_matrix"
# Schedules run at 06:30 Asia/Shanghai, after each report's cutoff (06:00, zqdata.governance.reporting.SETTLE): the
# scheduled report is final, and regenerating it later gives the same bytes but the generation time.
REPORT_TIME = "30 6"


def reports_selection() -> dg.AssetSelection:
    """The report assets (to leave out of the daily-partitioned nightly job)."""
    return dg.AssetSelection.groups(GROUP)


class ComplianceConfig(dg.Config):
    as_of_date: str = ""  # YYYY-MM-DD; empty: today (Asia/Shanghai)


def governance_asset(key: dg.AssetKey, kinds: set[str], description: str, **kwargs):
    """The decorator of an asset of this group (the reports here, registration and disclosure in
    assets.governance.registration); ``kwargs``: partitions, pool, deps."""
    return dg.asset(key=key, group_name=GROUP, kinds=kinds, description=description, **kwargs)


def _gov_report_asset(key: dg.AssetKey, partitions_def: dg.PartitionsDefinition, description: str):
    """The decorator of a partitioned report asset that reads the gov DuckDB file (read-only, holding its pool)."""
    return governance_asset(key, {"duckdb", "html"}, description, partitions_def=partitions_def, pool=GOV_POOL)


def _metadata(report, published, store, numbers) -> dict:
    from zqdata.storage import LocalObjectStore

    meta = {
        "summary": dg.MetadataValue.md(report.summary_markdown()),
        "period": report.period,
        "as_of": report.as_of.isoformat(),
        "provisional": report.provisional,
        "report_prefix": published.prefix,
        "content_digest": published.digest,
        "reused_existing": published.reused,
        **numbers,
    }
    if isinstance(store, LocalObjectStore):
        meta["report_html"] = dg.MetadataValue.path(str(Path(store.root) / published.prefix / "report.html"))
    return meta


def _publish(context, report, numbers) -> dg.MaterializeResult:
    """Publish the report to the published store; its materialization with ``numbers`` as numeric metadata."""
    from orchestration.resources import store_step_retries
    from zqdata.governance.reporting import publish_report
    from zqdata.publish import published_store

    with store_step_retries(context):
        store = published_store()
        published = publish_report(store, report)
    return dg.MaterializeResult(metadata=_metadata(report, published, store, numbers))


def _gov_read_only(warehouse: WarehouseResource):
    """The gov DuckDB file read-only (the caller holds the gov pool); an empty in-memory DB when it does not exist."""
    import contextlib

    import duckdb

    if warehouse.gov_exists():
        return warehouse.gov(read_only=True)
    return contextlib.closing(duckdb.connect())


def build_evaluation_asset() -> dg.AssetsDefinition:
    @_gov_report_asset(
        EVALUATION_KEY, yearly_partitions, (
            "数源机构年度成效评价（第二十二条）：按机构与年度统计第二十条六个维度的质量（按记录数加权）、月度趋势、"
            "按时/逾期/未交付、问题数、确认与整改用时中位数、重新打开数，按 registry/evaluation.yaml 的权重计算综合得分并排名；"
            "发布 HTML（内嵌图表）、Markdown 与 JSON 至 reports/evaluation/<年>/。"
            " Annual evaluation of source agencies (Art. 22): ranked scorecard from quality scores, deliveries vs SLA "
            "and issue handling."))
    def agency_evaluation(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        from zqdata import opdb
        from zqdata.governance.evaluation import build_evaluation_report, evaluate_agencies, numeric_metadata
        from zqdata.governance.weights import load_evaluation_config
        from zqdata.registry import registry

        year = int(context.partition_key)
        with _gov_read_only(warehouse) as gov:
            ev = evaluate_agencies(gov, opdb.get_engine(), registry(), load_evaluation_config(), year)
        return _publish(context, build_evaluation_report(ev), numeric_metadata(ev))

    return agency_evaluation


def build_quarterly_asset() -> dg.AssetsDefinition:
    @_gov_report_asset(
        QUARTERLY_KEY, quarterly_partitions, (
            "运营工作情况季度报告（第二十八条）：按运营机构与场景统计交付次数、使用方、行数、收费类型（登记中无收费标准时如实说明）、"
            "质量门禁留置与泄露/出域闸门拦截（来自 Dagster 事件日志）、输入数据质量、数据需求及其状态；"
            "发布至 reports/quarterly/<年-Q季>/。"
            " Quarterly operations report per operator and scenario (Art. 28)."))
    def quarterly_operations_report(context: dg.AssetExecutionContext,
                                    warehouse: WarehouseResource) -> dg.MaterializeResult:
        from zqdata import opdb
        from zqdata.governance.quarterly import build_quarterly, build_quarterly_report, numeric_metadata
        from zqdata.registry import registry

        with _gov_read_only(warehouse) as gov:
            q = build_quarterly(gov, opdb.get_engine(), registry(), context.partition_key, instance=context.instance)
        return _publish(context, build_quarterly_report(q), numeric_metadata(q))

    return quarterly_operations_report


def loaded_definitions() -> dg.Definitions:
    """The code location's Definitions (orchestration.definitions), with these reports merged in if not yet wired."""
    from orchestration.definitions import defs

    loaded = defs()
    if not loaded.resolve_asset_graph().has(COMPLIANCE_KEY):
        loaded = dg.Definitions.merge(loaded, dg.Definitions(assets=report_assets()))
    return loaded


def build_compliance_asset() -> dg.AssetsDefinition:
    @governance_asset(
        COMPLIANCE_KEY, {"html"}, (
            "监督与风险报告（第三十条）：由代码生成的合规矩阵（条款 → 实现控制 → 最近运行状态：通过/未通过/超期未运行/缺口，"
            "registry/controls.yaml）与风险清单（逾期未整改问题、30 天内到期授权、有拒绝记录的使用方、未通过的门禁）；"
            "发布至 reports/compliance/<日期>/。"
            " Compliance matrix from the code and the latest runs, and the risk list (Art. 30)."))
    def compliance_matrix(context: dg.AssetExecutionContext, config: ComplianceConfig) -> dg.MaterializeResult:
        from zqdata import opdb
        from zqdata.governance.compliance import build_compliance, build_compliance_report, numeric_metadata
        from zqdata.registry import registry
        from zqdata.settings import TZ

        day = dt.date.fromisoformat(config.as_of_date) if config.as_of_date else dt.datetime.now(TZ).date()
        c = build_compliance(loaded_definitions(), context.instance, opdb.get_engine(), registry(), day)
        result = _publish(context, build_compliance_report(c), numeric_metadata(c))
        for row in c.rows:
            if row.status in ("failed", "gap"):
                context.log.warning(f"第{row.article.article}条 {row.status}: {row.article.requirement}")
        return result

    return compliance_matrix


def report_assets() -> list[dg.AssetsDefinition]:
    return [build_evaluation_asset(), build_quarterly_asset(), build_compliance_asset()]


def report_jobs() -> list:
    return [
        dg.define_asset_job(EVALUATION_JOB, selection=[EVALUATION_KEY],
                            description="数源机构年度成效评价 Annual evaluation of source agencies (Art. 22)"),
        dg.define_asset_job(QUARTERLY_JOB, selection=[QUARTERLY_KEY],
                            description="运营工作情况季度报告 Quarterly operations report (Art. 28)"),
        dg.define_asset_job(COMPLIANCE_JOB, selection=[COMPLIANCE_KEY],
                            description="监督与风险报告 Compliance matrix and risk list (Art. 30)"),
    ]


def _report_schedule(name: str, job_name: str, cron_schedule: str, description: str,
                     request: Callable[[dt.date], dg.RunRequest]) -> dg.ScheduleDefinition:
    """A running schedule (Asia/Shanghai) of a report job: ``request`` turns the scheduled day into the run."""
    from zqdata.settings import TZ

    @dg.schedule(name=name, job_name=job_name, cron_schedule=cron_schedule, execution_timezone=TZ_NAME,
                 default_status=dg.DefaultScheduleStatus.RUNNING, description=description)
    def report_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        return request(context.scheduled_execution_time.astimezone(TZ).date())

    return report_schedule


def _evaluation_request(day: dt.date) -> dg.RunRequest:
    key = str(day.year - 1)
    return dg.RunRequest(run_key=f"evaluation:{key}", partition_key=key)


def _quarterly_request(day: dt.date) -> dg.RunRequest:
    from zqdata.governance.quarterly import previous_quarter_start

    key = previous_quarter_start(day).isoformat()
    return dg.RunRequest(run_key=f"quarterly:{key}", partition_key=key)


def _compliance_request(day: dt.date) -> dg.RunRequest:
    return dg.RunRequest(run_key=f"compliance:{day.isoformat()}", run_config=dg.RunConfig(
        ops={"governance__compliance_matrix": ComplianceConfig(as_of_date=day.isoformat())}))


def report_schedules() -> list[dg.ScheduleDefinition]:
    return [
        _report_schedule("agency_evaluation_0301", EVALUATION_JOB, f"{REPORT_TIME} 1 3 *",
                         "每年 3 月 1 日 06:30（北京时间）评价上一年度。On 1 March for the previous year.",
                         _evaluation_request),
        _report_schedule("quarterly_operations_report_quarter_start", QUARTERLY_JOB, f"{REPORT_TIME} 1 1,4,7,10 *",
                         "每季度首日 06:30（北京时间）报告上一季度。On the first day of each quarter for the last one.",
                         _quarterly_request),
        _report_schedule("compliance_matrix_quarterly", COMPLIANCE_JOB, f"{REPORT_TIME} 1 1,4,7,10 *",
                         "每季度首日 06:30（北京时间）生成合规矩阵与风险清单。Compliance matrix on each quarter's first day.",
                         _compliance_request),
    ]


def reports_defs() -> dg.Definitions:
    """The governance report assets, their jobs and schedules (built on call, nothing at import)."""
    return dg.Definitions(assets=report_assets(), jobs=report_jobs(), schedules=report_schedules())
