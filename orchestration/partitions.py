"""The one partitions definition: a day in Asia/Shanghai, from the day the measures took effect."""

import dagster as dg

from zqdata.settings import PARTITION_START

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, timezone="Asia/Shanghai")
