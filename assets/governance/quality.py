"""Thin Dagster wrappers around ``zqdata.quality``: findings and scores assets, the per-dataset gate, GX checks."""

import datetime as dt
import json

import dagster as dg

from assets.dbt_common import GOV_DBT_STEP
from orchestration.partitions import daily_partitions
from orchestration.pools import GOV_POOL
from orchestration.ranges import DayEvents, nightly_backfill_policy, partition_days
from orchestration.resources import WarehouseResource
from zqdata import asset_keys
from zqdata.quality.check_info import evaluation_metadata
from zqdata.registry import registry
from zqdata.settings import get_settings, repo_root

FINDINGS_KEY = dg.AssetKey(["gov", "quality", "findings"])
SCORES_KEY = dg.AssetKey(["gov", "quality", "scores"])
GATE_CHECK = "quality_gate"
GX_CHECK = "gx_dataset_expectations"
FINDINGS_STEP = "quality_findings"


def prefetch_gx_for_run(context) -> object | None:
    """When this run validates with Great Expectations after the calling step (its findings or GX check step is in
    the run), start importing GX in the background (`zqdata.quality.gx_runner.prefetch_gx`): the gov dbt step calls
    this before it waits for dbt, so a night's process pays GX's import (~2.7-4 s) while dbt works (issue 15).
    Returns the importing thread, or None."""
    from orchestration.runs import run_executes
    from zqdata.quality.gx_runner import prefetch_gx

    return prefetch_gx() if run_executes(context, FINDINGS_STEP, GX_CHECK) else None


def _dbt_manifest() -> dict | None:
    """The dbt manifest built by `make dbt-parse` / dagster-dbt; None when dbt has not been prepared."""
    path = repo_root() / "dbt_project" / "target" / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _findings_deps() -> list[dg.AssetKey]:
    reg = registry()
    keys = [dg.AssetKey(asset_keys.ods(code)) for code in reg.datasets]
    keys += [dg.AssetKey(["gov", "intermediate", f"int_{code}"]) for code in reg.datasets]
    return keys


def gate_key(dataset: str) -> dg.AssetKey:
    """The quality gate's decision for one dataset (a row of quality.gate_decisions per partition)."""
    return dg.AssetKey(["gov", "quality", f"gate_{dataset}"])


def gate_inputs(dataset: str) -> list[dg.AssetKey]:
    """What one dataset's gate decision is computed from: its own ODS and integrated model, and the enterprise
    registry where its rules check references against it (registry_reference / registry_district)."""
    from zqdata.reference import field_rules

    reg = registry()
    keys = [dg.AssetKey(asset_keys.ods(dataset)), dg.AssetKey(["gov", "intermediate", f"int_{dataset}"])]
    if {"registry_reference", "registry_district"} & {r.rule for r in field_rules(reg.datasets[dataset])}:
        keys.append(dg.AssetKey(["gov", "intermediate", "int_enterprise_registry"]))
    return keys


