"""Days of one backfill that run side by side (lake mode, issue 16) still judge history in day order.

A day's GX suite compares it with the days before it (baselines of row counts and medians, each meter's ratio to its
own recent history: zqdata/quality/gx_runner.py). Night by night those days are done. In a backfill whose days run at
once on several workers they may not be: the distributed equality test found day 3 validated against one earlier day
instead of two ("前 1 日" vs "前 2 日"), so its results depended on which worker was faster.

So the findings step of a day, which runs GX, waits while a run of the same backfill for an EARLIER day has not yet
finished its own findings step. It waits without holding a worker or a pool slot: `RetryRequested` ends the attempt and
the executor starts it again later. A day that is not part of a backfill, or whose earlier days are done, failed or
canceled, goes ahead at once; an embedded backfill is one run over the range (orchestration/ranges.py) and never waits.
"""

from __future__ import annotations

import dagster as dg

from orchestration.ranges import RANGE_START_TAG

BACKFILL_TAG = "dagster/backfill"
PARTITION_TAG = "dagster/partition"
IN_FLIGHT = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED)
WAIT_SECONDS = 10  # between two looks (the step ends its attempt meanwhile)
WAIT_ATTEMPTS = 720  # two hours of waiting at most; then the step fails and says why


def first_day(tags: dict[str, str]) -> str | None:
    """The first day a run covers (ISO), from its partition or range tags."""
    return tags.get(PARTITION_TAG) or tags.get(RANGE_START_TAG)


def earlier_days_pending(instance: dg.DagsterInstance, run: dg.DagsterRun, step_key: str) -> list[str]:
    """Days before this run's, of runs of the same backfill still in flight whose ``step_key`` has not succeeded."""
    backfill, mine = run.tags.get(BACKFILL_TAG), first_day(run.tags)
    if not backfill or not mine:
        return []
    pending = []
    for other in instance.get_runs(dg.RunsFilter(tags={BACKFILL_TAG: backfill}, statuses=list(IN_FLIGHT))):
        day = first_day(other.tags)
        if other.run_id == run.run_id or day is None or day >= mine:
            continue
        done = any(r.dagster_event is not None and r.dagster_event.step_key == step_key
                   for r in instance.all_logs(other.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS))
        if not done:
            pending.append(day)
    return sorted(set(pending))


def wait_for_earlier_days(context: dg.AssetExecutionContext, step_key: str) -> None:
    """Raise `RetryRequested` while `earlier_days_pending`; log what it waits for."""
    pending = earlier_days_pending(context.instance, context.run, step_key)
    if not pending:
        return
    context.log.info(f"等待同一回填中较早日期 {', '.join(pending)} 的{step_key}完成（历史基线按日期顺序判断）"
                     f" — waiting for the earlier days of this backfill: history is judged in day order")
    raise dg.RetryRequested(max_retries=WAIT_ATTEMPTS, seconds_to_wait=WAIT_SECONDS)
