"""Measure the nightly job per stage: step windows from the Dagster event log, memory from an RSS sampler.

Run as a child process per measurement (``python -m bench.stages ...``) so each size has its own peak memory;
the deliveries must already be in the landing zone (the landing step then only observes them: ``ZQ_SIMULATE=0``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.memory import RssSampler, high_water_mb

STAGES = ("landing", "ingest", "dbt", "checks", "boundary", "products", "alerting")


def stage_of_step(step_key: str) -> str:
    """The benchmark stage of a step of `nightly_aggregation` (op names from the asset definitions)."""
    if step_key == "source_agency_deliveries" or step_key.startswith("landing__"):
        return "landing"
    if step_key.startswith("gov__ods__"):
        return "ingest"
    if step_key == "gov_dbt_models":
        return "dbt"
    if step_key == "gov__quality__issues":
        return "alerting"  # filing the issues and queueing the agencies' messages (delivery is its own small run)
    if (step_key == "quality_findings"  # findings and the per-dataset gate decisions (gov/quality/gate_<dataset>)
            or step_key.startswith("gov__quality__") or step_key.endswith("gx_dataset_expectations")):
        return "checks"
    if step_key == "boundary_crossing" or step_key.startswith("ops__desensitized__"):
        return "boundary"
    if step_key == "ops_dbt_products" or step_key.startswith(("publish_", "ops__products__")):
        return "products"
    return "other"


@dataclass
class StepWindow:
    step: str
    stage: str
    start: float
    end: float
    status: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


def step_windows(instance, run_id: str) -> tuple[list[StepWindow], float, float]:
    """Every step's (start, end) from the run's event log, and the run's own start and end (epoch seconds)."""
    import dagster as dg

    types = {
        dg.DagsterEventType.RUN_START, dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE,
        dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.STEP_SKIPPED,
    }  # fmt: skip
    entries = instance.all_logs(run_id, of_type=types)
    starts: dict[str, float] = {}
    windows: list[StepWindow] = []
    run_start = run_end = None
    for e in entries:
        kind = e.dagster_event.event_type
        if kind == dg.DagsterEventType.RUN_START:
            run_start = e.timestamp
        elif kind in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE):
            run_end = e.timestamp
        elif kind == dg.DagsterEventType.STEP_START:
            starts[e.step_key] = e.timestamp
        elif e.step_key in starts:
            status = {dg.DagsterEventType.STEP_SUCCESS: "success", dg.DagsterEventType.STEP_FAILURE: "failure"}.get(
                kind, "skipped")
            windows.append(StepWindow(e.step_key, stage_of_step(e.step_key), starts.pop(e.step_key), e.timestamp, status))
        elif kind == dg.DagsterEventType.STEP_SKIPPED:
            windows.append(StepWindow(e.step_key, stage_of_step(e.step_key), e.timestamp, e.timestamp, "skipped"))
    first = min((w.start for w in windows), default=0.0)
    last = max((w.end for w in windows), default=0.0)
    return windows, run_start or first, run_end or last


@dataclass
class DayResult:
    partition: str
    rows: int
    success: bool
    job_seconds: float
    stages: dict[str, dict] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    failed_checks: list[str] = field(default_factory=list)
    stage_rows: dict[str, int] = field(default_factory=dict)


def summarize_stages(windows: list[StepWindow], sampler: RssSampler | None, rows: int,
                     extra: dict[str, tuple[float, float]] | None = None) -> dict[str, dict]:
    """Per stage: wall seconds (sum of its steps; steps run one at a time), rows per second, peak RSS in its windows."""
    out: dict[str, dict] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for w in windows:
        spans.setdefault(w.stage, []).append((w.start, w.end))
    for name, (a, b) in (extra or {}).items():
        spans.setdefault(name, []).append((a, b))
    for stage in [*STAGES, "other"]:
        if stage not in spans:
            continue
        secs = sum(b - a for a, b in spans[stage])
        peak = {"peak_rss_mb": 0.0, "peak_self_mb": 0.0, "peak_children_mb": 0.0}
        if sampler is not None:
            for a, b in spans[stage]:
                p = sampler.peak(a, b)
                peak = {k: max(peak[k], p[k]) for k in peak}
        out[stage] = {"seconds": round(secs, 3), "rows_per_s": round(rows / secs) if secs > 0 else None, **peak}
    return out


def run_days(first: dt.date, days: int, rows: int) -> list[DayResult]:
    """Run the nightly job for ``days`` consecutive partitions in this process and measure each."""
    import dagster as dg

    from orchestration.nightly import run_nightly

    instance = dg.DagsterInstance.get()
    sampler = RssSampler()
    sampler.start()
    results: list[DayResult] = []
    try:
        for i in range(days):
            day = first + dt.timedelta(days=i)
            result, summary = run_nightly(day, instance)
            windows, run_start, run_end = step_windows(instance, result.run_id)
            res = DayResult(
                partition=day.isoformat(), rows=rows, success=summary.success, job_seconds=round(run_end - run_start, 3),
                stages=summarize_stages(windows, sampler, rows),
                steps=[{"step": w.step, "stage": w.stage, "seconds": round(w.seconds, 3), "status": w.status}
                       for w in windows],
                peak_rss_mb=sampler.peak(run_start, run_end)["peak_rss_mb"],
                failed_checks=summary.checks_failed,
                stage_rows={f"{p.split()[-1]}:{t}": n for p, t, n in summary.stage_rows},
            )
            overhead = res.job_seconds - sum(w.seconds for w in windows)
            res.stages["orchestration_overhead"] = {"seconds": round(overhead, 3)}
            results.append(res)
            print(f"[bench] {day}: job {res.job_seconds:.1f}s, success={res.success}, "
                  + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in res.stages.items()), file=sys.stderr, flush=True)
    finally:
        sampler.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure the nightly job (deliveries must already be simulated).")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True)
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--rows", type=int, required=True, help="source rows per day (for rows/s)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    os.environ["ZQ_SIMULATE"] = "0"  # the landing step observes the prepared deliveries
    t0 = time.time()
    results = run_days(args.date, args.days, args.rows)
    payload = {"days": [asdict(r) for r in results], "process_seconds": round(time.time() - t0, 3), **high_water_mb()}
    args.out.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0 if all(r.success for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
