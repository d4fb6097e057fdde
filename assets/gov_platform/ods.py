"""`gov/ods/ods_<dataset>` assets: a day's delivery ingested into the gov DuckDB ODS, with quarantine and row accounting.

Thin wrapper: the logic is `zqdata.ingest.ingest_delivery`. Embedded, the datasets are ingested in ONE step
(`ods_steps`); on the lakes a step per dataset.
"""

import datetime as dt
from collections.abc import Generator, Iterator
from typing import Any

import dagster as dg

from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import ObjectStoreResource, WarehouseResource, store_step_retries
from zqdata import asset_keys
from zqdata.ingest import IngestReport, ingest_delivery, row_accounting
from zqdata.lakes import warehouse_mode
from zqdata.quality.check_info import evaluation_metadata
from zqdata.registry import Dataset, Registry, registry

ROW_ACCOUNTING_CHECK = "row_accounting"
ODS_STEP = "gov__ods__ingestion"  # embedded: the step that ingests every dataset (`ods_steps`)


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


def ods_steps(reg: Registry) -> list[list[Dataset]]:
    """The datasets of each ODS step.

    Embedded (one gov DuckDB file, one writer at a time): ONE step for every dataset. Steps on the gov pool run one
    after another anyway, and each paid the step's events, the gov file's open and the checkpoint at its close: seven
    steps were ~0.9 s of a 1,000-row night for ~0.3 s of ingestion (bench/notes.md 19).
    On the lakes (`ZQ_WAREHOUSE=ducklake`, several writers) a step per dataset, which the workers run side by side."""
    datasets = sorted(reg.datasets.values(), key=lambda d: d.code)
    return [datasets] if warehouse_mode() == "duckdb" else [[ds] for ds in datasets]


def build_ods_assets(datasets: list[Dataset], reg: Registry) -> dg.AssetsDefinition:
    """The ODS assets of `datasets` (with their row-accounting checks) as one subsettable step.

    Each selected dataset is ingested day by day (a range run: earliest first, a day's duplicate detection reads the
    deliveries of the days before), all through one gov connection, each day and dataset committing on its own. A
    delivery that is refused (`rejected`) stops its own dataset, from that day: the other datasets are ingested and
    recorded, then the step fails naming it (the gov models need every dataset's ODS of the day)."""
    specs = [dg.AssetSpec(
        key=ods_key(ds.code),
        group_name="gov_platform",
        deps=[dg.AssetKey(asset_keys.delivery(ds.code))],
        kinds={"duckdb"},
        description=(
            f"贴源层（ODS）「{ds.name}」：{reg.agencies[ds.agency].name}当日交付的原始记录，字段值按交付原样保存为文本并附血缘列；"
            f"未通过接入契约（缺列/多列、必填为空、类型无法解析、重复交付等）的记录进入 quarantine.rows 并注明原因。"
            f" — ODS of {ds.name_en}, values as delivered, with lineage columns; contract failures quarantined."
        ),
    ) for ds in datasets]
    checks = [dg.AssetCheckSpec(
        ROW_ACCOUNTING_CHECK,
        asset=ods_key(ds.code),
        partitions_def=daily_partitions,
        description=f"行数核对：交付行数 = 入库行数 + 隔离行数（{reg.agencies[ds.agency].name}） — rows delivered = accepted + "
                    f"quarantined; 完整性 Completeness（第二十条 Art. 20）；错误级 error",
        metadata={"dimension": "completeness", "rule_severity": "error", "agency": ds.agency},
    ) for ds in datasets]
    name = ODS_STEP if len(datasets) > 1 else ods_key(datasets[0].code).to_python_identifier()

    @dg.multi_asset(name=name, specs=specs, check_specs=checks, can_subset=True, partitions_def=daily_partitions,
                    backfill_policy=nightly_backfill_policy(), pool=GOV_POOL)
    def _ods(context: dg.AssetExecutionContext, store: ObjectStoreResource,
             warehouse: WarehouseResource) -> Iterator[Any]:
        """数源机构当日交付入贴源层（ODS），含隔离与行数核对 — each dataset's delivery of the day into the gov ODS."""
        events = DayEvents(context, partition_days(context))
        selected = [ds for ds in datasets if ods_key(ds.code) in context.selected_asset_keys]
        stopped: dict[str, tuple[dt.date, IngestReport]] = {}
        # one connection for the step: closing one checkpoints the file (~40 ms), each day and dataset commits alone
        with warehouse.gov() as con:
            for day in events.days:
                for ds in selected:
                    if ds.code in stopped:
                        continue
                    report = yield from ingest_day(context, con, store, reg, ds, day, events)
                    if report.status == "rejected":
                        stopped[ds.code] = (day, report)
        for code in stopped:  # nothing of a stopped dataset is output: not even the range's days before it stopped
            events.forget(ods_key(code))
        yield from events.finish()
        if stopped:
            raise rejected_failure(stopped, events.single)

    return _ods


def ingest_day(context: dg.AssetExecutionContext, con: Any, store: ObjectStoreResource, reg: Registry, ds: Dataset,
               day: dt.date, events: DayEvents) -> Generator[Any, None, IngestReport]:
    """One day's delivery of the dataset into its ODS; its materialization with its row accounting unless the delivery
    was refused (`rejected`). Returns the ingestion report."""
    with store_step_retries(context):
        report = ingest_delivery(con, store.get_store(), reg, ds.code, day)
        acc = row_accounting(con, ds.code, day)
    if report.status == "rejected":
        context.log.error(f"{ds.code} {day}: 交付被拒收 (delivery refused): " + "；".join(report.errors))
        return report
    if report.errors:
        context.log.warning(f"{ds.code} {day}: " + "；".join(report.errors))
    yield from events.materialize(day, ods_key(ds.code), metadata=_metadata(report),
                                  check_results=[accounting_check(acc, ds.code)])
    return report


def rejected_failure(stopped: dict[str, tuple[dt.date, IngestReport]], single: bool) -> dg.Failure:
    """The step's failure for the datasets whose delivery was refused: each named with its reasons (and, in a range
    run, the day that stopped it)."""
    lines = [f"{code}: " + ("" if single else f"{day}: ") + "；".join(report.errors)
             for code, (day, report) in sorted(stopped.items())]
    metadata: dict[str, Any] = {"rejected_datasets": sorted(stopped)}
    if len(stopped) == 1:
        metadata.update(_metadata(next(iter(stopped.values()))[1]))
    return dg.Failure(description="\n".join(lines), metadata=metadata)


def ods_defs() -> dg.Definitions:
    """The ODS assets (each with its row-accounting check) of every registry dataset, in the steps of `ods_steps`."""
    reg = registry()
    return dg.Definitions(assets=[build_ods_assets(datasets, reg) for datasets in ods_steps(reg)])
