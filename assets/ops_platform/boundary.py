"""The one Dagster op crossing gov → ops (`boundary_crossing`), its blocking Art. 2 checks, and a leak gate for products.

Thin wrappers: the logic lives in `zqdata.boundary` / `zqdata.authorization`.
"""

import datetime as dt
from collections.abc import Iterator, Sequence

import dagster as dg
import duckdb

from assets.governance.quality import gate_key
from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL, OPS_POOL, boundary_pool, hold_pool
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import WarehouseResource
from zqdata import asset_keys
from zqdata.authorization import AuthorizationError, check_product_authorized
from zqdata.boundary import (CONSENT_DATASET, BoundaryGateFailed, GateResult, check_exclusions, cross_boundary,
                             find_leaks)
from zqdata.desensitize import KEY_ENV, PseudonymKey
from zqdata.registry import Registry, registry
from zqdata.revocation import owe_purge
from zqdata.warehouse import frozen_catalog



class PseudonymKeyResource(dg.ConfigurableResource):
    """The HMAC key for pseudonymization, from ZQ_PSEUDONYM_KEY only (GB/T 35273 §6.2: kept apart from the data)."""

    key: str = ""

    @classmethod
    def from_env(cls) -> "PseudonymKeyResource":
        """Bound to ``ZQ_PSEUDONYM_KEY`` where it is set. Where it is not — an ops or gov Celery worker, which must not
        hold it (``zqdata.lakes.domain_environment``) — the resource still loads, so the job's other steps run there,
        and only a step that asks for the key fails."""
        import os

        return cls(key=dg.EnvVar(KEY_ENV)) if os.environ.get(KEY_ENV) else cls()

    def pseudonym_key(self) -> PseudonymKey:
        if not self.key:
            raise dg.Failure(description=f"{KEY_ENV} 未设置：只有边界工作进程持有假名化密钥 (the pseudonymization "
                                         "key is not set in this process: the boundary step runs on the boundary worker)")
        return PseudonymKey.from_secret(self.key)


def desensitized_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(asset_keys.desensitized(dataset))


def _partition_dates(context) -> list[dt.date]:
    """The check's day(s): its partition, the days of a range run, else the run's partition tag."""
    if getattr(context, "has_partition_key", False) or getattr(context, "has_partition_key_range", False):
        return partition_days(context)
    key = context.run.tags.get("dagster/partition")
    if not key:
        raise dg.Failure("边界检查需要分区 (a partition key is required)")
    return [dt.date.fromisoformat(key)]


def build_boundary_crossing(reg: Registry) -> dg.AssetsDefinition:
    """The multi-asset: one spec per released dataset, two blocking checks on each."""
    released = [ds for ds in reg.datasets.values() if ds.release]
    specs = [
        dg.AssetSpec(
            key=desensitized_key(ds.code),
            group_name="ops_platform",
            kinds={"duckdb"},
            description=f"{ds.name}（脱敏后）：按登记的脱敏规则出域的字段，及各场景的授权字段 "
                        f"(desensitized.{ds.code} and scenario_<code>.{ds.code} in the ops DB)",
            # its own integrated model, its quality-gate decision, and the consent records it is filtered by (Art. 2):
            # the lineage of a product then shows its own inputs, not every agency's data (issue 14)
            deps=[dg.AssetKey(["gov", "intermediate", f"int_{ds.code}"]), gate_key(ds.code),
                  *([dg.AssetKey(["gov", "intermediate", f"int_{CONSENT_DATASET}"])]
                    if ds.consent is not None and CONSENT_DATASET in reg.datasets else [])],
            partitions_def=daily_partitions,
            metadata={"dagster/table_name": f"desensitized.{ds.code}"},
        )
        for ds in released
    ]
    check_specs = [
        spec
        for ds in released
        for spec in (
            dg.AssetCheckSpec("exclusions_respected", asset=desensitized_key(ds.code), blocking=True,
                              partitions_def=daily_partitions,
                              description="第二条排除项：不予开放未脱敏、涉密、未授权字段不得出域 (Art. 2 exclusions)"),
            dg.AssetCheckSpec("no_personal_data_leak", asset=desensitized_key(ds.code), blocking=True,
                              partitions_def=daily_partitions,
                              description="泄露闸门：运营平台不得出现原始身份证号、手机号、姓名 (leak gate)"),
        )
    ]

    @dg.multi_asset(name="boundary_crossing", specs=specs, check_specs=check_specs, partitions_def=daily_partitions,
                    pool=boundary_pool(), backfill_policy=nightly_backfill_policy())
    def boundary_crossing(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                          pseudonym: PseudonymKeyResource) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        """市政务大数据平台 → 运营服务平台的唯一出域操作：脱敏、场景授权字段、数据主体授权过滤。"""
        events = DayEvents(context, partition_days(context))
        last = events.days[-1]
        try:
            # one gov and one ops connection for all the days (closing the ops file checkpoints it: ~0.2 s a day);
            # gov is read-only under its pool, so its catalog is read once (frozen_catalog)
            with hold_pool(context, GOV_POOL), warehouse.gov(read_only=True) as gov, frozen_catalog(gov), \
                    warehouse.ops() as ops:
                # a range run crosses its days in order, each as a single-day run would have, each in its own ops
                # transaction: the consent of the range's later days is not yet in force for an earlier day (their
                # crossings apply it, revocations purging back)
                for d in events.days:
                    yield from cross_day(context, gov, ops, pseudonym.pseudonym_key(), reg, released, d, events,
                                         pending=None if d == last else (d + dt.timedelta(days=1), last))
        finally:  # also after a failed day: what the days before it committed is followed
            follow_purges(context, reg)
        yield from events.finish()

    return boundary_crossing


