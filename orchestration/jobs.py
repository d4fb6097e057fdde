"""Jobs. The nightly job covers the whole path for one day's partition."""

import dagster as dg

from orchestration.executors import nightly_executor, nightly_retry_policy
from orchestration.partitions import REPORTS_GROUP, daily_partitions

# In-process (embedded default): steps of one night run one after another; across runs, every step that opens a
# warehouse file holds that file's concurrency pool (orchestration/pools.py), so concurrent runs queue instead of
# fighting for DuckDB's lock. ZQ_EXECUTOR=celery: steps on Celery workers, one queue per domain
# (orchestration/executors.py).
NIGHTLY_JOB = "nightly_aggregation"

# Notification delivery is its own small job (requested by the alert sensor; `zq nightly` runs it after the night).
nightly_aggregation = dg.define_asset_job(
    name=NIGHTLY_JOB,
    # the governance reports (registration, disclosure, evaluation, quarterly) have partitions of their own and jobs
    selection=(dg.AssetSelection.all() - dg.AssetSelection.assets(dg.AssetKey(["gov", "quality", "notifications"]))
               - dg.AssetSelection.groups(REPORTS_GROUP)),
    executor_def=nightly_executor(),  # in-process, or Celery workers per domain with ZQ_EXECUTOR=celery
    op_retry_policy=nightly_retry_policy(),  # none embedded; a step that lost a DuckLake commit race runs again
    description=(
        "每日汇聚作业：数源机构交付 → 市政务大数据平台（ODS、标准化、整合、质量检查）→ 脱敏出域 → "
        "市公共数据资源运营服务平台（场景数据产品）。Nightly aggregation for one day's partition."
    ),
)
