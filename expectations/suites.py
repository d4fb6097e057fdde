"""Dataset-level expectations per staging model, built from the registry and the previous days' profile.

Row-level rules (check digits, code membership per row, ranges per row, formats, duplicates per key) live in dbt
SQL; these suites only test rates and distributions of the whole partition, so no rule is written twice.
Every expectation carries ``meta`` {dimension, severity, rule}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import great_expectations as gx

from zqdata.registry import Dataset, Registry

# The batch the runner builds: registry fields, the lineage id, the primary key joined by '|' and the day's row count.
LINEAGE_COLUMNS = ("_lineage_id",)
PK_COLUMN = "_pk"
DAY_ROWS_COLUMN = "_day_rows"
CODE_TABLE_MIN_SHARE = 0.95  # a partition-wide share below this means a code table changed at the source
KEY_MIN_UNIQUE_SHARE = 0.99
VOLUME_BAND = (0.5, 2.0)  # of the median daily volume of the previous days
MEDIAN_BAND = (0.5, 2.0)
NONNULL_BAND = 0.15
# Plausibility against the entity's own recent history (issue 12): the day's reading over the same entity's median of
# the previous HISTORY_DAYS days (computed in DuckDB when the batch is loaded, gx_runner.load_batch). Every reading must
# lie within the band: at the default defect rate a ×100 reading is a fraction of a percent of the batch, so a `mostly`
# tolerance would hide it; the 20× band is the tolerance (a meter's ordinary day-to-day swing is well inside it).
HISTORY_DAYS = 7
HISTORY_RATIO_BAND = (0.0, 20.0)
HISTORY_MOSTLY = 1.0


@dataclass(frozen=True)
class Baseline:
    """Medians over the previous days' profiles; ``days == 0`` when there is no history yet."""

    days: int = 0
    rows: float | None = None
    nonnull: dict[str, float] = field(default_factory=dict)
    median: dict[str, float] = field(default_factory=dict)


def history_plausibility(ds: Dataset) -> tuple[list[str], list[str]]:
    """(entity columns, numeric fields) of a dataset of daily readings per entity, else ([], []).

    A daily reading: the primary key is the entity plus the event date (electricity/water: meter_id + reading_date);
    the checked fields are its ranged numeric fields. The entity is the metered one (the meter, not the enterprise,
    which may have several meters of very different size)."""
    ev = ds.event_time_field
    if not ev or ev not in ds.primary_key or ds.field(ev).type != "date":
        return [], []
    entity = [k for k in ds.primary_key if k != ev]
    fields = [f.name for f in ds.fields
              if f.range is not None and f.type in ("integer", "decimal") and f.name not in ds.primary_key]
    return (entity, fields) if entity and fields else ([], [])


def history_ratio_column(field_name: str) -> str:
    """Batch column: the day's value over the entity's median of the previous days (NULL without history)."""
    return f"_{field_name}_history_ratio"


def suite_name(dataset: str) -> str:
    return f"zq_{dataset}"


def _meta(dimension: str, severity: str, rule: str, note: str) -> dict:
    return {"dimension": dimension, "severity": severity, "rule": rule, "notes": note}


