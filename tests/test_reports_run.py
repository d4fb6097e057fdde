"""`zq history` runs the governance reports of the periods its days cover (orchestration.reports_run)."""

import datetime as dt

from orchestration.partitions import quarterly_partitions, yearly_partitions
from orchestration.reports_run import periods_within


def test_a_year_from_the_start_covers_2025_and_four_ended_quarters():
    start, end = dt.date(2025, 5, 1), dt.date(2026, 4, 30)
    assert periods_within(yearly_partitions, start, end) == ["2025"]
    assert periods_within(quarterly_partitions, start, end) == ["2025-04-01", "2025-07-01", "2025-10-01", "2026-01-01"]


def test_a_period_not_ended_by_the_last_day_is_not_reported():
    assert periods_within(quarterly_partitions, dt.date(2025, 5, 1), dt.date(2025, 6, 29)) == []
    assert periods_within(quarterly_partitions, dt.date(2025, 6, 29), dt.date(2025, 6, 30)) == ["2025-04-01"]
    assert periods_within(yearly_partitions, dt.date(2025, 5, 1), dt.date(2025, 12, 30)) == []
    assert periods_within(yearly_partitions, dt.date(2025, 12, 31), dt.date(2025, 12, 31)) == ["2025"]
