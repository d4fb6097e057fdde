"""`zq register list|show|advance|apply|sync`: registration records of datasets, products and services (登记, Art. 17).

Only the operational DB (and, for `sync`, the registry and the dbt manifest) is used: no warehouse file is opened.
"""

from __future__ import annotations

import argparse

from zqdata.commands._common import (command, fail, governance_command, operational_db, print_history, print_json,
                                     print_listing)


def register(sub: argparse._SubParsersAction) -> None:
    from zqdata.governance.registration import KINDS, RECORD_TYPES, STATES

    p = sub.add_parser("register", help="登记 registration of data resources, products and services (Art. 17)")
    rsub = p.add_subparsers(dest="register_command", required=True)

    ls = command(rsub, "list", "列出登记记录 list registration records (--subjects: each subject's code)", _list)
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--subject", help="数据集代码、产品或服务名 dataset code, product or service")
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--subjects", action="store_true", help="每个登记对象一行：登记编码与状态 one line per subject")
    ls.add_argument("--json", action="store_true")

    command(rsub, "show", "查看登记记录、登记内容与状态历史 show a record, its version and history", _show,
            "registration_id", with_json=True)

    adv = command(rsub, "advance", "推进到下一状态或驳回 move a record to its next state, or reject it", _advance,
                  "registration_id")
    adv.add_argument("--to", choices=STATES, help="目标状态（默认下一状态） target state, default: the next one")
    adv.add_argument("--reject", action="store_true", help="驳回 reject")
    adv.add_argument("--code", help="赋码时指定登记编码（默认自动编号） the code, when reaching code_assigned")
    adv.add_argument("--actor", help="经办人（默认 $USER） who acts")
    adv.add_argument("--note", help="说明 note")

    ap = command(rsub, "apply", "申请更正、注销或服务首次登记 apply for a correction, cancellation or a service", _apply)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--subject", required=True)
    ap.add_argument("--type", dest="record_type", choices=[t for t in RECORD_TYPES if t != "change"], required=True)
    ap.add_argument("--actor")
    ap.add_argument("--note")

    sy = command(rsub, "sync", "按登记目录与产品输出列同步登记（变更自动申请） sync with the registry and the "
                               "products' output columns (what the governance/registrations asset runs)", _sync)
    sy.add_argument("--actor")
    sy.add_argument("--manifest", help="dbt manifest (default dbt_project/target/manifest.json)")


def _list(args: argparse.Namespace) -> int:
    from zqdata.governance import registration as r
    from zqdata.registry import registry

    if args.subjects:
        rows = [s for s in r.catalogue(operational_db(), registry())
                if (not args.kind or s.kind == args.kind) and (not args.subject or s.subject == args.subject)]

        def line(s: r.SubjectStatus) -> str:
            src = "（登记目录，尚未同步 from the registry）" if s.source == "registry" else ""
            return f"{r.KIND_CN[s.kind]} {s.subject:<26} {s.code or '-':<20} {str(s.registered_on or ''):<10} {s.label}{src}"

        return print_listing(rows, args.json, "个登记对象 subjects", line)
    records = r.list_registrations(operational_db(), kind=args.kind, subject=args.subject, state=args.state)
    return print_listing(records, args.json, "条登记记录 records")


@governance_command
def _show(args: argparse.Namespace) -> int:
    from zqdata.governance import registration as r

    db = operational_db()
    rec = r.get_registration(db, args.registration_id)
    events = r.registration_events(db, rec.registration_id)
    if args.json:
        print_json({"record": rec.__dict__, "events": events})
        return 0
    print(rec.line())
    print(f"类型 type: {r.RECORD_TYPE_CN[rec.record_type]} ({rec.record_type})   来源 origin: {rec.origin}   "
          f"申请人 applied by: {rec.applied_by}")
    print(f"登记编码 code: {rec.code or '-'}   赋码日期 registered: {rec.registered_on or '-'}")
    print(f"登记版本 version: sha256 {rec.version_hash}" + (f"（替代 replaces {rec.previous_hash[:12]}）"
                                                           if rec.previous_hash else ""))
    items = rec.version.get("fields") or rec.version.get("columns") or []
    if items:
        print(f"  {'字段 fields' if 'fields' in rec.version else '输出列 columns'}: "
              + ", ".join(i["name"] for i in items))
    if rec.note:
        print(f"说明 note: {rec.note}")
    print("\n状态历史 history:")
    print_history(events, r.STATE_CN)
    return 0


@governance_command
def _advance(args: argparse.Namespace) -> int:
    from zqdata.governance import registration as r
    from zqdata.registry import registry

    rec = r.advance(operational_db(), args.registration_id, to=args.to, reject=args.reject, actor=args.actor,
                    note=args.note, code=args.code, registry=registry())
    code = f"，登记编码 {rec.code}" if rec.state == "code_assigned" else ""
    print(f"已更新 updated: {rec.registration_id} {rec.subject} → {r.STATE_CN[rec.state]} ({rec.state}){code}")
    return 0


@governance_command
def _apply(args: argparse.Namespace) -> int:
    from zqdata.governance import registration as r

    rec = r.apply(operational_db(), args.kind, args.subject, args.record_type, actor=args.actor, note=args.note)
    print(f"已申请 applied: {rec.line()}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from zqdata.governance import registration as r
    from zqdata.registry import registry

    try:
        columns = r.product_columns_from_manifest(args.manifest)
    except FileNotFoundError as exc:
        return fail(f"找不到 dbt 清单，请先运行 make dbt-parse (dbt manifest not built): {exc}")
    report = r.sync_registrations(operational_db(), registry(), columns, actor=args.actor)
    print(report.summary())
    for rec in report.created:
        print(f"  {rec.line()}" + (f"  {rec.note}" if rec.record_type == "change" else ""))
    return 0
