"""`zq history`: a stretch of small daily deliveries run through the nightly job, then the governance reports of every
period that ended inside it — the data the annual and quarterly reports show in the demo (issue 13)."""

from __future__ import annotations

import argparse
import datetime as dt



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("history", help="模拟并运行一段历史（默认一年）及其治理报告 simulate and run a stretch of days, "
                                       "then the governance reports of the periods it covers")
    p.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2025, 5, 1), help="first day (YYYY-MM-DD)")
    p.add_argument("--days", type=int, default=365, help="number of days (default 365)")
    p.add_argument("--range-days", type=int, default=None,
                   help="days per run (default: as many as hold 10 M rows at ZQ_SIM_ROWS_PER_DAY, at most all: "
                        "orchestration.ranges.range_days_for; 1: one run per day)")
    p.add_argument("--verbose", action="store_true", help="show the raw run output instead of the log files")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from zqdata.commands.nightly import run_day, run_range
    from zqdata.preflight import partition_range_problem, preflight_problems

    problem = partition_range_problem(args.start, args.days) or "; ".join(preflight_problems())
    if problem:
        print(f"zq history: {problem}", file=sys.stderr, flush=True)
        return 2
    from orchestration.instance import ensure_instance
    from orchestration.nightly import format_summary
    from orchestration.reports_run import run_reports

    from orchestration.ranges import chunks, range_days_for, run_halving
    from zqdata.simulator import SimulatorSettings

    size = args.range_days or range_days_for(SimulatorSettings.from_env().rows_per_day, args.days)
    instance, ok = ensure_instance(), True
    for first, last in chunks(args.start, args.days, max(1, size)):
        # a failed range is run again in halves down to its failing day alone (orchestration.ranges.run_halving), so
        # one bad day does not hold back the others (what day-by-day runs give)
        summaries = run_halving(first, last, lambda a, b: run_range(a, b, instance, verbose=args.verbose)[1],
                                lambda d: run_day(d, instance, verbose=args.verbose)[1], lambda s: s.success,
                                lambda msg: print(msg, flush=True))
        for summary in summaries:
            print(format_summary(summary).splitlines()[0], flush=True)  # one line per day; the full summary: the log
            ok = ok and summary.success
    end = args.start + dt.timedelta(days=args.days - 1)
    for line in run_reports(instance, args.start, end):
        print(line, flush=True)
    return 0 if ok else 1
