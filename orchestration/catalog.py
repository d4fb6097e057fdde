"""Applies zqdata.catalog to every asset of the code location once: owners, tags, storage names, column classification."""

from __future__ import annotations

import dagster as dg

from zqdata.catalog import catalog_entry, merge_columns, with_group_label
from zqdata.registry import Registry


def with_catalog(spec: dg.AssetSpec, registry: Registry) -> dg.AssetSpec:
    description = with_group_label(spec.description, spec.group_name)
    entry = catalog_entry(spec.key.path, registry)
    if entry is None:
        return spec.replace_attributes(description=description)
    metadata = dict(spec.metadata or {})
    if entry.table_name:
        metadata["dagster/table_name"] = entry.table_name
    if entry.dataset is not None and spec.key.path[0] != "landing":
        existing = metadata.get("dagster/column_schema")
        columns = ([(c.name, c.type, c.description) for c in existing.schema.columns]
                   if isinstance(existing, dg.TableSchemaMetadataValue) else
                   [(c.name, c.type, c.description) for c in existing.columns] if isinstance(existing, dg.TableSchema)
                   else None)
        metadata["dagster/column_schema"] = dg.TableSchema(columns=[
            dg.TableColumn(name, type_, description=desc, tags=dict(tags) or None)
            for name, type_, desc, tags in merge_columns(columns, entry.dataset, entry.crossing)])
    return spec.replace_attributes(
        description=description,
        owners=sorted({*(spec.owners or ()), *entry.owners}),
        tags={**(spec.tags or {}), **entry.tags},
        metadata=metadata,
    )


def apply_catalog(defs: dg.Definitions, registry: Registry) -> dg.Definitions:
    """Every asset spec of ``defs`` with its catalog entry (zqdata.catalog); the rest of ``defs`` as it is."""
    assets = dg.map_asset_specs(lambda spec: with_catalog(spec, registry), list(defs.assets or []))
    return dg.Definitions(assets=assets, asset_checks=defs.asset_checks, jobs=defs.jobs, schedules=defs.schedules,
                          sensors=defs.sensors, resources=defs.resources, loggers=defs.loggers,
                          executor=defs.executor, metadata=defs.metadata)
