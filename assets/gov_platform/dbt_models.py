"""Dagster wrapper of the gov dbt models: `dbt build --target gov` of one partition (staging, intermediate, their tests)."""

import contextlib
import datetime as dt
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.dbt_common import (GOV_DBT_STEP, RUN_DIRS_KEPT, build_partition, dbt_project, dbt_resource,
                               dbt_source_specs, enrich_check_result, partitioned_dbt_assets, ranged_dbt_events,
                               relation_asset_keys, split_by_day)
from assets.governance.quality import prefetch_gx_for_run
from orchestration.pools import gov_dbt_pool
from orchestration.ranges import DayEvents, partition_days
from orchestration.resources import WarehouseResource
from zqdata.lakes import warehouse_mode
from zqdata.leakgate import update_identifier_index
from zqdata.quality import check_info
from zqdata.quality.model_failures import (clear_model_failures, isolable, lost_commit_race, record_model_failures,
                                          unbuilt_models)
from zqdata.reference import sync_reference_tables
from zqdata.registry import Registry, registry


@functools.cache
def gov_dbt_assets() -> dg.AssetsDefinition:
    """gov/staging/<model> and gov/intermediate/<model>, daily partitioned; dbt tests are asset checks."""

    @partitioned_dbt_assets(select="path:models/gov", name=GOV_DBT_STEP, pool=gov_dbt_pool())
    def gov_dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource,
                       warehouse: WarehouseResource) -> Iterator[Any]:
        reg = registry()
        day_events = DayEvents(context, partition_days(context))
        prefetch_gx_for_run(context)  # GX's import, in the background while this step waits for dbt
        # a range run builds its days with ONE dbt build over the range (issue 15), each day's check results and
        # findings split from it by `_partition_date`; when that build fails, its days are built one by one, exactly
        # as single-day runs (a failing model then holds back its own day's dataset only)
        by_day = None if day_events.single else build_gov_range(context, dbt, warehouse, reg, day_events)
        for day in day_events.days:
            events = by_day[day] if by_day is not None else build_gov_day(context, dbt, warehouse, reg, day,
                                                                           day_events)
            yield from ranged_dbt_events(events, day, day_events)
        yield from day_events.finish()

    return gov_dbt_models


def build_gov_day(context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
                  reg: Registry, day: dt.date, day_events: DayEvents) -> Iterator[Any]:
    """`dbt build --target gov` of one day, with check traces; then the leak gate's identifier index for the day.

    Once dbt has exited (its events are buffered for column lineage) ONE gov connection serves the traces, the
    findings and the index: opening the gov file and the checkpoint at closing it are ~20-60 ms each."""
    from zqdata.quality.dbt_findings import collect_dbt_findings, collected_with_build

    # the code-table and range rules read the registry through ref.* (synced, never copied into dbt)
    with warehouse.gov() as con:
        sync_reference_tables(con, reg)
        clear_model_failures(con, day)  # this build decides afresh which models of the partition did not build
    # column lineage + schema are read from the gov DB once dbt has exited (never through dbt's in-process adapter)
    events: list[Any] | None = None
    try:
        events = list(build_partition(dbt, context, "gov", warehouse.gov_path(), warehouse.ops_path(),
                                      on_unbuilt=functools.partial(confine_unbuilt, context, warehouse, reg, day),
                                      day=None if day_events.single else day,
                                      keep_runs=max(RUN_DIRS_KEPT, len(day_events.days))))
    finally:
        if events is None:  # dbt failed: the index still gets the partition's ODS identifiers
            with warehouse.gov() as con:
                _index_identifiers(context, con, reg, day)
    manifest = _manifest()
    with warehouse.gov() as con:
        try:
            yield from with_check_traces(iter(events), warehouse, reg, day.isoformat(), con=con, manifest=manifest)
            if collected_with_build(day_events.single):  # another day's build may come next: the findings now
                collect_dbt_findings(con, manifest, day)
        finally:  # the leak gate's index of gov identifiers gets this partition's (ODS, staging, intermediate)
            _index_identifiers(context, con, reg, day)


