"""`ops/published/<product>`: write–audit–publish. A product partition that passed every gate of its run is published
as an immutable Parquet snapshot with a manifest; consumers (`zq deliver`) read only those, never the build database.

Dagster skips this step when a blocking gate fails or errors; it also checks the gates itself (enforce, don't trust):
only the evaluations recorded in the event log for this run and partition count, and every error-severity check of the
product must have passed, the leak gate and the authorization check among them.

The quality gate decides per dataset (issue 12): a product whose scenario reads a dataset the last crossing of the
partition held back (``boundary.held_back`` in the ops DB) is not published for the partition and stays withdrawn; the
other products are published. That is the gate working, not a failure of this step.
"""


import datetime as dt
from collections.abc import Iterator

import dagster as dg

from orchestration.partitions import daily_partitions
from orchestration.pools import OPS_POOL
from orchestration.resources import WarehouseResource
from zqdata.registry import registry

REQUIRED_GATES = ("no_personal_data_leak", "authorization_in_force", "reads_only_own_scenario")


def published_key(product: str) -> dg.AssetKey:
    return dg.AssetKey(["ops", "published", product])


def product_key(product: str) -> dg.AssetKey:
    return dg.AssetKey(["ops", "products", product])


def run_gate_results(instance: dg.DagsterInstance, run_id: str, asset_key: dg.AssetKey) -> dict[str, bool]:
    """{check name: passed} of the error-severity checks evaluated on `asset_key` in this run (warnings left out)."""
    from dagster._core.events import DagsterEventType

    out: dict[str, bool] = {}
    for rec in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION, limit=10_000).records:
        ev = rec.event_log_entry.dagster_event.event_specific_data
        if ev.asset_key != asset_key:
            continue
        if ev.severity == dg.AssetCheckSeverity.WARN and not ev.passed:
            continue  # a failed warning does not gate
        out[ev.check_name] = out.get(ev.check_name, True) and bool(ev.passed)
    return out


def gate_problems(gates: dict[str, bool]) -> list[str]:
    missing = [g for g in REQUIRED_GATES if g not in gates]
    failed = [g for g, ok in gates.items() if not ok]
    return ([f"门禁未运行 gate not evaluated in this run: {', '.join(missing)}"] if missing else []) + (
        [f"门禁未通过 gate failed: {', '.join(failed)}"] if failed else [])


def build_publish_assets() -> dg.AssetsDefinition:
    products = sorted({s.product for s in registry().scenarios.values()})
    specs = [
        dg.AssetSpec(
            key=published_key(p),
            deps=[product_key(p)],
            group_name="ops_platform",
            kinds={"parquet"},
            partitions_def=daily_partitions,
            skippable=True,  # a product reading a dataset held back by the quality gate is not published
            description=(f"已发布的场景产品快照「{p}」：通过全部门禁的分区以不可变 Parquet 快照发布（含清单：行数、SHA-256、门禁结果），"
                         "使用方只从这里获取数据。 Immutable published snapshot of the product partition."),
        )
        for p in products
    ]

    @dg.multi_asset(name="publish_products", specs=specs, can_subset=True, partitions_def=daily_partitions,
                    pool=OPS_POOL)
    def publish_products(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> Iterator[dg.MaterializeResult]:
        """Publish each selected product partition whose gates passed in this run."""
        from zqdata.boundary import held_back_on_ops
        from zqdata.publish import PublishRefused, products_reading, publish_partition, published_store, withdraw

        day = dt.date.fromisoformat(context.partition_key)
        store = published_store()
        refused = []
        with warehouse.ops(read_only=True) as ops:
            held = held_back_on_ops(ops, day)  # enforce, don't trust: what the ops DB holds for the partition
            not_served = set(products_reading(registry(), held))
            for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
                product = key.path[-1]
                if product in not_served:
                    withdraw(store, product, day)  # in case an earlier run published it
                    inputs = sorted(set(held) & set(registry().scenario_for_product(product).authorized_fields))
                    context.log.warning(f"{product} 本分区不发布：输入数据集被质量门禁留置 (not published: input held "
                                        f"back by the quality gate) {', '.join(f'{d}（{held[d]}）' for d in inputs)}")
                    continue
                gates = run_gate_results(context.instance, context.run.run_id, product_key(product))
                problems = gate_problems(gates)
                if problems:
                    refused.append(f"{product}: {'；'.join(problems)}")
                    continue
                try:
                    snap = publish_partition(ops, store, registry(), product, day, gates, context.run.run_id)
                except PublishRefused as exc:
                    refused.append(f"{product}: {exc}")
                    continue
                yield dg.MaterializeResult(asset_key=key, metadata={
                    "dagster/row_count": snap.row_count,
                    "snapshot": snap.key,
                    "sha256": snap.sha256,
                    "gate_results": dg.MetadataValue.json(gates),
                    "scenario": snap.scenario,
                })
        if refused:
            raise dg.Failure(description="未发布 not published (the partition stays unpublished):\n" + "\n".join(refused))

    return publish_products


def publish_defs() -> dg.Definitions:
    return dg.Definitions(assets=[build_publish_assets()])
