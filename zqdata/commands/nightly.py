"""`zq nightly`: run the nightly job for one or more days and print a summary per stage."""

from __future__ import annotations

import argparse
import datetime as dt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="运行每日汇聚作业 run the nightly job for a day (or several) and print a summary")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True, help="first partition, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=1, help="number of consecutive partitions (a backfill)")
    p.add_argument("--no-history", action="store_true",
                   help="不重算过期的后续日 do not recompute later days that read a day changed after them")
    p.add_argument("--verbose", action="store_true",
                   help="在终端显示运行的原始输出（dbt、Dagster 日志） show the raw run output here instead of in the log file")
    p.set_defaults(func=_run)


def run_day(day: dt.date, instance=None, verbose: bool = False):
    """`run_nightly` of one day; its raw output (dbt's lines, Dagster's event log, warnings) goes to a log file under
    the data folder (`logs/nightly-<day>-<time>.log`) unless ``verbose``: the terminal shows the summary."""
    import contextlib
    import sys

    from orchestration.nightly import run_nightly
    from zqdata.settings import TZ, get_settings

    if verbose:
        return run_nightly(day, instance)
    log = get_settings().data_dir / "logs" / f"nightly-{day}-{dt.datetime.now(TZ):%Y%m%dT%H%M%S}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"运行 running {day} …（原始输出 raw output → {log}）", flush=True)
    with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            return run_nightly(day, instance)
        finally:
            sys.stdout.flush()


def run_range(start: dt.date, end: dt.date, instance=None, verbose: bool = False):
    """`run_nightly_range` of the days [start, end] (one run), its raw output to a log file as `run_day`'s."""
    import contextlib
    import sys

    from orchestration.nightly import run_nightly_range
    from zqdata.settings import TZ, get_settings

    if verbose:
        return run_nightly_range(start, end, instance)
    log = get_settings().data_dir / "logs" / f"nightly-{start}_{end}-{dt.datetime.now(TZ):%Y%m%dT%H%M%S}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"运行 running {start} … {end}（一次运行 one run；原始输出 raw output → {log}）", flush=True)
    with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            return run_nightly_range(start, end, instance)
        finally:
            sys.stdout.flush()


def _run(args: argparse.Namespace) -> int:
    import sys

    from zqdata.preflight import partition_range_problem, preflight_problems

    # Before any import of the job or work: a day outside the partitions is a usage error (exit 2, one line).
    out_of_range = partition_range_problem(args.date, args.days)
    if out_of_range:
        print(f"zq nightly: {out_of_range}", file=sys.stderr, flush=True)
        return 2
    from orchestration.nightly import format_summary

    problems = preflight_problems()
    if problems:
        print("配置有误，未开始运行 (configuration problems, nothing was run):", flush=True)
        for p in problems:
            print(f"  - {p}", flush=True)
        return 2
    ok = True
    for i in range(args.days):
        _, summary = run_day(args.date + dt.timedelta(days=i), verbose=args.verbose)
        print(format_summary(summary), flush=True)
        ok = ok and summary.success
    if not args.no_history:
        ok = recompute_stale_days(verbose=args.verbose) and ok
    return 0 if ok else 1


def recompute_stale_days(instance=None, max_rounds: int = 400, verbose: bool = True) -> bool:
    """Recompute, earliest first, every later day that read a day changed after it (orchestration.history)."""
    from orchestration.history import describe, stale_partitions
    from orchestration.instance import ensure_instance
    from orchestration.nightly import format_summary

    instance, ok, done = instance or ensure_instance(), True, set()
    for _ in range(max_rounds):
        stale = [s for s in stale_partitions(instance) if s.partition not in done]
        if not stale:
            return ok
        print("历史依赖变更，重算后续日 later days read a day that changed since:\n  " + "\n  ".join(describe(stale)),
              flush=True)
        first = stale[0].partition
        _, summary = run_day(dt.date.fromisoformat(first), instance, verbose=verbose)
        print(format_summary(summary), flush=True)
        done.add(first)  # at most once per invocation, even if it failed
        ok = ok and summary.success
    return ok