def cross_day(context: dg.AssetExecutionContext, gov: duckdb.DuckDBPyConnection, ops: duckdb.DuckDBPyConnection,
              key: PseudonymKey, reg: Registry, released: list, d: dt.date, events: DayEvents,
              pending: tuple[dt.date, dt.date] | None) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """One day's crossing (in its own ops transaction, on the step's connections), its materializations and its two
    checks per dataset; dg.Failure when its gate failed.
    When the crossing committed, the published snapshots owe its purges (`revocation.owe_purge`, in the operational
    DB) until `follow_purges` applied them."""
    from zqdata.publish import products_reading, published_store, withdraw_partition
    from zqdata.quality.scores import held_back_datasets

    def gate(gov_con, ops_con, registry_, day) -> GateResult:
        # run by cross_boundary on the uncommitted crossing, before COMMIT (write–audit–publish)
        return GateResult(exclusions={ds.code: check_exclusions(ops_con, registry_, ds.code, day) for ds in released},
                          leaks=find_leaks(gov_con, ops_con, day, registry_))

    failure: BoundaryGateFailed | None = None
    # the quality gate, per dataset, evaluated here from the gov findings (enforce, don't trust): the check on
    # gov/quality/scores is not blocking, so that one dataset's failure does not hold back the others
    held = held_back_datasets(gov, reg, d)
    try:
        report = cross_boundary(gov, ops, reg, d, key, strict=False, gate=gate, held_back=held,
                                pending_consent=pending)
    except BoundaryGateFailed as exc:  # rolled back: the ops DB is as it was before this run
        report, failure = exc.report, exc
    leaks, exclusions = report.gate.leaks, report.gate.exclusions
    for code, reason in report.blocked.items():
        context.log.error(f"场景 {code} 本分区未写入 (scenario blocked, nothing written): {reason}")
    for code, reason in report.held_back.items():
        context.log.warning(f"质量门禁留置 {code}：本分区不出域，已从运营平台移除 (held back, partition removed): {reason}")
    if failure is None and report.held_back:  # nothing built from a held-back dataset is served for the partition
        withdrawn = withdraw_partition(reg, d, products_reading(reg, report.held_back), published_store())
        if withdrawn:
            context.log.warning(f"撤回读取留置数据集的已发布产品 withdrawn: {', '.join(withdrawn)}")
    if failure is None:
        # the purge is committed: the published snapshots owe it (opdb) until `follow_purges` applied it
        owe_purge(report, context.run.run_id)
        for ds in released:
            per_scenario = {s: rows[ds.code] for s, rows in report.scenario_rows.items() if ds.code in rows}
            yield from events.materialize(d, desensitized_key(ds.code), {
                "dagster/row_count": report.released[ds.code],
                # "" when it crossed; else why the quality gate held it back (its partition is not on ops)
                "held_back": report.held_back.get(ds.code, ""),
                "gov_source": report.sources[ds.code],
                "scenario_rows": per_scenario,
                "consent_excluded": {s: n[ds.code] for s, n in report.consent_excluded.items() if ds.code in n},
                "blocked_scenarios": {s: r for s, r in report.blocked.items()
                                      if ds.code in reg.scenarios[s].authorized_fields},
                "purged_rows": dg.MetadataValue.json(
                    {t: n for t, n in report.purged.items() if t.split(".", 1)[-1] == ds.code}),
                "ended_scenarios": sorted(s for s in report.ended if ds.code in reg.scenarios[s].authorized_fields),
                "reference_day": str(report.reference_day),
                # which master key made this partition's pseudonyms (a public fingerprint): after a rotation,
                # partitions of the old key are the ones to re-run or withdraw (docs/security.md)
                "pseudonym_key_id": key.key_id(),
            })
    for ds in released:
        problems = exclusions.get(ds.code, [])
        yield from events.check(d, dg.AssetCheckResult(
            asset_key=desensitized_key(ds.code), check_name="exclusions_respected", passed=not problems,
            metadata={"problems": problems}))
        mine = [lk for lk in leaks if lk.table.split(".", 1)[1] == ds.code]
        yield from events.check(d, dg.AssetCheckResult(
            asset_key=desensitized_key(ds.code), check_name="no_personal_data_leak", passed=not mine, metadata={
                "leaks": [f"{lk.table}.{lk.column}: {lk.rows} {lk.kind} (e.g. {lk.sample})" for lk in mine],
                "leaks_elsewhere_in_ops": len(leaks) - len(mine)}))
    if failure is not None:  # the failed checks are recorded above; no materialization claims new data
        raise dg.Failure(description=("" if events.single else f"{d}: ") + str(failure),
                         metadata={"problems": report.gate.problems()[:50]})


