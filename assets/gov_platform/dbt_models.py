"""Dagster wrapper of the gov dbt models: `dbt build --target gov` of one partition (staging, intermediate, their tests)."""

import contextlib
import functools
import json
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.dbt_common import build_partition, dbt_project, dbt_resource, dbt_source_specs, partitioned_dbt_assets
from orchestration.pools import GOV_POOL
from orchestration.resources import WarehouseResource
from zqdata.reference import sync_reference_tables
from zqdata.registry import Registry, registry


@functools.cache
def gov_dbt_assets() -> dg.AssetsDefinition:
    """gov/staging/<model> and gov/intermediate/<model>, daily partitioned; dbt tests are asset checks."""

    @partitioned_dbt_assets(select="path:models/gov", name="gov_dbt_models", pool=GOV_POOL)
    def gov_dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource,
                       warehouse: WarehouseResource) -> Iterator[Any]:
        reg = registry()
        # the code-table and range rules read the registry through ref.* (synced, never copied into dbt)
        with warehouse.gov() as con:
            sync_reference_tables(con, reg)
        # column lineage + schema are read from the gov DB once dbt has exited (never through dbt's in-process adapter)
        events = build_partition(dbt, context, "gov", warehouse.gov_path(), warehouse.ops_path())
        yield from with_check_traces(events, warehouse, reg, context.partition_key)

    return gov_dbt_models


def with_check_traces(events: Iterator[Any], warehouse: WarehouseResource, reg: Registry,
                      partition_key: str) -> Iterator[Any]:
    """Attach the 逐级溯源 trace (agency → delivery file → rows) to every failed dbt check, as the UI shows it.

    The events arrive after dbt has exited (they are buffered for column lineage), so the gov DB is free: the
    partition's dbt failures are collected into quality.findings once, then each failed check is traced by its rule.
    """
    from orchestration.sensors import trace_metadata
    from zqdata.quality.dbt_findings import collect_dbt_findings

    tests = {n["name"]: n for n in _manifest().get("nodes", {}).values() if n.get("resource_type") == "test"}
    con = None
    with contextlib.ExitStack() as stack:
        for event in events:
            if isinstance(event, dg.AssetCheckResult) and not event.passed and event.check_name in tests:
                node = tests[event.check_name]
                rule = (node.get("config", {}).get("meta") or node.get("meta") or {}).get("rule")
                model = (node.get("attached_node") or "").rsplit(".", 1)[-1]
                if rule and "__" in model:
                    if con is None:
                        con = stack.enter_context(warehouse.gov())
                        collect_dbt_findings(con, _manifest(), partition_key)
                    trace = trace_metadata(con, None, reg, partition_date=partition_key,
                                           dataset=model.split("__", 1)[1], rules=[rule])
                    event = event._replace(metadata={**event.metadata, **trace})
            yield event


def gov_dbt_defs() -> dg.Definitions:
    """The gov dbt assets with the `dbt` resource (`warehouse` comes from orchestration.resources).

    The ref.* sources (synced from the registry by this asset) are declared here so they sit in gov_platform.
    """
    ref_sources = dg.AssetsDefinition(specs=dbt_source_specs(_manifest(), source_names=["ref"]))
    return dg.Definitions(assets=[gov_dbt_assets(), ref_sources], resources={"dbt": dbt_resource()})


def _manifest() -> dict[str, Any]:
    return json.loads(dbt_project().manifest_path.read_text(encoding="utf-8"))
