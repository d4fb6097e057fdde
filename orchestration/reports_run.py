"""Materialize the governance reports of the periods inside a stretch of days (used by `zq history`)."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from orchestration.partitions import quarterly_partitions, yearly_partitions


def periods_within(partitions: dg.TimeWindowPartitionsDefinition, start: dt.date, end: dt.date) -> list[str]:
    """Keys of the periods that overlap the days [start, end] and have ended by the end of ``end`` (a period the days
    cover only in part is reported too: with what there is)."""
    until = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
    keys = []
    for key in partitions.get_partition_keys(current_time=until + dt.timedelta(days=1)):
        window = partitions.time_window_for_partition_key(key)
        if window.end.date() <= end + dt.timedelta(days=1) and window.end.date() > start:
            keys.append(key)
    return keys


def run_reports(instance: dg.DagsterInstance, start: dt.date, end: dt.date) -> list[str]:
    """Run each report job for every period that ended within [start, end], and the compliance matrix; one line each."""
    from assets.governance.registration import DISCLOSURE_JOB
    from assets.governance.reports import COMPLIANCE_JOB, EVALUATION_JOB, QUARTERLY_JOB
    from orchestration.definitions import defs
    from orchestration.runs import process_tags

    location, lines = defs(), []
    plan = [(EVALUATION_JOB, periods_within(yearly_partitions, start, end)),
            (DISCLOSURE_JOB, periods_within(yearly_partitions, start, end)),
            (QUARTERLY_JOB, periods_within(quarterly_partitions, start, end)),
            (COMPLIANCE_JOB, [None])]
    for job_name, keys in plan:
        for key in keys:
            result = location.resolve_job_def(job_name).execute_in_process(
                partition_key=key, instance=instance, raise_on_error=False, tags=process_tags(),
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})  # the event log keeps all
            lines.append(f"报告 report {job_name}{' ' + key if key else ''}: "
                         f"{'成功 success' if result.success else '失败 FAILED（见 Dagster 事件日志 see the event log）'}")
    return lines
