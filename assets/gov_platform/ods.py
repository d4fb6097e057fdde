"""`gov/ods/ods_<dataset>` assets: a day's delivery ingested into the gov DuckDB ODS, with quarantine and row accounting.

Thin wrapper: the logic is `zqdata.ingest.ingest_delivery`.
"""

import datetime as dt
from collections.abc import Iterator
from typing import Any

import dagster as dg

from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import ObjectStoreResource, WarehouseResource, store_step_retries
from zqdata import asset_keys
from zqdata.ingest import IngestReport, ingest_delivery, row_accounting
from zqdata.quality.check_info import evaluation_metadata
from zqdata.registry import Dataset, Registry, registry

ROW_ACCOUNTING_CHECK = "row_accounting"


def ods_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(asset_keys.ods(dataset))


def _metadata(report: IngestReport) -> dict[str, object]:
    return {
        "status": report.status,
        "files": len([f for f in report.files if f.key]),
        "rows_delivered": report.rows_delivered,
        "rows_accepted": report.rows_accepted,
        "rows_quarantined": report.rows_quarantined,
        "findings": report.findings,
        "errors": dg.MetadataValue.md("\n".join(f"- {e}" for e in report.errors) or "无 none"),
    }


def accounting_check(acc: dict[str, int], dataset: str) -> dg.AssetCheckResult:
    """交付行数 = 入库行数 + 隔离行数, both in meta.deliveries and in the actual tables."""
    passed = (
        acc["rows_delivered"] == acc["rows_accepted"] + acc["rows_quarantined"]
        and acc["rows_accepted"] == acc["rows_in_ods"]
        and acc["rows_quarantined"] == acc["rows_in_quarantine"]
    )
    return dg.AssetCheckResult(
        asset_key=ods_key(dataset),
        check_name=ROW_ACCOUNTING_CHECK,
        passed=passed,
        metadata={**{k: dg.MetadataValue.int(v) for k, v in acc.items()},
                  **evaluation_metadata({"dimension": "completeness", "severity": "error", "rule": "row_accounting"},
                                        registry().datasets[dataset].agency, acc["rows_delivered"],
                                        abs(acc["rows_delivered"] - acc["rows_in_ods"] - acc["rows_in_quarantine"]))},
        description=None if passed else "交付行数不等于入库行数与隔离行数之和 (rows delivered != accepted + quarantined)",
    )


def build_ods_asset(ds: Dataset, reg: Registry) -> dg.AssetsDefinition:
    agency = reg.agencies[ds.agency]

    @dg.asset(
        key=ods_key(ds.code),
        group_name="gov_platform",
        partitions_def=daily_partitions,
        backfill_policy=nightly_backfill_policy(),
        deps=[dg.AssetKey(asset_keys.delivery(ds.code))],
        pool=GOV_POOL,
        kinds={"duckdb"},
        description=(
            f"贴源层（ODS）「{ds.name}」：{agency.name}当日交付的原始记录，字段值按交付原样保存为文本并附血缘列；"
            f"未通过接入契约（缺列/多列、必填为空、类型无法解析、重复交付等）的记录进入 quarantine.rows 并注明原因。"
            f" — ODS of {ds.name_en}, values as delivered, with lineage columns; contract failures quarantined."
        ),
        check_specs=[
            dg.AssetCheckSpec(
                ROW_ACCOUNTING_CHECK,
                asset=ods_key(ds.code),
                partitions_def=daily_partitions,
                description=f"行数核对：交付行数 = 入库行数 + 隔离行数（{agency.name}） — rows delivered = accepted + "
                            f"quarantined; 完整性 Completeness（第二十条 Art. 20）；错误级 error",
                metadata={"dimension": "completeness", "rule_severity": "error", "agency": ds.agency},
            )
        ],
    )
    def _ods(
        context: dg.AssetExecutionContext, store: ObjectStoreResource, warehouse: WarehouseResource
    ) -> Iterator[Any]:
        events = DayEvents(context, partition_days(context))
        # a range run ingests its days in order: a day's duplicate detection reads the deliveries of the days before.
        # One connection for them: closing one checkpoints the file (~55 ms a day and dataset), each day still commits
        # on its own.
        with warehouse.gov() as con:
            for day in events.days:
                yield from ingest_day(context, con, store, reg, ds, day, events)
        yield from events.finish()

    return _ods


def ingest_day(context: dg.AssetExecutionContext, con: Any, store: ObjectStoreResource, reg: Registry, ds: Dataset,
               day: dt.date, events: DayEvents) -> Iterator[Any]:
    """One day's delivery of the dataset into its ODS, with its row accounting; dg.Failure when it was rejected."""
    with store_step_retries(context):
        report = ingest_delivery(con, store.get_store(), reg, ds.code, day)
        acc = row_accounting(con, ds.code, day)
    if report.status == "rejected":
        when = "" if events.single else f"{day}: "  # a range run names the day that stopped it
        raise dg.Failure(description=when + "；".join(report.errors), metadata=_metadata(report))
    if report.errors:
        context.log.warning(f"{ds.code} {day}: " + "；".join(report.errors))
    yield from events.materialize(day, metadata=_metadata(report), check_results=[accounting_check(acc, ds.code)])


def ods_defs() -> dg.Definitions:
    """One ODS asset (with its row-accounting check) per registry dataset."""
    reg = registry()
    return dg.Definitions(assets=[build_ods_asset(ds, reg) for ds in sorted(reg.datasets.values(), key=lambda d: d.code)])
