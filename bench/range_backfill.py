"""Wall time of N small days as N single-day runs vs ONE range run (issue 15), each in a fresh data folder.

    python -m bench.range_backfill --days 5 --rows 1000 --mode single --out single.json
    python -m bench.range_backfill --days 5 --rows 1000 --mode range --out range.json

The days are simulated inside the runs (ZQ_SIMULATE=1, as `zq history` does); the figures are the runs' wall time (the
notification run included) and the seconds per stage from the event log (bench.stages), summed over the runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def measure(first: dt.date, days: int, mode: str, range_days: int | None = None, home: bool = False) -> dict:
    """`range`: the days as range runs of `range_days` days each (default: one run over all of them), one after
    the other as `zq history` runs them; `single`: one run per day. `home`: in the instance of $DAGSTER_HOME (the
    nights after it then see the event history of these), else in a throw-away instance with the project's settings
    (orchestration/dagster.yaml: its event log storage and pools, as `make nightly` runs)."""
    import shutil

    from bench.stages import step_windows, summarize_stages
    from orchestration.instance import ensure_instance
    from orchestration.nightly import run_nightly, run_nightly_range
    from orchestration.ranges import chunks

    if not home:
        os.environ["DAGSTER_HOME"] = tempfile.mkdtemp(prefix="zq-range-bench-home-")
        shutil.copy(Path(__file__).resolve().parents[1] / "orchestration" / "dagster.yaml", os.environ["DAGSTER_HOME"])
    instance = ensure_instance()
    t0 = time.monotonic()
    if mode == "range":
        results, summaries = [], []
        for a, b in chunks(first, days, range_days or days):
            result, day_summaries = run_nightly_range(a, b, instance)
            results.append(result)
            summaries += day_summaries
    else:
        pairs = [run_nightly(first + dt.timedelta(days=i), instance) for i in range(days)]
        results, summaries = [r for r, _ in pairs], [s for _, s in pairs]
    wall = time.monotonic() - t0
    stages: dict[str, float] = {}
    job_seconds = 0.0
    for r in results:
        windows, start, end = step_windows(instance, r.run_id)
        job_seconds += end - start
        for stage, v in summarize_stages(windows, None, 1).items():
            stages[stage] = round(stages.get(stage, 0.0) + v["seconds"], 3)
    return {"mode": mode, "days": days, "range_days": (range_days or days) if mode == "range" else 1,
            "runs": len(results), "success": all(r.success for r in results),
            "wall_seconds": round(wall, 1), "job_seconds": round(job_seconds, 1),
            "seconds_per_day": round(wall / days, 1), "stage_seconds": stages,
            "days_ok": sum(s.success for s in summaries)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--date", type=dt.date.fromisoformat, default=dt.date(2025, 6, 1))
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--mode", choices=("single", "range"), required=True)
    p.add_argument("--range-days", type=int, default=None,
                   help="range mode: days per range run (default: all the days in one run)")
    p.add_argument("--out", type=Path)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the data folder (default: a new temporary one); with it the runs use $DAGSTER_HOME's instance")
    args = p.parse_args(argv)
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="zq-range-bench-")) / "data"
    os.environ.update({"ZQ_DATA_DIR": str(data), "ZQ_SIMULATE": "1", "ZQ_SIM_ROWS_PER_DAY": str(args.rows),
                       "ZQ_SIM_SEED": "7", "ZQ_STORE_BACKEND": "local"})
    os.environ.setdefault("ZQ_PSEUDONYM_KEY", "bench-key-not-a-secret-0123456789abcdef")
    for var in ("ZQ_LANDING_DIR", "ZQ_GOV_DB", "ZQ_OPS_DB"):
        os.environ.pop(var, None)
    out = {**measure(args.date, args.days, args.mode, args.range_days, home=args.data_dir is not None),
           "rows_per_day": args.rows,
           "data_dir": str(data)}
    print(json.dumps(out, ensure_ascii=False), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0 if out["success"] else 1


if __name__ == "__main__":
    sys.exit(main())
