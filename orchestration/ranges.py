"""Range runs (issue 15): one run over a stretch of daily partitions instead of one run per day.

Every nightly asset has `BackfillPolicy.single_run()`; a run of the range [a, b] gives each step the partition key
range, and the step processes its days in ascending order (`partition_days`), each day exactly as a single-day run
would. What a single-day run records directly, a range step records per day through `DayEvents`:

- a materialization per day with that day's metadata (`context.add_asset_metadata(..., partition_key=day)`; the one
  output of the asset then becomes one materialization per partition of the range, each with its own metadata);
- a check evaluation per day against its own partition (`AssetCheckEvaluation(partition=day)`), and the check's output
  once, so that steps downstream of a blocking check still wait for it.

A single-day run (the schedule, `zq nightly`) takes the unchanged path: `DayEvents.single` is True and the events are
the ones the step yielded before range runs existed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dagster as dg

def nightly_backfill_policy() -> dg.BackfillPolicy:
    """How a backfill of the nightly assets is cut into runs, by the warehouse mode (environment only).

    Embedded (two DuckDB files, one writing process each): one run over the whole range, whose fixed costs are paid
    once. DuckLake (`ZQ_WAREHOUSE=ducklake`, issue 16: several writers per domain): one run per day, so the workers run
    the days side by side."""
    from zqdata.lakes import warehouse_mode

    return dg.BackfillPolicy.single_run() if warehouse_mode() == "duckdb" else dg.BackfillPolicy.multi_run(1)


RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def partition_days(context: Any) -> list[dt.date]:
    """The days of the step's partition(s), earliest first (one day in a single-day run)."""
    if getattr(context, "has_partition_key", False) and not _is_range(context):
        return [dt.date.fromisoformat(context.partition_key)]
    return sorted(dt.date.fromisoformat(k) for k in context.partition_keys)


def _is_range(context: Any) -> bool:
    tags = context.run.tags
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    return bool(start and end and start != end)


def range_tags(start: dt.date, end: dt.date) -> dict[str, str]:
    """The run tags of a range run over [start, end] (what Dagster's single-run backfills set)."""
    return {RANGE_START_TAG: start.isoformat(), RANGE_END_TAG: end.isoformat()}


class DayEvents:
    """What a step yields for its days: in a single-day run the results themselves; in a range run per-day metadata
    and per-day check evaluations, then one output per materialized asset and per evaluated check (`finish`)."""

    def __init__(self, context: Any, days: list[dt.date]) -> None:
        self.context = context
        self.days = days
        self.single = len(days) == 1 and not _is_range(context)
        self._assets: list[dg.AssetKey] = []
        self._checks: list[dg.AssetCheckKey] = []

    @property
    def _assets_def(self) -> dg.AssetsDefinition:
        ctx = getattr(self.context, "op_execution_context", self.context)
        return ctx.assets_def

    def materialize(self, day: dt.date, asset_key: dg.AssetKey | None = None,
                    metadata: dict[str, Any] | None = None,
                    check_results: Iterable[dg.AssetCheckResult] = ()) -> Iterator[Any]:
        """The day's materialization of `asset_key` (None: the step's only asset) with its checks."""
        checks = list(check_results)
        if self.single:
            yield dg.MaterializeResult(asset_key=asset_key, metadata=metadata, check_results=checks or None)
            return
        key = asset_key or self._assets_def.key
        if metadata:
            self.context.add_asset_metadata(metadata, asset_key=key, partition_key=day.isoformat())
        if key not in self._assets:
            self._assets.append(key)
        for result in checks:
            yield from self.check(day, result, asset_key=key)

    def materialize_day_only(self, day: dt.date, asset_key: dg.AssetKey, metadata: dict[str, Any]) -> Iterator[Any]:
        """A materialization of the day alone, for a skippable asset some days of a range do not materialize (the
        output would record every day of the range): in a range run an AssetMaterialization of the day's partition."""
        if self.single:
            yield dg.MaterializeResult(asset_key=asset_key, metadata=metadata)
        else:
            yield dg.AssetMaterialization(asset_key=asset_key, partition=day.isoformat(), metadata=metadata)

    def check(self, day: dt.date, result: dg.AssetCheckResult, asset_key: dg.AssetKey | None = None) -> Iterator[Any]:
        """The day's evaluation of a check, recorded against the day's partition."""
        if self.single:
            yield result
            return
        ad = self._assets_def
        key = dg.AssetCheckKey(result.asset_key or asset_key or _only_check_asset(ad, result.check_name),
                               result.check_name or _only_check_name(ad))
        spec = ad.get_spec_for_check_key(key)
        yield dg.AssetCheckEvaluation(asset_key=key.asset_key, check_name=key.name, passed=result.passed,
                                      metadata=result.metadata or {}, severity=result.severity,
                                      description=result.description, blocking=spec.blocking,
                                      partition=day.isoformat())
        if key not in self._checks:
            self._checks.append(key)

    def output_materialized(self, asset_key: dg.AssetKey) -> None:
        """An asset materialized by events of its own in this step (dbt): its output is yielded by `finish`."""
        if not self.single and asset_key not in self._assets:
            self._assets.append(asset_key)

    def forget(self, asset_key: dg.AssetKey) -> None:
        """Range run: no output for `asset_key` and its checks after all (an asset the step stopped materializing part
        way through the range: its days so far keep their metadata and check evaluations, but the output would record
        every day of the range)."""
        self._assets = [k for k in self._assets if k != asset_key]
        self._checks = [k for k in self._checks if k.asset_key != asset_key]

    def finish(self) -> Iterator[Any]:
        """Range run: the outputs of what was materialized and checked (one materialization per partition each)."""
        if self.single:
            return
        ad = self._assets_def
        for key in self._assets:
            yield dg.MaterializeResult(asset_key=key)
        for key in self._checks:
            if key in ad.check_keys:
                yield dg.Output(None, output_name=ad.get_output_name_for_asset_check_key(key))


