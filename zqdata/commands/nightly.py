"""`zq nightly`: run the nightly job for one or more days and print a summary per stage."""

from __future__ import annotations

import argparse
import datetime as dt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="运行每日汇聚作业 run the nightly job for a day (or several) and print a summary")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True, help="first partition, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=1, help="number of consecutive partitions (a backfill)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from orchestration.nightly import format_summary, run_nightly
    from zqdata.preflight import preflight_problems

    problems = preflight_problems()
    if problems:
        print("配置有误，未开始运行 (configuration problems, nothing was run):", flush=True)
        for p in problems:
            print(f"  - {p}", flush=True)
        return 2
    ok = True
    for i in range(args.days):
        _, summary = run_nightly(args.date + dt.timedelta(days=i))
        print(format_summary(summary), flush=True)
        ok = ok and summary.success
    return 0 if ok else 1
