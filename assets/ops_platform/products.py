"""Dagster wrapper of the ops scenario products: `dbt build --target ops` (reads only the ops DB: the security boundary)."""

import functools
import json
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource, dbt_assets

from assets.dbt_common import (
    dbt_project,
    dbt_resource,
    dbt_vars,
    point_dbt_at,
    stream_with_column_lineage,
    translator,
)
from orchestration.partitions import daily_partitions
from orchestration.resources import WarehouseResource
from zqdata.registry import registry


@functools.cache
def ops_dbt_assets() -> dg.AssetsDefinition:
    """ops/products/<model>, daily partitioned; authorized fields and k come from the registry as dbt vars."""
    project = dbt_project()

    @dbt_assets(
        manifest=project.manifest_path,
        project=project,
        select="path:models/ops",
        name="ops_dbt_products",
        dagster_dbt_translator=translator(),
        partitions_def=daily_partitions,
    )
    def ops_dbt_products(context: dg.AssetExecutionContext, dbt: DbtCliResource,
                         warehouse: WarehouseResource) -> Iterator[Any]:
        point_dbt_at(warehouse.gov_path(), warehouse.ops_path())
        vars_ = dbt_vars(registry(), context.partition_key, scenarios=True)
        args = ["build", "--target", "ops", "--vars", json.dumps(vars_, ensure_ascii=False)]
        # column lineage + schema are read from the ops DB once dbt has exited (never through dbt's in-process adapter)
        yield from stream_with_column_lineage(dbt.cli(args, context=context), warehouse.ops_path(), context)

    return ops_dbt_products


def ops_dbt_defs() -> dg.Definitions:
    """The ops product assets with the `dbt` resource (`warehouse` comes from orchestration.resources)."""
    return dg.Definitions(assets=[ops_dbt_assets()], resources={"dbt": dbt_resource()})