def follow_purges(context: dg.AssetExecutionContext, reg: Registry) -> None:
    """The published snapshots follow the purges the step's crossings committed (derived without the purged rows, or
    withdrawn), once for all its days: a revoked subject is in every published day of a daily product, so each day
    of a range run re-derived every one of them again (issue 15: 30 × 117 snapshots a range after four months).
    What they owe is read from the operational DB (`revocation.owe_purge`): also the purges of an earlier step whose
    snapshot update failed (the store unavailable), which would otherwise keep a revoked subject published."""
    from zqdata.publish import published_store
    from zqdata.revocation import settle_owed_purges

    merged, published = settle_owed_purges(published_store(), reg, context.run.run_id)
    if merged is None:
        return
    if merged.purged or merged.ended or any(published.values()):
        context.log.warning(
            f"撤回授权/场景终止，已从全部分区清除 (consent revoked / scenario ended, purged from every "
            f"partition): rows {merged.purged}; ended {sorted(merged.ended)}; snapshots {published}")


def _product_checks(key: dg.AssetKey) -> list[dg.AssetChecksDefinition]:
    product = key.path[-1]

    @dg.asset_check(asset=key, name="no_personal_data_leak", blocking=True, pool=OPS_POOL, partitions_def=daily_partitions,
                    description="泄露闸门：产品表不得出现原始身份证号、手机号、姓名 (leak gate)")
    def leak_gate(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource):
        events = DayEvents(context, _partition_dates(context))
        with hold_pool(context, GOV_POOL), warehouse.gov(read_only=True) as gov, warehouse.ops(read_only=True) as ops:
            for d in events.days:  # a range run: each day's product partition, its evaluation against that day
                leaks = find_leaks(gov, ops, d, registry(), tables=[f"products.{product}"])
                yield from events.check(d, dg.AssetCheckResult(passed=not leaks, metadata={
                    "leaks": [f"{lk.column}: {lk.rows} {lk.kind} (e.g. {lk.sample})" for lk in leaks]}))
        yield from events.finish()

    @dg.asset_check(asset=key, name="authorization_in_force", blocking=True, partitions_def=daily_partitions,
                    description="一场景一授权：场景授权在该分区有效 (scenario authorization in force)")
    def authorization_in_force(context: dg.AssetCheckExecutionContext):
        events = DayEvents(context, _partition_dates(context))
        for d in events.days:
            yield from events.check(d, authorization_result(product, d))
        yield from events.finish()

    return [leak_gate, authorization_in_force]


def authorization_result(product: str, day: dt.date) -> dg.AssetCheckResult:
    """`authorization_in_force` of a product for one day."""
    try:
        scenario = check_product_authorized(registry(), product, day)
    except AuthorizationError as exc:
        return dg.AssetCheckResult(passed=False, metadata={"reason": str(exc)})
    return dg.AssetCheckResult(passed=True, metadata={"scenario": scenario.code})


def product_gate_checks(product_keys: Sequence[dg.AssetKey]) -> list[dg.AssetChecksDefinition]:
    """Blocking checks for ops product assets (`ops/products/<product>`): no raw personal data in the product table
    (leak gate) and the scenario's authorization covers the partition. Add them to the products' Definitions."""
    return [check for key in product_keys for check in _product_checks(key)]


def boundary_defs() -> dg.Definitions:
    """The boundary crossing and the pseudonymization key resource (from the environment).

    The ``warehouse: WarehouseResource`` it needs comes from the code location's shared resources.
    """
    return dg.Definitions(
        assets=[build_boundary_crossing(registry())],
        resources={"pseudonym": PseudonymKeyResource.from_env()},
    )


def product_gate_defs() -> dg.Definitions:
    """The blocking product gate checks on every registered scenario product (`ops/products/<scenario.product>`)."""
    keys = [dg.AssetKey(asset_keys.product(s.product)) for s in registry().scenarios.values()]
    return dg.Definitions(asset_checks=product_gate_checks(keys))
