"""Jobs. The nightly job covers the whole path for one day's partition."""

import dagster as dg

from orchestration.partitions import daily_partitions

# In-process: both DuckDB files allow one writer at a time, so steps run one after another
# (STYLE.md: serialize writers instead of retrying lock errors).
nightly_aggregation = dg.define_asset_job(
    name="nightly_aggregation",
    selection=dg.AssetSelection.all(include_sources=False),
    partitions_def=daily_partitions,
    executor_def=dg.in_process_executor,
    description=(
        "每日汇聚作业：数源机构交付 → 市政务大数据平台（ODS、标准化、整合、质量检查）→ 脱敏出域 → "
        "市公共数据资源运营服务平台（场景数据产品）。Nightly aggregation for one day's partition."
    ),
)
