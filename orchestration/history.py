"""History dependencies made explicit (issue 17, finding 3): a day that changes marks every later day that read it
stale, and the stale days are recomputed.

Some outputs of day D read earlier days, not only D:
- ingestion of every dataset compares the day's files with the checksums of earlier deliveries (a file delivered again
  on a later day is a duplicate) — `gov/ods/ods_<dataset>` of D reads `gov/ods/ods_<dataset>` of days < D;
- the boundary crossing applies each subject's latest consent up to D — `ops/desensitized/*` of D reads
  `gov/ods/ods_subject_consent` of days < D;
- the credit profile takes each enterprise's latest social-insurance period up to D — `ops/products/<product>` of D reads
  the scenario's `ops/desensitized/desensitized_social_insurance` of days < D.

The event log says when each partition was last materialized (storage ids grow with time): day D of a reader is stale
when any earlier day of what it reads was materialized after it. Only the event log is read, so the same planner
serves the sensor (`history_staleness_sensor`, which requests nightly runs) and `zq nightly` (which recomputes the
stale days after the days it was asked for).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from zqdata import asset_keys


@dataclass(frozen=True)
class HistoryRead:
    """`reader` of day D reads `source` of the days before D (why: for the UI and the log)."""

    reader: dg.AssetKey
    source: dg.AssetKey
    why: str


def history_reads() -> list[HistoryRead]:
    """Every cross-day read of the pipeline, from the registry (which datasets, which scenario products)."""
    from zqdata.registry import registry

    reg = registry()
    reads = [HistoryRead(dg.AssetKey(asset_keys.ods(code)), dg.AssetKey(asset_keys.ods(code)),
                         "重复交付判定读取以往交付的校验和 duplicate files are judged against earlier deliveries")
             for code in reg.datasets]
    consent = dg.AssetKey(asset_keys.ods("subject_consent"))
    reads += [HistoryRead(dg.AssetKey(asset_keys.desensitized(ds.code)), consent,
                          "出域按截至当日的最新授权过滤 consent as of the day, from all earlier consent records")
              for ds in reg.datasets.values() if ds.release and ds.consent is not None]
    for s in reg.scenarios.values():
        if "social_insurance" in s.authorized_fields:
            reads.append(HistoryRead(dg.AssetKey(asset_keys.product(s.product)),
                                     dg.AssetKey(asset_keys.desensitized("social_insurance")),
                                     "产品取截至当日的最新社保缴费期 latest social-insurance period up to the day"))
    return reads


@dataclass(frozen=True)
class StaleDay:
    partition: str
    reader: dg.AssetKey
    changed_source: dg.AssetKey
    changed_partition: str
    storage_id: int  # the source materialization that made the day stale (run keys are built from it)


def stale_partitions(instance: dg.DagsterInstance, reads: Iterable[HistoryRead] | None = None) -> list[StaleDay]:
    """The days whose outputs read an earlier day that was materialized after them, earliest first (one entry per day:
    its first stale reader)."""
    from dagster._core.events import DagsterEventType

    mat = DagsterEventType.ASSET_MATERIALIZATION
    cache: dict[dg.AssetKey, dict[str, int]] = {}

    def latest(key: dg.AssetKey) -> dict[str, int]:
        if key not in cache:
            cache[key] = dict(instance.get_latest_storage_id_by_partition(key, mat))
        return cache[key]

    found: dict[str, StaleDay] = {}
    for read in reads if reads is not None else history_reads():
        readers, sources = latest(read.reader), sorted(latest(read.source).items())
        if not readers or not sources:
            continue
        # newest source materialization among the days strictly before each reader day: one pass over sorted days
        best: tuple[int, str] | None = None
        i = 0
        for day in sorted(readers):
            while i < len(sources) and sources[i][0] < day:
                if best is None or sources[i][1] > best[0]:
                    best = (sources[i][1], sources[i][0])
                i += 1
            if best is not None and best[0] > readers[day]:
                current = found.get(day)
                if current is None or best[0] > current.storage_id:
                    found[day] = StaleDay(day, read.reader, read.source, best[1], best[0])
    return [found[d] for d in sorted(found)]


def stale_run_requests(instance: dg.DagsterInstance, job_name: str) -> list[dg.RunRequest]:
    """One nightly run per stale day; the run key names the change, so a tick never asks twice for the same one."""
    return [dg.RunRequest(run_key=f"history:{s.partition}:{s.storage_id}", job_name=job_name, partition_key=s.partition,
                          tags={"zq/reason": f"history changed: {s.changed_source.to_user_string()} "
                                              f"{s.changed_partition}"})
            for s in stale_partitions(instance)]


def build_history_sensor() -> dg.SensorDefinition:
    from orchestration.jobs import NIGHTLY_JOB

    import os

    @dg.sensor(
        name="history_staleness_sensor",
        minimum_interval_seconds=int(os.environ.get("ZQ_HISTORY_SENSOR_INTERVAL_SECONDS") or 300),
        default_status=dg.DefaultSensorStatus.RUNNING,
        job_name=NIGHTLY_JOB,
        description=(
            "历史依赖：某日数据被重新交付或重跑后，读取该日的后续各日（重复交付判定、截至当日的授权、截至当日的社保）"
            "即为过期，本传感器为其请求重算。 Requests nightly runs for days that read an earlier day changed after them."
        ),
    )
    def history_staleness_sensor(context: dg.SensorEvaluationContext):
        busy = context.instance.get_runs_count(dg.RunsFilter(job_name=NIGHTLY_JOB, statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED]))
        if busy:  # a backfill in progress: judge history once its days are done, then recompute each stale day once
            return dg.SkipReason(f"{busy} 个每日运行未结束，稍后判断 nightly runs in progress")
        requests = stale_run_requests(context.instance, NIGHTLY_JOB)
        return requests or dg.SkipReason("没有过期的后续日 no later day is stale")

    return history_staleness_sensor


def describe(stale: list[StaleDay]) -> list[str]:
    return [f"{s.partition}: {s.reader.to_user_string()} 读取了之后变更的 {s.changed_source.to_user_string()} "
            f"{s.changed_partition} (reads an earlier day changed after it)" for s in stale]


def day(partition: str) -> dt.date:
    return dt.date.fromisoformat(partition)
