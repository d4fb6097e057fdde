"""Dagster wrapper of the ops scenario products: `dbt build --target ops` (reads only the ops DB: the security boundary)."""

import datetime as dt
import functools
import json
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource

from zqdata.publish import withdraw_partition
from assets.dbt_common import build_partition, dbt_project, dbt_resource, partitioned_dbt_assets, scenario_vars
from orchestration.pools import GOV_POOL, OPS_POOL, hold_pool
from orchestration.resources import WarehouseResource
from zqdata.registry import registry


@functools.cache
def ops_dbt_assets() -> dg.AssetsDefinition:
    """ops/products/<model>, daily partitioned; authorized fields and k come from the registry as dbt vars."""

    @partitioned_dbt_assets(select="path:models/ops", name="ops_dbt_products", pool=OPS_POOL)
    def ops_dbt_products(context: dg.AssetExecutionContext, dbt: DbtCliResource,
                         warehouse: WarehouseResource) -> Iterator[Any]:
        day = dt.date.fromisoformat(context.partition_key)
        vars_ = scenario_vars(registry(), day)
        # Nothing of this partition is served while it is rebuilt: its published snapshots are withdrawn first and
        # published again only after the rebuilt products pass their gates (ops/published).
        withdrawn = withdraw_partition(registry(), day, [key.path[-1] for key in context.selected_asset_keys])
        if withdrawn:
            context.log.info(f"重建前撤回已发布快照 withdrawn while rebuilt: {', '.join(withdrawn)}")
        # column lineage + schema are read from the ops DB once dbt has exited (never through dbt's in-process adapter)
        events = build_partition(dbt, context, "ops", warehouse.gov_path(), warehouse.ops_path(), extra_vars=vars_)
        yield from with_product_traces(events, warehouse, context)

    return ops_dbt_products


def with_product_traces(events: Iterator[Any], warehouse: WarehouseResource,
                        context: dg.AssetExecutionContext) -> Iterator[Any]:
    """Attach the 逐级溯源 trace to every failed product check: the failing product rows' `_source_lineage_ids` lead
    level by level to the ops dataset, the gov models, the ODS rows, the delivery file and the agency (masked rows).

    Runs after dbt has exited (events are buffered for column lineage). The gov DB is opened read-only for the trace,
    which only reads it (under the gov pool): nothing of the ops platform is written into gov.
    """
    from orchestration.sensors import trace_metadata

    manifest = json.loads(dbt_project().manifest_path.read_text(encoding="utf-8"))
    tests = {n["name"]: n for n in manifest.get("nodes", {}).values() if n.get("resource_type") == "test"}
    for event in events:
        node = tests.get(getattr(event, "check_name", None)) if isinstance(event, dg.AssetCheckResult) else None
        if node is not None and not event.passed:
            trace = _product_trace(node, warehouse, context, trace_metadata)
            event = event._replace(metadata={**event.metadata, **trace})
        yield event


def _product_trace(node: dict[str, Any], warehouse: WarehouseResource, context: dg.AssetExecutionContext,
                   trace_metadata) -> dict:
    """The trace of one failed product test from its stored failures (empty when they carry no lineage)."""
    model = (node.get("attached_node") or "").rsplit(".", 1)[-1]
    schema, table = node.get("schema"), node.get("alias") or node.get("name")
    if not model or not schema:
        return {}
    with warehouse.ops(read_only=True) as ops_con:
        columns = {c for (c,) in ops_con.execute(
            "select column_name from information_schema.columns where table_schema = ? and table_name = ?",
            [schema, table]).fetchall()}
        if "_source_lineage_ids" not in columns:
            return {}
        ids = [i for (i,) in ops_con.execute(
            f'select distinct unnest(_source_lineage_ids) from "{schema}"."{table}" order by 1 limit 50').fetchall()]
        if not ids:
            return {}
        with hold_pool(context, GOV_POOL), warehouse.gov(read_only=True) as gov_con:
            return trace_metadata(gov_con, ops_con, registry(), partition_date=context.partition_key, lineage_ids=ids,
                                  asset_key=f"ops/products/{model}")


def ops_dbt_defs() -> dg.Definitions:
    """The ops product assets with the `dbt` resource (`warehouse` comes from orchestration.resources)."""
    return dg.Definitions(assets=[ops_dbt_assets()], resources={"dbt": dbt_resource()})