def build_findings_asset() -> dg.AssetsDefinition:
    reg = registry()
    findings = dg.AssetSpec(
        key=FINDINGS_KEY, group_name="governance", partitions_def=daily_partitions, deps=_findings_deps(),
        kinds={"duckdb", "great_expectations"},
        description=(
            "数据质量问题明细（Art. 20）：汇集交付时效/完整性（meta.deliveries + 登记时限）、dbt 行级规则、"
            "GX 数据集级期望的结果到 quality.findings，并发布 GX Data Docs。"
            "Quality findings of the partition from every tool, plus Data Docs."
        ),
    )
    gates = [dg.AssetSpec(
        key=gate_key(code), group_name="governance", partitions_def=daily_partitions, deps=gate_inputs(code),
        kinds={"duckdb"},
        description=(f"质量门禁决定「{ds.name}」：本分区是否出域到运营服务平台（错误级数据集规则、错误记录率、模型构建），"
                     f"quality.gate_decisions 中该数据集的一行 — the quality gate's decision for {ds.name_en}: "
                     "crosses to the operations platform or is held back."),
    ) for code, ds in sorted(reg.datasets.items())]

    # One step: the findings of every tool, then each dataset's gate decision from them. The gate assets depend on
    # their own dataset only, so a product's lineage shows its own inputs (issue 14), not every agency's data.
    @dg.multi_asset(name=FINDINGS_STEP, specs=[findings, *gates], partitions_def=daily_partitions, pool=GOV_POOL,
                    backfill_policy=nightly_backfill_policy())
    def quality_findings(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        from orchestration.ordering import wait_for_earlier_days
        from zqdata.quality.gx_runner import ephemeral_context, render_data_docs

        wait_for_earlier_days(context, FINDINGS_STEP)  # a backfill's days side by side: history in day order
        manifest = _dbt_manifest()
        if manifest is None:
            context.log.warning("未找到 dbt manifest（dbt_project/target/manifest.json），本次不汇集 dbt 规则结果")
        events = DayEvents(context, partition_days(context))
        gx_context, validations, out = ephemeral_context(), [], []
        with warehouse.gov() as con:  # one connection for the days (closing one checkpoints the file)
            for day in events.days:  # a range run: each day's findings and gate decisions, earliest first
                out += findings_of_day(context, con, manifest, day, events, gx_context, validations)
        # Data Docs once for the step's days (a range run rendered and published the whole site once a day), before
        # the events that link to its pages
        render_data_docs(validations, get_settings().docs_dir)
        # the sampled frames' Arrow memory, freed after each validation, back to the system for the steps after this
        # one in the run's process (pyarrow's allocator keeps freed pages: ~250 MB at 10 M rows, bench/notes.md 26)
        import pyarrow as pa
        pa.default_memory_pool().release_unused()
        yield from out
        yield from events.finish()

    return quality_findings


def findings_of_day(context: dg.AssetExecutionContext, con, manifest: dict | None, day: dt.date, events: DayEvents,
                    gx_context, validations: list) -> list:
    """The findings of every tool for one day (`con`: the gov DB), then each dataset's gate decision from them: the
    day's events. Its GX validations (in `gx_context`) are added to `validations`, for the step's Data Docs."""
    from zqdata.quality.gx_runner import data_docs_url
    from zqdata.quality.scores import collect_findings, evaluate_gate, record_gate_decisions

    summary = collect_findings(con, registry(), day, manifest, run_id=context.run.run_id,
                               dbt_collected=dbt_collected_in_run(context, events), gx_context=gx_context)
    gate = evaluate_gate(con, registry(), day)
    record_gate_decisions(con, registry(), gate)
    validations += summary.validations
    out = []
    for code in sorted(registry().datasets):
        out += events.materialize(day, gate_key(code), {
            "passed": code not in gate.held_back,
            "held_back": gate.held_back.get(code, ""),
            "error_rate": float(gate.error_rates.get(code, 0.0)),
            "max_error_rate": float(gate.max_error_rate),
        })
    out += events.materialize(day, FINDINGS_KEY, {
        "findings_by_tool": dg.MetadataValue.json(summary.by_tool),
        "deliveries": dg.MetadataValue.md(summary.delivery_markdown),
        "dbt_findings": summary.dbt_findings if summary.dbt_findings is not None else "未汇集 (no manifest)",
        "gx_failed_rules": dg.MetadataValue.json(summary.gx_failed),
        "gx_batches": dg.MetadataValue.json(summary.gx_notes),
        # a link the UI opens (served under `make ui`; a file:// URL otherwise)
        "data_docs": dg.MetadataValue.url(data_docs_url(base_url=get_settings().docs_base_url)),
    })
    return out


def dbt_collected_in_run(context: dg.AssetExecutionContext, events: DayEvents) -> bool:
    """The run's gov dbt step collected each day's dbt findings right after the day's build (`collected_with_build`:
    a range run, or days side by side on the lakes)."""
    from zqdata.quality.dbt_findings import collected_with_build

    steps = context.run.step_keys_to_execute
    return collected_with_build(events.single) and (steps is None or GOV_DBT_STEP in steps)


def build_scores_asset() -> dg.AssetsDefinition:
    @dg.asset(
        key=SCORES_KEY,
        group_name="governance",
        partitions_def=daily_partitions,
        backfill_policy=nightly_backfill_policy(),
        deps=[FINDINGS_KEY],
        pool=GOV_POOL,
        kinds={"duckdb"},
        # Not blocking (issue 12): a failed blocking check would skip the whole crossing, so one agency's bad delivery
        # would hold back every dataset. The gate decides per dataset; the check fails (ERROR) when any dataset is held
        # back, and the boundary crossing and the publish step enforce the decision per dataset themselves.
        check_specs=[dg.AssetCheckSpec(
            GATE_CHECK, asset=SCORES_KEY, blocking=False, partitions_def=daily_partitions,
            description="质量门禁（逐数据集）：错误级数据集规则失败或错误记录率超过 ZQ_QUALITY_MAX_ERROR_RATE 的数据集本分区留置"
                        "（不出域，读取它的产品不发布），其余数据集照常出域；警告不阻断。",
        )],
        description=(
            "数据质量评分（Art. 20 六个维度）：按分区日 × 数源机构 × 数据集 × 维度统计检查记录数、问题记录数、"
            "规则数、未通过规则数和通过率（quality.scores，逐日保留），及逐数据集的门禁决定（quality.gate_decisions）。"
            "出域到运营服务平台依赖本资产的质量门禁。"
        ),
    )
    def quality_scores(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        events = DayEvents(context, partition_days(context))
        with warehouse.gov() as con:  # one connection for the days (closing one checkpoints the file: ~95 ms a day)
            for day in events.days:  # a range run: each day's scores and gate check, earliest first
                yield from events.materialize(day, None, *scores_of_day(context, con, day))
        yield from events.finish()

    return quality_scores


def scores_of_day(context: dg.AssetExecutionContext, con, day: dt.date) -> tuple[dict, list[dg.AssetCheckResult]]:
    """One day's scores (the materialization's metadata) and its quality-gate check (`con`: the gov DB)."""
    from orchestration.sensors import trace_metadata
    from zqdata.publish import products_reading, withdraw_partition
    from zqdata.quality.scores import compute_scores, evaluate_gate, score_series, scores_markdown

    scores = compute_scores(con, registry(), day)
    gate = evaluate_gate(con, registry(), day)  # recorded per dataset by the findings step (gov/quality/gate_*)
    # 逐级溯源: a failed gate shows where its error-severity findings came from (agency, delivery, rows)
    trace = {} if gate.passed else trace_metadata(con, None, registry(), partition_date=day, severity="error")
    # A held-back dataset's deliveries changed and fail the gate: what was published from it came from data the
    # agency has since replaced, so the products reading it are withdrawn (the others stay); they are published
    # again when a delivery passes.
    affected = products_reading(registry(), gate.held_back)
    withdrawn = withdraw_partition(registry(), day, affected) if affected else []
    if gate.held_back:
        context.log.warning(f"质量门禁留置数据集 held back: {', '.join(sorted(gate.held_back))}；"
                            f"照常出域 passed: {', '.join(gate.passed_datasets)}")
    if withdrawn:
        context.log.warning(f"撤回读取留置数据集的已发布产品 withdrawn: {', '.join(withdrawn)}")
    return (
        {"scores": dg.MetadataValue.md(scores_markdown(scores)), "rows": scores.num_rows,
         # numbers of their own, so the UI plots each over the partitions (Asset → Plots)
         **{k: dg.MetadataValue.float(v) for k, v in score_series(scores).items()}},
        [dg.AssetCheckResult(
            check_name=GATE_CHECK,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=gate.description(),
            metadata={
                "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in gate.failures) or "无 (none)"),
                "max_error_rate": gate.max_error_rate,
                "error_rates": dg.MetadataValue.json({k: round(v, 6) for k, v in gate.error_rates.items()}),
                "warnings": gate.warnings,
                "held_back": dg.MetadataValue.json(gate.held_back),
                "passed_datasets": gate.passed_datasets,
                "products_not_published": sorted(affected),
                "withdrawn_products": withdrawn,
                **trace,
            },
        )],
    )


def build_gx_checks(datasets: list[str]) -> dg.AssetChecksDefinition:
    """The GX asset check of each dataset's staging model for the run's partition, all in ONE step (one gov
    connection; seven steps cost ~0.4 s of a 1,000-row night in step events and connections, bench/notes.md 18).
    Each stays its own check in the UI (`gx_dataset_expectations` on its staging model), selectable on its own.

    It runs after `gov/quality/findings` when both are in the run: that asset validated the same staging partition a
    moment before (quality.gx_results), so the check reports it instead of validating twice. Run alone, it validates.
    """
    from zqdata.quality.gx_runner import staging_model

    reg = registry()
    keys = {dg.AssetCheckKey(dg.AssetKey(["gov", "staging", staging_model(reg, d)]), GX_CHECK): d for d in datasets}
    specs = [dg.AssetCheckSpec(
        GX_CHECK, asset=key.asset_key, additional_deps=[FINDINGS_KEY], partitions_def=daily_partitions,
        description=f"GX 数据集级期望（字段集合、日交付量、主键唯一率、代码表占比、选填字段填充率、数值中位数，及读数相对"
                    f"近日中位数的合理性）：{key.asset_key.path[-1]}（{reg.datasets[d].agency}） — Great Expectations "
                    f"dataset-level expectations; 各期望的维度见 unexpected_counts (Art. 20 dimension per expectation)")
        for key, d in keys.items()]

    @dg.multi_asset_check(specs=specs, name=GX_CHECK, can_subset=True, pool=GOV_POOL,
                          description="GX 数据集级期望，每个数据集一项检查 (Great Expectations, one check per dataset)")
    def gx_checks(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource):
        events = DayEvents(context, partition_days(context))
        selected = [(key, d) for key, d in keys.items() if key in context.selected_asset_check_keys]
        results = []
        with warehouse.gov() as con:  # one connection for the datasets and days (opening one: ~20-40 ms)
            for key, dataset in selected:
                for day in events.days:  # a range run: each day's evaluation against its own partition
                    results.append((key, day, gx_result(context, con, dataset, day)))
        for key, day, result in results:
            yield from events.check(day, result._replace(asset_key=key.asset_key, check_name=key.name))
        yield from events.finish()

    return gx_checks


def gx_result(context: dg.AssetCheckExecutionContext, con, dataset: str, day: dt.date) -> dg.AssetCheckResult:
    """The GX check of one dataset and day (`con`: the gov DB): the findings step's validation of this run, else
    validated here."""
    from zqdata.quality.gx_runner import data_docs_url, stored_validation, validate_dataset

    from orchestration.sensors import trace_metadata

    v = (stored_validation(con, registry(), dataset, day, context.run.run_id)
         or validate_dataset(con, registry(), dataset, day))
    trace = {} if v.success else trace_metadata(con, None, registry(), partition_date=day, dataset=dataset)
    errors = [o for o in v.failed if o.severity == "error"]
    failed_rows = max((o.unexpected_count or 0 for o in v.failed), default=0)
    worst = (errors or v.failed or [None])[0]
    return dg.AssetCheckResult(
        passed=v.success,
        severity=dg.AssetCheckSeverity.ERROR if errors or not v.present else dg.AssetCheckSeverity.WARN,
        description=v.note if v.success else "未通过的期望：" + "；".join(o.rule for o in v.failed) or v.note,
        metadata={
            "batch": v.note,
            "rows_in_partition": v.day_rows,
            "agency": registry().datasets[dataset].agency,
            # rule, dimension and severity of the first failed expectation (error first; each in unexpected_counts)
            **evaluation_metadata(
                {"dimension": worst.dimension, "severity": worst.severity, "rule": worst.rule} if worst else {},
                registry().datasets[dataset].agency, v.day_rows, failed_rows if v.day_rows is not None else None),
            "validated_by": ("gov/quality/findings（同一运行 same run）" if v.validated_by_run else "本检查 this check"),
            "data_docs": dg.MetadataValue.url(data_docs_url(dataset=dataset, day=day,
                                                            base_url=get_settings().docs_base_url)),
            "unexpected_counts": dg.MetadataValue.json(
                {o.rule: {"dimension": o.dimension, "severity": o.severity,
                          "unexpected_count": o.unexpected_count, "element_count": o.element_count,
                          "observed": o.observed, "success": o.success} for o in v.outcomes}),
            **trace,
        },
    )


def quality_defs() -> dg.Definitions:
    return dg.Definitions(
        assets=[build_findings_asset(), build_scores_asset()],
        asset_checks=[build_gx_checks(list(registry().datasets))],
    )
