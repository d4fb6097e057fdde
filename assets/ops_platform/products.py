"""Dagster wrapper of the ops scenario products: `dbt build --target ops` (reads only the ops DB: the security boundary)."""

import contextlib
import datetime as dt
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.dbt_common import (DBT_PROJECT_DIR, RUN_DIRS_KEPT, build_partition, dbt_project, dbt_resource,
                               enrich_check_result, partitioned_dbt_assets, ranged_dbt_events, run_dir_covers,
                               scenario_vars, split_by_day)
from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL, OPS_POOL, hold_pool
from orchestration.ranges import DayEvents, partition_days
from orchestration.resources import WarehouseResource
from zqdata import asset_keys
from zqdata.boundary import held_back_on_ops
from zqdata.dbt_guard import product_read_problems
from zqdata.lakes import worker_domains
from zqdata.publish import products_reading
from zqdata.registry import registry
from zqdata.warehouse import relation_columns


@functools.cache
def ops_dbt_assets() -> dg.AssetsDefinition:
    """ops/products/<model>, daily partitioned; authorized fields and k come from the registry as dbt vars."""

    @partitioned_dbt_assets(select="path:models/ops", name="ops_dbt_products", pool=OPS_POOL)
    def ops_dbt_products(context: dg.AssetExecutionContext, dbt: DbtCliResource,
                         warehouse: WarehouseResource) -> Iterator[Any]:
        day_events = DayEvents(context, partition_days(context))
        # a range run builds its days in stretches of days with the same authorizations and held-back inputs, ONE
        # dbt build (gated on its own manifest) per stretch, its results split by day (issue 15); a stretch of one day,
        # or one whose build failed, is built day by day, earliest first (a product of day D reads the days up to D)
        for days in [day_events.days] if day_events.single else product_stretches(warehouse, day_events.days):
            by_day = None if len(days) == 1 else build_products_range(context, dbt, warehouse, days)
            for day in days:
                events = by_day[day] if by_day is not None else build_products_day(context, dbt, warehouse, day,
                                                                                   day_events)
                yield from ranged_dbt_events(events, day, day_events)
        yield from day_events.finish()

    return ops_dbt_products


def build_products_day(context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
                       day: dt.date, day_events: DayEvents) -> Iterator[Any]:
    """`dbt build --target ops` of one day, with product traces; the products waiting on a held-back input.

    Every build checks the manifest it parsed itself before any node runs (`ops_gate`, zqdata/dbt_gate.py), also
    each day of a range run: its sealed environment holds the day (ZQ_PARTITION_DATE), and a model can make what it
    declares depend on it (a hook armed on one date): a check of another day's parse would prove nothing about this
    one (tests/test_sealed_dbt.py)."""
    vars_ = scenario_vars(registry(), day)

    # Write–audit–publish: consumers keep the partition's published snapshot (immutable, it passed its gates) while
    # the product is rebuilt here; ops/published replaces it only when the rebuilt product passes every gate, so a
    # failed gate leaves the previous published version untouched. (Data that must stop being served is withdrawn
    # where that is decided: a held-back dataset by the quality gate, a revoked consent by the crossing's purge.)
    # column lineage + schema are read from the ops DB once dbt has exited (never through dbt's in-process adapter)
    # sealed: dbt sees only the ops DB (no gov path, no key); only registered products may be built at all
    # a product reading a dataset the quality gate held back for the partition waits (issue 12): not built, its
    # partition emptied (its published snapshot was withdrawn by the crossing); the other products go on
    with warehouse.ops(read_only=True) as ops:
        waiting = products_reading(registry(), held_back_on_ops(ops, day))
    events = build_partition(dbt, context, "ops", warehouse.gov_path(), warehouse.ops_path(), extra_vars=vars_,
                             gate=ops_gate(), exclude=waiting,
                             day=None if day_events.single else day,
                             keep_runs=max(RUN_DIRS_KEPT, len(day_events.days)))
    yield from with_product_traces(events, warehouse, context, day.isoformat())
    yield from not_built(context, warehouse, day, waiting)


