"""`zq report disclosure`: the disclosure report (Art. 21) of a year or of any period, published to the published store.

Only the registry, the operational DB (registrations, delivery audit log) and the published store are used.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from zqdata.commands._common import command, fail, operational_db


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="治理报告 governance reports (disclosure, Art. 21)")
    rsub = p.add_subparsers(dest="report_command", required=True)

    d = command(rsub, "disclosure", "信息披露报告 the disclosure report of a year or a period (Art. 21)", _disclosure)
    when = d.add_mutually_exclusive_group(required=True)
    when.add_argument("--year", type=int, help="年度 year Y (1 January – 31 December)")
    when.add_argument("--from", dest="start", type=dt.date.fromisoformat, help="开始日 YYYY-MM-DD (with --to)")
    d.add_argument("--to", dest="end", type=dt.date.fromisoformat, help="结束日 YYYY-MM-DD (with --from)")
    d.add_argument("--out", type=Path, help="另存一份到本地目录 also write the files to this folder")
    d.add_argument("--no-publish", action="store_true", help="不发布到发布存储 do not publish (with --out)")


def _disclosure(args: argparse.Namespace) -> int:
    from zqdata.governance import disclosure
    from zqdata.publish import published_store
    from zqdata.registry import registry

    try:
        if args.year is not None:
            if args.end is not None:
                raise ValueError("--to 只与 --from 一起使用 (--to goes with --from)")
            period = disclosure.Period.year(args.year)
        else:
            if args.end is None:
                raise ValueError("--from 须与 --to 一起使用 (--from needs --to)")
            period = disclosure.Period.between(args.start, args.end)
        if args.no_publish and not args.out:
            raise ValueError("--no-publish 须与 --out 一起使用 (nothing would be written)")
        engine = operational_db()
        store = None if args.no_publish else published_store()
    except ValueError as exc:
        return fail(str(exc))
    report = disclosure.build_disclosure(engine, registry(), period)
    use = report["data_use"]["totals"]
    print(f"信息披露报告 disclosure report {period.label}（{period.start} 至 {period.end}）：授权 "
          f"{len(report['authorizations'])} 项，产品 {len(report['catalogue']['products'])} 个，交付 {use['deliveries']} 次 "
          f"{use['rows']} 行，拒绝 {use['refusals']} 次")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, data in disclosure.render_files(report).items():
            path = args.out / f"disclosure-{period.label}{Path(name).suffix}"
            path.write_bytes(data)
            print(f"  写入 wrote {path}")
    if store is not None:
        published = disclosure.publish_disclosure(store, report)
        print(f"  已发布 published to {store!r}: {published.prefix}/ ({', '.join(published.keys)})")
        print(f"  当前版本指针 pointer: {disclosure.current_key(period.label)}")
    return 0