def _index_identifiers(context: dg.AssetExecutionContext, con: Any, reg: Registry, day: dt.date) -> None:
    added = update_identifier_index(con, reg, day)
    context.log.debug(f"leak-gate identifier index: {added} new values for {day}")


def build_gov_range(context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
                    reg: Registry, day_events: DayEvents) -> dict[dt.date, list[Any]] | None:
    """ONE `dbt build --target gov` over the range's days (ZQ_PARTITION_START/END): {day: that day's events}, as
    a build of the day alone would have given them (each test's result and failed rows from its stored failures of
    the day, with its trace; the day's findings collected; the leak gate's index updated). None when the range form
    does not apply (DuckLake: backfills run a day per run) or the build failed: its days are then built one by one."""
    from zqdata.quality.dbt_findings import collect_dbt_findings
    from zqdata.warehouse import frozen_catalog

    days = day_events.days
    if warehouse_mode() != "duckdb":
        return None
    with warehouse.gov() as con:
        sync_reference_tables(con, reg)
        for day in days:
            clear_model_failures(con, day)
    try:
        events = list(build_partition(dbt, context, "gov", warehouse.gov_path(), warehouse.ops_path(),
                                      day=days[0], last_day=days[-1]))
    except Exception as e:  # noqa: BLE001 - the days are built one by one instead, which reports the failure
        context.log.warning(f"{days[0]}..{days[-1]} 区间构建失败，改为逐日构建 (the range build failed; each day is "
                            f"built on its own, as a single-day run): {type(e).__name__}: {str(e)[:500]}")
        return None
    manifest = _manifest()
    with warehouse.gov() as con:
        split = split_by_day(con, events, manifest, days)
        if split is None:
            context.log.warning("有测试的失败行不含分区日期，改为逐日构建 (a test's stored failures have no "
                                "_partition_date: each day is built on its own)")
            return None
        for day in days:
            collect_dbt_findings(con, manifest, day)
            _index_identifiers(context, con, reg, day)
        with frozen_catalog(con):  # written above, only read below: the traces ask the catalog once, not ~3× each
            return {day: list(with_check_traces(iter(split[day]), warehouse, reg, day.isoformat(),
                                                findings_collected=True, con=con, manifest=manifest))
                    for day in days}


