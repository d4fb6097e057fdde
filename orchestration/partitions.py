"""The partitions definitions, one each: a day in Asia/Shanghai from the day the measures took effect (the data path),
and the reporting periods of the governance reports — the calendar year (key "2025") and the quarter (key the quarter's
first day, "2025-04-01"). A period's partition exists once it has ended."""

import dagster as dg

from zqdata.settings import PARTITION_START

TZ_NAME = "Asia/Shanghai"
REPORTS_GROUP = "governance_reports"  # the report assets: partitions of their own, outside the nightly job

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, timezone=TZ_NAME)
yearly_partitions = dg.TimeWindowPartitionsDefinition(cron_schedule="0 0 1 1 *", fmt="%Y", start="2025",
                                                      timezone=TZ_NAME)
quarterly_partitions = dg.TimeWindowPartitionsDefinition(cron_schedule="0 0 1 */3 *", fmt="%Y-%m-%d",
                                                         start="2025-04-01", timezone=TZ_NAME)
