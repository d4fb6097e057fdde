"""`zq trace`: 逐级溯源 from a product, ops dataset, gov model or quality finding back to the agency's delivery rows."""

from __future__ import annotations

import argparse
import datetime as dt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="逐级溯源 trace data back to the source agency, delivery file and rows (Art. 20)",
        description=(
            "Examples: zq trace ops/products/ops_sme_credit_profile --where credit_code=9144... ; "
            "zq trace products.ops_transit_ridership --where route_id=11 --where hour=8 ; "
            "zq trace gov/quality/findings --partition 2025-05-01 --dataset resident_population --rule <rule> ; "
            "zq trace gov/ods/ods_enterprise_registry --id enterprise_registry/2025-05-01/part-0001.csv#12"
        ),
    )
    p.add_argument("target", help="asset key (ops/products/<model>, gov/staging/<model>, ...) or table (products.<model>, ...)")
    p.add_argument("--id", dest="lineage_ids", action="append", default=[], help="lineage id <dataset>/<day>/<file>#<row> (repeatable)")
    p.add_argument("--where", action="append", default=[], help="ops row filter column=value (repeatable)")
    p.add_argument("--partition", type=dt.date.fromisoformat, help="findings of this partition (with --dataset / --rule)")
    p.add_argument("--dataset", help="findings of this dataset")
    p.add_argument("--rule", help="findings of this rule")
    p.add_argument("--limit", type=int, default=50, help="at most this many source rows (default 50)")
    p.add_argument("--json", action="store_true", help="JSON instead of Chinese text")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:

    from zqdata import lineage
    from zqdata import warehouse
    from zqdata.registry import registry
    from zqdata.settings import get_settings

    s = get_settings()
    row_filter = {}
    for w in args.where:
        if "=" not in w:
            print(f"--where 需要 column=value 形式: {w!r}")
            return 2
        k, v = w.split("=", 1)
        row_filter[k.strip()] = v.strip()
    if not warehouse.exists("gov", s.gov_db):
        print(f"市政务大数据平台数据库不存在 gov DB not found: {s.gov_db}")
        return 1
    gov = warehouse.connect_read_only_waiting("gov", s.gov_db)
    ops = warehouse.connect_read_only_waiting("ops", s.ops_db) if warehouse.exists("ops", s.ops_db) else None
    try:
        findings = None
        if args.partition:
            findings = _findings(gov, args.partition, args.dataset, args.rule, args.limit)
            if not findings:
                print("该分区没有符合条件的质量发现 no matching findings")
                return 1
        t = lineage.trace(
            gov, ops, registry(), args.target, lineage_ids=args.lineage_ids or None, finding=findings,
            row_filter=row_filter or None, max_rows=args.limit,
        )
    except lineage.TraceError as exc:
        print(exc)
        return 1
    finally:
        gov.close()
        if ops is not None:
            ops.close()
    print(t.to_json() if args.json else t.to_text())
    return 0


def _findings(gov, day: dt.date, dataset: str | None, rule: str | None, limit: int) -> list[dict]:
    from zqdata import lineage

    if not lineage.table_exists(gov, "quality", "findings"):
        return []
    where, params = ["partition_date = ?"], [day]
    for col, v in (("dataset", dataset), ("rule", rule)):
        if v:
            where.append(f"{col} = ?")
            params.append(v)
    sql = f"select * from quality.findings where {' and '.join(where)} order by dataset, rule, delivery_file, row_number limit {int(limit)}"
    return lineage.fetch_dicts(gov, sql, params)
