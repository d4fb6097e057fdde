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
    p.add_argument("--verbose", action="store_true", help="show the raw run output instead of the log files")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from zqdata.commands.nightly import run_day
    from zqdata.preflight import partition_range_problem, preflight_problems

    problem = partition_range_problem(args.start, args.days) or "; ".join(preflight_problems())
    if problem:
        print(f"zq history: {problem}", file=sys.stderr, flush=True)
        return 2
    from orchestration.instance import ensure_instance
    from orchestration.nightly import format_summary
    from orchestration.reports_run import run_reports

    instance, ok = ensure_instance(), True
    for i in range(args.days):
        _, summary = run_day(args.start + dt.timedelta(days=i), instance, verbose=args.verbose)
        print(format_summary(summary).splitlines()[0], flush=True)  # one line per day; the full summary is in the log
        ok = ok and summary.success
    end = args.start + dt.timedelta(days=args.days - 1)
    for line in run_reports(instance, args.start, end):
        print(line, flush=True)
    return 0 if ok else 1