def _only_check_asset(ad: dg.AssetsDefinition, check_name: str | None) -> dg.AssetKey:
    keys = {k.asset_key for k in ad.check_keys if check_name is None or k.name == check_name}
    if len(keys) != 1:
        raise dg.DagsterInvariantViolationError(f"check {check_name!r}: asset key needed ({len(keys)} candidates)")
    return keys.pop()


def _only_check_name(ad: dg.AssetsDefinition) -> str:
    names = {k.name for k in ad.check_keys}
    if len(names) != 1:
        raise dg.DagsterInvariantViolationError("check name needed: the step has several checks")
    return names.pop()


RANGE_ROWS = 10_000_000  # rows per range run: the volume one night is designed for (10 M rows a day on 2 cores)


def range_days_for(rows_per_day: int, days: int) -> int:
    """Days per range run of a backfill of ``days`` days at ``rows_per_day``: as many as hold `RANGE_ROWS` rows, at
    most all of them. A run's fixed cost (its dbt builds, the steps' start, about a minute) is paid once per range, so
    a year of 20,000-row days is one run; at 1 M rows a day a range is 10 days, as heavy as one 10 M night."""
    return max(1, min(days, RANGE_ROWS // max(1, rows_per_day)))


def run_halving(first: dt.date, last: dt.date, run_range: Callable[[dt.date, dt.date], list],
                run_day: Callable[[dt.date], Any], ok: Callable[[Any], bool], on_split: Callable[..., None] = print
                ) -> list:
    """The days [first, last] as one range run (`run_range`, a summary per day); when it fails, each half again the
    same way, down to single-day runs (`run_day`). One bad day in a year costs about two dozen runs of shrinking
    ranges, not 365 single-day runs, and ends alone in its own run as a day-by-day backfill would leave it; every
    other day is run again whole (a partition re-run gives the same result)."""
    if first == last:
        return [run_day(first)]
    summaries = run_range(first, last)
    if all(ok(s) for s in summaries):
        return summaries
    mid = first + dt.timedelta(days=(last - first).days // 2)
    on_split(f"范围运行失败，分两半重跑 range run failed, its halves again: {first} … {mid} | "
             f"{mid + dt.timedelta(days=1)} … {last}")
    return (run_halving(first, mid, run_range, run_day, ok, on_split)
            + run_halving(mid + dt.timedelta(days=1), last, run_range, run_day, ok, on_split))


def chunks(start: dt.date, days: int, size: int) -> list[tuple[dt.date, dt.date]]:
    """[start, start + days) in consecutive ranges of at most `size` days."""
    out = []
    for i in range(0, days, size):
        first = start + dt.timedelta(days=i)
        out.append((first, start + dt.timedelta(days=min(i + size, days) - 1)))
    return out
