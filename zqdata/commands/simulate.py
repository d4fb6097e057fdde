"""`zq simulate`: write simulated source-agency deliveries (and their ground truth) for one or more days."""

from __future__ import annotations

import argparse
import datetime as dt
from collections import Counter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="模拟数源单位交付 simulate the source agencies' deliveries for a day (or several)")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True, help="first partition, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=1, help="number of consecutive days")
    p.add_argument("--rows-per-day", type=int, default=20000, help="rows per day over all datasets")
    p.add_argument("--seed", type=int, default=20250501)
    p.add_argument("--defect-rate", type=float, default=0.0, help="fraction of rows per dataset with one defect")
    p.add_argument(
        "--defect-kinds", default=None,
        help="comma-separated kinds (default: all row-level kinds); delivery-level kinds as kind or kind:dataset",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from zqdata.registry import registry
    from zqdata.simulator import ground_truth_path, rows_by_dataset, simulate_day
    from zqdata.storage import store_from_env

    store, reg = store_from_env(), registry()
    kinds = [k.strip() for k in args.defect_kinds.split(",") if k.strip()] if args.defect_kinds else None
    rows = rows_by_dataset(reg, args.rows_per_day)
    for i in range(args.days):
        day = args.date + dt.timedelta(days=i)
        truth = simulate_day(store, reg, day, args.rows_per_day, args.seed, args.defect_rate, kinds)
        per = Counter(t.dataset for t in truth)
        print(f"{day} 已交付 delivered {sum(rows.values())} 行 rows; 注入缺陷 defects {len(truth)} → {ground_truth_path(day)}")
        for code in sorted(rows):
            print(f"  {code:<22} {rows[code]:>10} rows  {per.get(code, 0):>6} defects")
    return 0
