"""`landing/delivery_<dataset>` assets: each agency's daily delivery in the landing zone (simulated for the demo, else observed).

Thin wrapper: generation lives in `zqdata.simulator`, the landing contract in `zqdata.landing`.
"""

# No `from __future__ import annotations`: Dagster resolves the config and resource annotations at definition time.
import datetime as dt
from collections.abc import Iterator

import dagster as dg

from orchestration.partitions import daily_partitions
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import ObjectStoreResource, store_step_retries
from zqdata import asset_keys
from zqdata.landing import (
    MANIFEST_NAME,
    arrival_time,
    delivery_prefix,
    future_delivery_days,
    try_read_manifest,
)
from zqdata.registry import Registry, registry
from zqdata.settings import TZ
from zqdata.simulator import SimulatorSettings, simulate_day
from zqdata.storage import ObjectStore


def landing_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(asset_keys.delivery(dataset))


def delivery_metadata(store: ObjectStore, reg: Registry, dataset: str, day: dt.date,
                      today: dt.date | None = None) -> dict[str, object]:
    """What the agency delivered for the day: files, records per the manifest, whether the manifest is present and
    readable, when the delivery arrived in the store beside what its manifest claims, and folders dated in the future.

    Never raises for the agency's own mistakes: a malformed manifest is named in ``manifest_problem`` (ingestion then
    records it as ``delivery.manifest_invalid`` and checks the files without it), so one agency cannot fail the
    landing step of every other agency."""
    agency = reg.datasets[dataset].agency
    today = today or dt.datetime.now(TZ).date()
    objects = store.list(delivery_prefix(agency, dataset, day))
    files = [o.key.rsplit("/", 1)[1] for o in objects if o.key.rsplit("/", 1)[1] != MANIFEST_NAME]
    manifest, problem = try_read_manifest(store, agency, dataset, day)
    arrived = arrival_time(objects)
    future = [delivery_prefix(agency, dataset, d) for d in future_delivery_days(store, agency, dataset, today)]
    return {
        "agency": f"{reg.agencies[agency].name} ({agency})",
        "files": files,
        "records": sum(f.record_count for f in manifest.files) if manifest else 0,
        "manifest_present": manifest is not None or problem is not None,
        "manifest_valid": problem is None,
        "manifest_problem": problem or "",
        # the store's arrival time (what timeliness uses) beside the manifest's own claim
        "arrived_at": arrived.isoformat() if arrived else "",
        "delivered_at": manifest.delivered_at.isoformat() if manifest and manifest.delivered_at else "",
        "future_folders": future,
    }


class LandingConfig(dg.Config):
    """Run-config overrides of the simulator settings; unset fields come from ZQ_SIMULATE / ZQ_SIM_*."""

    simulate: bool | None = None
    rows_per_day: int | None = None
    defect_rate: float | None = None
    seed: int | None = None

    def settings(self) -> SimulatorSettings:
        env = SimulatorSettings.from_env()
        return SimulatorSettings(
            enabled=env.enabled if self.simulate is None else self.simulate,
            rows_per_day=self.rows_per_day if self.rows_per_day is not None else env.rows_per_day,
            defect_rate=self.defect_rate if self.defect_rate is not None else env.defect_rate,
            seed=self.seed if self.seed is not None else env.seed,
        )


def build_landing_assets(reg: Registry) -> dg.AssetsDefinition:
    """One multi-asset over the registry datasets: simulating a day writes every dataset in one operation."""
    specs = [
        dg.AssetSpec(
            key=landing_key(ds.code),
            group_name="source_systems",
            kinds={"python"},
            partitions_def=daily_partitions,
            description=f"{reg.agencies[ds.agency].name}每日交付的「{ds.name}」（落地区 {ds.agency}/{ds.code}/<日期>/，"
                        f"{ds.delivery.format}，时限 T+{ds.delivery.sla_hours} 小时） — {ds.name_en}, delivered by "
                        f"{reg.agencies[ds.agency].name_en}",
        )
        for ds in sorted(reg.datasets.values(), key=lambda d: d.code)
    ]

    @dg.multi_asset(name="source_agency_deliveries", specs=specs, can_subset=True, partitions_def=daily_partitions,
                    backfill_policy=nightly_backfill_policy())
    def source_agency_deliveries(
        context: dg.AssetExecutionContext, config: LandingConfig, store: ObjectStoreResource
    ) -> Iterator[dg.MaterializeResult]:
        """数源单位交付：启用模拟器时写入（替换）当日模拟交付，否则只观察各单位实际交付的内容。"""
        events = DayEvents(context, partition_days(context))
        settings = config.settings()
        results = []
        with store_step_retries(context):
            object_store = store.get_store()
            for day in events.days:  # a range run: day by day, earliest first
                results += deliveries_of_day(context, events, object_store, reg, settings, day)
        yield from results
        yield from events.finish()

    return source_agency_deliveries


def deliveries_of_day(context: dg.AssetExecutionContext, events: DayEvents, object_store: ObjectStore, reg: Registry,
                      settings: SimulatorSettings, day: dt.date) -> list[dg.MaterializeResult]:
    """One day of the landing step: simulate it when enabled, then what each selected agency delivered."""
    results: list = []
    if settings.enabled:
        # Deterministic per (seed, day): re-running rewrites the same bytes, also for datasets not selected.
        defects = simulate_day(object_store, reg, day, settings.rows_per_day, settings.seed,
                               settings.defect_rate)
        context.log.info(f"模拟交付 {day}: {settings.rows_per_day} 行, 注入缺陷 {len(defects)} 个")
    today = dt.datetime.now(TZ).date()
    for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
        dataset = asset_keys.parse(key.path)[1]
        meta = delivery_metadata(object_store, reg, dataset, day, today)
        meta["simulated"] = settings.enabled
        if meta["manifest_problem"]:
            context.log.warning(f"{dataset}: {meta['manifest_problem']}（入库时记录并核对 recorded at ingestion）")
        if meta["future_folders"]:
            context.log.warning(f"{dataset}: 交付目录日期晚于今天 future-dated delivery folders: "
                                f"{', '.join(meta['future_folders'])}")
        results += events.materialize(day, key, meta)
    return results


def landing_defs() -> dg.Definitions:
    return dg.Definitions(assets=[build_landing_assets(registry())])