def build_suite(registry: Registry, dataset: str, baseline: Baseline | None = None,
                partition_rows: int | None = None) -> gx.ExpectationSuite:
    """The suite for one dataset's staging batch; bounds come from the registry and the baseline.

    An empty partition (``partition_rows == 0``, e.g. a missing delivery) gets the table-level expectations only:
    rates and medians of nothing would only repeat the delivery finding as noise.
    """
    ds: Dataset = registry.datasets[dataset]
    base = baseline or Baseline()
    ex = gx.expectations
    items: list = [
        ex.ExpectTableColumnsToMatchSet(
            column_set=[*ds.field_names, *LINEAGE_COLUMNS, PK_COLUMN, DAY_ROWS_COLUMN,
                        *map(history_ratio_column, history_plausibility(ds)[1])], exact_match=True,
            meta=_meta("understandability", "error", f"gx.{dataset}.columns_match_registry",
                       "标准化模型的字段集合与登记目录一致 (columns equal the registry)")),
    ]
    lo = max(1, int(base.rows * VOLUME_BAND[0])) if base.rows else 1
    hi = int(base.rows * VOLUME_BAND[1]) + 1 if base.rows else None
    items.append(ex.ExpectColumnMinToBeBetween(
        column=DAY_ROWS_COLUMN, min_value=lo, max_value=hi,
        meta=_meta("completeness", "warn", f"gx.{dataset}.daily_volume",
                   f"当日记录数在前 {base.days} 日中位数的 {VOLUME_BAND[0]}–{VOLUME_BAND[1]} 倍之间 (daily volume)")))
    if partition_rows == 0:
        return gx.ExpectationSuite(name=suite_name(dataset), expectations=items,
                                   meta={"dataset": dataset, "agency": ds.agency, "baseline_days": base.days})
    items.append(ex.ExpectColumnProportionOfUniqueValuesToBeBetween(
        column=PK_COLUMN, min_value=KEY_MIN_UNIQUE_SHARE, max_value=1.0,
        meta=_meta("consistency", "warn", f"gx.{dataset}.key_unique_share",
                   f"主键 {'+'.join(ds.primary_key)} 唯一值占比 ≥ {KEY_MIN_UNIQUE_SHARE:.0%} (key uniqueness rate)")))
    for f in ds.fields:
        if not f.required:
            if f.name in base.nonnull:
                p = base.nonnull[f.name]
                lo_p, hi_p = max(0.0, p - NONNULL_BAND), min(1.0, p + NONNULL_BAND)
            else:
                lo_p, hi_p = 0.0, 1.0
            items.append(ex.ExpectColumnProportionOfNonNullValuesToBeBetween(
                column=f.name, min_value=round(lo_p, 4), max_value=round(hi_p, 4),
                meta=_meta("completeness", "warn", f"gx.{dataset}.{f.name}.fill_rate",
                           f"选填字段 {f.cn_name} 的填充率与前几日相比变化不超过 {NONNULL_BAND:.0%} (optional fill rate)")))
        if f.code_table:
            items.append(ex.ExpectColumnValuesToBeInSet(
                column=f.name, value_set=sorted(registry.code_tables[f.code_table]), mostly=CODE_TABLE_MIN_SHARE,
                meta=_meta("understandability", "warn", f"gx.{dataset}.{f.name}.code_table_share",
                           f"{f.cn_name} 在代码表 {f.code_table} 内的记录占比 ≥ {CODE_TABLE_MIN_SHARE:.0%} (code table rate)")))
        if f.range is not None and f.type in ("integer", "decimal"):
            if f.name in base.median:
                m = base.median[f.name]
                lo_m, hi_m = sorted((m * MEDIAN_BAND[0], m * MEDIAN_BAND[1]))
            else:
                lo_m, hi_m = f.range.min, f.range.max
            items.append(ex.ExpectColumnMedianToBeBetween(
                column=f.name, min_value=lo_m, max_value=hi_m,
                meta=_meta("accuracy", "warn", f"gx.{dataset}.{f.name}.median_plausible",
                           f"{f.cn_name} 中位数在合理区间（前几日中位数的 {MEDIAN_BAND[0]}–{MEDIAN_BAND[1]} 倍，无历史时为登记范围）")))
    entity, history_fields = history_plausibility(ds)
    for name in history_fields:
        f = ds.field(name)
        items.append(ex.ExpectColumnValuesToBeBetween(
            column=history_ratio_column(name), min_value=HISTORY_RATIO_BAND[0], max_value=HISTORY_RATIO_BAND[1],
            mostly=HISTORY_MOSTLY,
            meta=_meta("accuracy", "warn", f"gx.{dataset}.{name}.history_plausible",
                       f"{f.cn_name} 与同一{'+'.join(entity)}前 {HISTORY_DAYS} 日中位数之比在 "
                       f"{HISTORY_RATIO_BAND[0]:g}–{HISTORY_RATIO_BAND[1]:g} 倍之间（无历史不判断）"
                       f" (plausible against the entity's own recent history)")))
    return gx.ExpectationSuite(name=suite_name(dataset), expectations=items,
                               meta={"dataset": dataset, "agency": ds.agency, "baseline_days": base.days})