def confine_unbuilt(context: dg.AssetExecutionContext, warehouse: WarehouseResource, reg: Registry, day: dt.date,
                    run_results: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[dg.MaterializeResult] | None:
    """One agency's failing model stops only its own dataset (issue 12): the models that did not build are recorded,
    their partition emptied and their dataset held back by the quality gate; the other datasets go on to the ops
    platform. None (the step fails) when the failure cannot be confined (zqdata.quality.model_failures.isolable).

    Each unbuilt model gets a materialization that says so (`dbt_status`, 0 rows, `partition_rebuilt: false`): its
    partition now holds nothing, which is what downstream sees, and the steps of the other datasets are not skipped."""
    if warehouse_mode() == "ducklake" and lost_commit_race(run_results):
        context.log.warning("dbt 模型提交与并发运行冲突，本步骤将重试 (a model lost a DuckLake commit race with a "
                            "concurrent day: the step fails and runs again; nothing is held back)")
        return None
    unbuilt = unbuilt_models(run_results, manifest)
    selected = sum(1 for r in run_results.get("results", []) if str(r.get("unique_id", "")).startswith("model."))
    datasets = isolable(unbuilt, reg, selected)
    if datasets is None:
        return None
    with warehouse.gov() as con:
        removed = record_model_failures(con, day, unbuilt, datasets, context.run.run_id)
    keys = relation_asset_keys(manifest)
    out = []
    for u in unbuilt:
        context.log.error(f"dbt 模型 {u.model} 未构建（{u.status}）：{u.message}。数据集 {datasets[u.model]} 本分区留置，"
                          f"其他数据集照常 (model not built: its dataset is held back, the others go on)")
        out.append(dg.MaterializeResult(asset_key=keys[u.relation], metadata={
            "dagster/row_count": 0, "dbt_status": u.status, "partition_rebuilt": False, "error": u.message,
            "held_back_dataset": datasets[u.model], "rows_removed": removed.get(u.relation, 0)}))
    return out


def with_check_traces(events: Iterator[Any], warehouse: WarehouseResource, reg: Registry,
                      partition_key: str, findings_collected: bool = False, con: Any = None,
                      manifest: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Attach the 逐级溯源 trace (agency → delivery file → rows) to every failed dbt check, as the UI shows it.

    The events arrive after dbt has exited (they are buffered for column lineage), so the gov DB is free: the
    partition's dbt failures are collected into quality.findings once (unless `findings_collected`), then each failed
    check is traced by its rule. `con`: an open gov connection to use (else one is opened when a check needs it).
    `manifest`: the build's dbt manifest when already read (a range run's days share it; ~25 ms to read).
    """
    from orchestration.sensors import prefetch_finding_rows, trace_metadata
    from zqdata.quality.dbt_findings import collect_dbt_findings

    manifest = manifest if manifest is not None else _manifest()
    tests = {n["name"]: n for n in manifest.get("nodes", {}).values() if n.get("resource_type") == "test"}
    collected, prefetched = findings_collected, False
    counts: dict[str, int | None] = {}
    with contextlib.ExitStack() as stack:
        for event in events:
            if isinstance(event, dg.AssetCheckResult) and event.check_name in tests:
                node = tests[event.check_name]
                if con is None:
                    con = stack.enter_context(warehouse.gov())
                event = enrich_check_result(event, node, manifest, partition_rows(con, manifest, node, partition_key, counts))
                rule = check_info.rule_meta(node).get("rule")
                model = (node.get("attached_node") or "").rsplit(".", 1)[-1]
                if not event.passed and rule and "__" in model:
                    if not collected:
                        collect_dbt_findings(con, manifest, partition_key)
                        collected = True
                    if not prefetched:  # the rows the day's traces show, one read per dataset (in frozen_catalog)
                        prefetch_finding_rows(con, reg, partition_key)
                        prefetched = True
                    trace = trace_metadata(con, None, reg, partition_date=partition_key,
                                           dataset=model.split("__", 1)[1], rules=[rule])
                    event = event._replace(metadata={**event.metadata, **trace})
            yield event


def partition_rows(con: Any, manifest: Mapping[str, Any], node: Mapping[str, Any], partition_key: str,
                   cache: dict[str, int | None]) -> int | None:
    """Rows of the tested model's partition (what a check of that model evaluated); None when it has no table."""
    model = manifest.get("nodes", {}).get(node.get("attached_node") or "", {})
    if not model.get("relation_name"):
        return None
    relation = ".".join(f'"{p}"' for p in (model.get("schema"), model.get("alias") or model.get("name")))
    if relation not in cache:
        try:
            cache[relation] = con.execute(f"select count(*) from {relation} where cast(_partition_date as date) = ?",
                                          [partition_key]).fetchone()[0]
        except Exception:  # noqa: BLE001 - a model without its table (not built): no count to show
            cache[relation] = None
    return cache[relation]


def gov_dbt_defs() -> dg.Definitions:
    """The gov dbt assets with the `dbt` resource (`warehouse` comes from orchestration.resources).

    The ref.* sources (synced from the registry by this asset) are declared here so they sit in gov_platform.
    """
    ref_sources = dg.AssetsDefinition(specs=dbt_source_specs(_manifest(), source_names=["ref"]))
    return dg.Definitions(assets=[gov_dbt_assets(), ref_sources], resources={"dbt": dbt_resource()})


def _manifest() -> dict[str, Any]:
    return json.loads(dbt_project().manifest_path.read_text(encoding="utf-8"))
