"""`ops/published/published_<product>`: write–audit–publish. A product partition that passed every gate of its run is published
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
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import WarehouseResource
from zqdata import asset_keys
from zqdata.registry import registry

REQUIRED_GATES = ("no_personal_data_leak", "authorization_in_force", "reads_only_own_scenario")


def published_key(product: str) -> dg.AssetKey:
    return dg.AssetKey(asset_keys.published(product))


def product_key(product: str) -> dg.AssetKey:
    return dg.AssetKey(asset_keys.product(product))


def run_gate_results(instance: dg.DagsterInstance, run_id: str, asset_key: dg.AssetKey,
                     partition: str | None = None) -> dict[str, bool]:
    """{check name: passed} of the error-severity checks evaluated on `asset_key` in this run (warnings left out);
    with `partition`, only the evaluations of that partition (a range run evaluates every day of its range)."""
    by_partition = run_gate_results_by_partition(instance, run_id, asset_key)
    if partition is not None:
        return by_partition.get(partition, {})
    out: dict[str, bool] = {}
    for gates in by_partition.values():
        for name, passed in gates.items():
            out[name] = out.get(name, True) and passed
    return out


def run_gate_results_by_partition(instance: dg.DagsterInstance, run_id: str,
                                  asset_key: dg.AssetKey) -> dict[str | None, dict[str, bool]]:
    """{partition: {check name: passed}} of the error-severity checks evaluated on `asset_key` in this run.

    Read from the check executions Dagster's SQL event log indexes per asset, check, run and partition (SQLite here,
    PostgreSQL in production): only this product's evaluations are deserialized. Read from the run's event stream,
    every check evaluation of the run was (~184 a day, twice a day per product: 5.7 s of a 30-day range run)."""
    from dagster._core.events.log import EventLogEntry
    from dagster._core.storage.asset_check_execution_record import COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable as Executions
    from dagster._serdes import deserialize_value
    from sqlalchemy import select

    # a check planned and not evaluated (its model not built, its step failed) has no result: its row holds the
    # planned event, not an evaluation
    completed = [s.value for s in COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES]
    query = (select(Executions.c.partition, Executions.c.evaluation_event)
             .where(Executions.c.asset_key == asset_key.to_string(), Executions.c.run_id == run_id,
                    Executions.c.execution_status.in_(completed), Executions.c.evaluation_event.is_not(None))
             .order_by(Executions.c.id))
    with instance.event_log_storage.index_connection() as conn:
        rows = conn.execute(query).fetchall()
    out: dict[str | None, dict[str, bool]] = {}
    for partition, stored in rows:
        ev = deserialize_value(stored, EventLogEntry).get_dagster_event().event_specific_data
        if ev.severity == dg.AssetCheckSeverity.WARN and not ev.passed:
            continue  # a failed warning does not gate
        gates = out.setdefault(partition, {})
        gates[ev.check_name] = gates.get(ev.check_name, True) and bool(ev.passed)
    return out


def gate_problems(gates: dict[str, bool]) -> list[str]:
    missing = [g for g in REQUIRED_GATES if g not in gates]
    failed = [g for g, ok in gates.items() if not ok]
    return ([f"门禁未运行 gate not evaluated in this run: {', '.join(missing)}"] if missing else []) + (
        [f"门禁未通过 gate failed: {', '.join(failed)}"] if failed else [])


def build_publish_asset(product: str) -> dg.AssetsDefinition:
    """`ops/published/published_<product>`: one step per product, so that one product's failed or erroring gate (its blocking
    checks fail their step) stops the publication of that product only; the others are published (issue 12)."""
    spec = dg.AssetSpec(
        key=published_key(product),
        deps=[product_key(product)],
        group_name="ops_platform",
        kinds={"parquet"},
        partitions_def=daily_partitions,
        skippable=True,  # a product reading a dataset held back by the quality gate is not published
        description=(f"已发布的场景产品快照「{product}」：通过全部门禁的分区以不可变 Parquet 快照发布（含清单：行数、SHA-256、"
                     "门禁结果），使用方只从这里获取数据。 Immutable published snapshot of the product partition."),
    )

    @dg.multi_asset(name=f"publish_{product}", specs=[spec], partitions_def=daily_partitions, pool=OPS_POOL,
                    backfill_policy=nightly_backfill_policy())
    def publish_product(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> Iterator[dg.MaterializeResult]:
        """Publish the product partition when its gates passed in this run."""
        events = DayEvents(context, partition_days(context))
        # a range run: each day with the gates evaluated on that day (the run's evaluations read once for all days)
        by_day = None if events.single else run_gate_results_by_partition(context.instance, context.run.run_id,
                                                                          product_key(product))
        with warehouse.ops(read_only=True) as ops:  # one connection for the days (~45 ms to open one)
            for day in events.days:
                yield from publish_day(context, ops, product, day, events,
                                       None if by_day is None else by_day.get(day.isoformat(), {}))
        yield from events.finish()

    return publish_product


def publish_day(context: dg.AssetExecutionContext, ops, product: str, day: dt.date,
                events: DayEvents, gates: dict[str, bool] | None = None) -> Iterator[dg.MaterializeResult]:
    """Publish one day of the product when its gates of this run passed; nothing when an input was held back.
    `ops`: a read-only connection to the ops DB. `gates`: the day's gate results when already read (a range run),
    else read from the run's evaluations."""
    from zqdata.boundary import held_back_on_ops
    from zqdata.publish import PublishRefused, products_reading, publish_partition, published_store, withdraw

    store = published_store()
    held = held_back_on_ops(ops, day)  # enforce, don't trust: what the ops DB holds for the partition
    if product in products_reading(registry(), held):
        withdraw(store, product, day)  # in case an earlier run published it
        inputs = sorted(set(held) & set(registry().scenario_for_product(product).authorized_fields))
        context.log.warning(f"{product} 本分区不发布：输入数据集被质量门禁留置 (not published: input held "
                            f"back by the quality gate) {', '.join(f'{d}（{held[d]}）' for d in inputs)}")
        return
    if gates is None:
        gates = run_gate_results(context.instance, context.run.run_id, product_key(product),
                                 None if events.single else day.isoformat())
    problems = gate_problems(gates)
    try:
        if problems:
            raise PublishRefused("；".join(problems))
        snap = publish_partition(ops, store, registry(), product, day, gates, context.run.run_id)
    except PublishRefused as exc:  # the previous published version, if any, stays what consumers get
        raise dg.Failure(description=f"未发布 not published (the partition stays unpublished): {product}: "
                                     f"{'' if events.single else str(day) + ': '}{exc}") from None
    yield from events.materialize_day_only(day, published_key(product), {
        "dagster/row_count": snap.row_count,
        "snapshot": snap.key,
        "sha256": snap.sha256,
        "gate_results": dg.MetadataValue.json(gates),
        "scenario": snap.scenario,
    })


def publish_defs() -> dg.Definitions:
    return dg.Definitions(assets=[build_publish_asset(p) for p in sorted({s.product for s in registry().scenarios.values()})])
