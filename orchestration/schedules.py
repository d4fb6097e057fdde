"""The nightly schedule: 02:00 Asia/Shanghai, for the day that just ended."""

import dagster as dg

from orchestration.jobs import nightly_aggregation

# A schedule built from a daily-partitioned job targets the last complete partition, i.e. yesterday
# in the partitions' timezone (Asia/Shanghai).
nightly_schedule = dg.build_schedule_from_partitioned_job(
    nightly_aggregation,
    hour_of_day=2,
    minute_of_hour=0,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    name="nightly_aggregation_0200",
    description="每天 02:00（北京时间）汇聚前一日的数据。Runs at 02:00 Asia/Shanghai for the previous day.",
)