def product_inputs(warehouse: WarehouseResource, days: list[dt.date]) -> list[tuple[dict[str, Any], list[str]]]:
    """Per day: the products' dbt vars (the authorizations in force that day) and the products waiting on an input the
    quality gate held back for the day."""
    reg = registry()
    with warehouse.ops(read_only=True) as ops:
        return [(scenario_vars(reg, day), products_reading(reg, held_back_on_ops(ops, day))) for day in days]


def product_stretches(warehouse: WarehouseResource, days: list[dt.date]) -> list[list[dt.date]]:
    """The days in runs of consecutive days with the same authorizations and the same products waiting: each run of
    days can be one build (the same --vars and --exclude)."""
    out: list[tuple[list[dt.date], Any]] = []
    for day, (vars_, waiting) in zip(days, product_inputs(warehouse, days), strict=True):
        key = (json.dumps(vars_, sort_keys=True, ensure_ascii=False), sorted(waiting))
        if out and out[-1][1] == key:
            out[-1][0].append(day)
        else:
            out.append(([day], key))
    return [stretch for stretch, _ in out]


def build_products_range(context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
                         days: list[dt.date]) -> dict[dt.date, list[Any]] | None:
    """ONE `dbt build --target ops` over a stretch of days (`product_stretches`), gated on its own manifest (its
    sealed environment holds the range): {day: that day's events}, as a build of the day alone would
    have given them (each test's result from its stored failures of the day, the product traces of the day, the
    products left waiting). None when the build failed: the days are then built one by one (a refusal of the gate is
    not a build failure: it fails the step)."""
    [(vars_, waiting)] = product_inputs(warehouse, days[:1])
    try:
        events = list(build_partition(dbt, context, "ops", warehouse.gov_path(), warehouse.ops_path(),
                                      extra_vars=vars_, gate=ops_gate(), exclude=waiting,
                                      day=days[0], last_day=days[-1]))
    except dg.Failure as e:
        if "problems" in (e.metadata or {}):
            raise  # refused by the gate, nothing ran: a model the guard does not allow stops the run, not this stretch
        context.log.warning(f"{days[0]}..{days[-1]} 产品区间构建失败，改为逐日构建 (the products' range build failed; "
                            f"each day is built on its own): {str(e.description)[:500]}")
        return None
    except Exception as e:  # noqa: BLE001 - the days are built one by one instead, which reports the failure
        context.log.warning(f"{days[0]}..{days[-1]} 产品区间构建失败，改为逐日构建 (the products' range build failed; "
                            f"each day is built on its own): {type(e).__name__}: {str(e)[:500]}")
        return None
    manifest = json.loads(dbt_project().manifest_path.read_text(encoding="utf-8"))
    with warehouse.ops(read_only=True) as ops:
        split = split_by_day(ops, events, manifest, days)
    if split is None:
        context.log.warning("有产品测试的失败行不含分区日期，改为逐日构建 (a product test's stored failures have no "
                            "_partition_date: each day is built on its own)")
        return None
    return {day: [*with_product_traces(iter(split[day]), warehouse, context, day.isoformat()),
                  *not_built(context, warehouse, day, waiting)] for day in days}


def not_built(context: dg.AssetExecutionContext, warehouse: WarehouseResource, day: dt.date,
              products: list[str]) -> Iterator[dg.MaterializeResult]:
    """The products left out of this build because they read a held-back dataset: their partition emptied, and a
    materialization that says so (0 rows, `dbt_status: excluded`) so that the other products' steps are not skipped."""
    if not products:
        return
    with warehouse.ops() as ops:
        held = ", ".join(sorted(held_back_on_ops(ops, day)))
        for product in products:
            if "_partition_date" in relation_columns(ops, "products", product):
                ops.execute(f'delete from products."{product}" where cast(_partition_date as date) = ?', [day])
    for product in products:
        context.log.warning(f"产品 {product} 本分区未构建：读取被质量门禁留置的数据集 {held} "
                            f"(not built: it reads a held-back dataset)")
        yield dg.MaterializeResult(asset_key=dg.AssetKey(asset_keys.product(product)), metadata={
            "dagster/row_count": 0, "dbt_status": "excluded", "partition_rebuilt": False, "held_back_inputs": held})


OPS_DBT_OP = "ops_dbt_products"
SCENARIO_READ_CHECK = "reads_only_own_scenario"


def registered_products() -> set[str]:
    """The products registered by a scenario (registry/scenarios.yaml `product:`): the only models ops may build."""
    return {s.product for s in registry().scenarios.values()}


def ops_gate() -> dict[str, Any]:
    """What `dbt build --target ops` checks on its own manifest before any node runs (build_partition `gate`,
    zqdata/dbt_gate.py: dbt_guard.ops_manifest_problems against the registered products)."""
    return {"check": "ops_products", "products": sorted(registered_products())}


def run_folder(run_id: str, op_name: str = OPS_DBT_OP, day: str | None = None) -> Path | None:
    """The dbt target folder of this run's ops build (build_partition names it `<op>-<run id[:8]>-<random>`); in a
    range run the one that built the day: the day's own (`<op>-<run id[:8]>-<day>-<random>`) or its stretch's
    (`<op>-<run id[:8]>-<first>..<last>-<random>`)."""
    runs = sorted((p for p in (DBT_PROJECT_DIR / "target").glob(f"{op_name}-{run_id[:8]}-*")
                   if (p / "manifest.json").is_file()
                   and (day is None or run_dir_covers(p.name, op_name, run_id, day))),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    return runs[0] if runs else None


def scenario_read_result(product: str, run_dir: Path | None) -> dg.AssetCheckResult:
    """`reads_only_own_scenario` of one product from the manifest its dbt build wrote (compiled SQL of the model and
    its tests, hooks, sources), parsed by DuckDB: only scenario_<its scenario>.* may be read."""
    if run_dir is None:
        return dg.AssetCheckResult(passed=False, metadata={
            "problems": ["本次运行的 dbt 目标目录不存在，无法核验 (the run's dbt target folder is missing)"]})
    try:
        scenario = registry().scenario_for_product(product).code
    except KeyError:
        return dg.AssetCheckResult(passed=False, metadata={
            "problems": [f"产品 {product} 不属于任何登记场景 (not a registered scenario product)"]})
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    if not built_in_run(run_dir, product):  # left out of the build (it reads a held-back dataset): nothing ran
        return dg.AssetCheckResult(passed=True, metadata={
            "built": False, "scenario": scenario, "dbt_run_folder": run_dir.name,
            "note": "本次未构建，无 SQL 运行 (not built in this run: nothing read anything; it is not published)"})
    problems = product_read_problems(manifest, product, scenario)
    return dg.AssetCheckResult(passed=not problems, metadata={
        "problems": problems, "scenario": scenario, "dbt_run_folder": run_dir.name})


def built_in_run(run_dir: Path, product: str) -> bool:
    """Whether dbt ran the product's model in this run (its run_results.json lists it); True when unknown."""
    results = run_dir / "run_results.json"
    if not results.is_file():
        return True  # no results to prove it was left out: verify the compiled SQL
    ran = {r.get("unique_id", "") for r in json.loads(results.read_text(encoding="utf-8")).get("results", [])}
    return any(uid.startswith("model.") and uid.rsplit(".", 1)[-1] == product for uid in ran)


def scenario_read_checks(products: list[str]) -> list[dg.AssetChecksDefinition]:
    """One blocking `reads_only_own_scenario` check per product (a REQUIRED_GATE of publishing)."""

    def build(product: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=dg.AssetKey(asset_keys.product(product)), name=SCENARIO_READ_CHECK, blocking=True,
                        partitions_def=daily_partitions,
                        description="一场景一授权：产品只读取本场景的数据表 scenario_<场景>.*（编译后 SQL 经 DuckDB 解析）"
                                    " (the product reads only its own scenario's tables)")
        def reads_only_own_scenario(context: dg.AssetCheckExecutionContext):
            events = DayEvents(context, partition_days(context))
            for day in events.days:  # a range run: the folder of each day's build
                folder = run_folder(context.run.run_id) if events.single else run_folder(
                    context.run.run_id, day=day.isoformat())
                yield from events.check(day, scenario_read_result(product, folder))
            yield from events.finish()

        return reads_only_own_scenario

    return [build(p) for p in products]


def with_product_traces(events: Iterator[Any], warehouse: WarehouseResource,
                        context: dg.AssetExecutionContext, partition_key: str | None = None) -> Iterator[Any]:
    """Attach the 逐级溯源 trace to every failed product check: the failing product rows' `_source_lineage_ids` lead
    level by level to the ops dataset, the gov models, the ODS rows, the delivery file and the agency (masked rows).

    Runs after dbt has exited (events are buffered for column lineage). The gov DB is opened read-only for the trace,
    which only reads it (under the gov pool): nothing of the ops platform is written into gov.
    """
    from orchestration.sensors import trace_metadata

    from assets.gov_platform.dbt_models import partition_rows

    partition_key = partition_key or context.partition_key
    manifest = json.loads(dbt_project().manifest_path.read_text(encoding="utf-8"))
    tests = {n["name"]: n for n in manifest.get("nodes", {}).values() if n.get("resource_type") == "test"}
    counts: dict[str, int | None] = {}
    with contextlib.ExitStack() as stack:
        con = None
        for event in events:
            node = tests.get(getattr(event, "check_name", None)) if isinstance(event, dg.AssetCheckResult) else None
            if node is not None:
                con = con or stack.enter_context(warehouse.ops(read_only=True))
                event = enrich_check_result(event, node, manifest,
                                            partition_rows(con, manifest, node, partition_key, counts))
            if node is not None and not event.passed:
                trace = _product_trace(node, warehouse, context, trace_metadata, partition_key)
                event = event._replace(metadata={**event.metadata, **trace})
            yield event


def _product_trace(node: dict[str, Any], warehouse: WarehouseResource, context: dg.AssetExecutionContext,
                   trace_metadata, partition_key: str) -> dict:
    """The trace of one failed product test from its stored failures (empty when they carry no lineage)."""
    model = (node.get("attached_node") or "").rsplit(".", 1)[-1]
    schema, table = node.get("schema"), node.get("alias") or node.get("name")
    if not model or not schema:
        return {}
    with warehouse.ops(read_only=True) as ops_con:
        columns = set(relation_columns(ops_con, schema, table))
        if "_source_lineage_ids" not in columns:
            return {}
        # the failures of the partition only (a range build stores every day's)
        day = " where cast(_partition_date as date) = ?" if "_partition_date" in columns else ""
        ids = [i for (i,) in ops_con.execute(
            f'select distinct unnest(_source_lineage_ids) from "{schema}"."{table}"{day} order by 1 limit 50',
            [partition_key] if day else []).fetchall()]
        if not ids:
            return {}
        if "gov" not in worker_domains():  # an ops-only worker (ZQ_WORKER_DOMAINS=ops) holds no gov credential
            return {"trace": "溯源需政务域凭据，本工作进程仅持有运营域 (trace needs the gov domain; this worker holds "
                             "ops only: `zq trace` on a boundary host)"}
        with hold_pool(context, GOV_POOL), warehouse.gov(read_only=True) as gov_con:
            return trace_metadata(gov_con, ops_con, registry(), partition_date=partition_key, lineage_ids=ids,
                                  asset_key=f"ops/products/{model}")


def ops_dbt_defs() -> dg.Definitions:
    """The ops product assets with the `dbt` resource (`warehouse` comes from orchestration.resources)."""
    return dg.Definitions(assets=[ops_dbt_assets()], asset_checks=scenario_read_checks(sorted(registered_products())),
                          resources={"dbt": dbt_resource()})
