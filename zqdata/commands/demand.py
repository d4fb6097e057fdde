"""`zq demand add|list|show|advance`: the operator's unmet data needs, raised with the agency holding the data (Art. 18).

Only the operational DB is used.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from zqdata.governance.demand import STATES

    p = sub.add_parser("demand", help="数据需求 unmet data needs raised with the agencies (Art. 18)")
    dsub = p.add_subparsers(dest="demand_command", required=True)

    add = dsub.add_parser("add", help="登记数据需求 record an unmet data need")
    add.add_argument("--scenario", required=True, help="应用场景 scenario code (registry/scenarios.yaml, or a planned one)")
    add.add_argument("--dataset", action="append", required=True, help="所需数据集 dataset code (repeatable)")
    add.add_argument("--field", action="append", default=[],
                     help="所需字段 dataset.field (repeatable; may not exist yet)")
    add.add_argument("--reason", required=True, help="需求理由 why it is needed")
    add.add_argument("--actor", help="提出人（默认 $USER） who records it")
    add.set_defaults(func=_add)

    ls = dsub.add_parser("list", help="列出数据需求 list demand requests")
    ls.add_argument("--state", action="append", choices=STATES)
    ls.add_argument("--agency", help="数源机构代码 agency code")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    show = dsub.add_parser("show", help="查看数据需求及其状态历史 show a request and its history")
    show.add_argument("demand_id")
    show.set_defaults(func=_show)

    adv = dsub.add_parser("advance", help="推进数据需求状态 move a request to its next state")
    adv.add_argument("demand_id")
    adv.add_argument("--to", choices=STATES, help="目标状态（协调中后须选 agreed 或 declined） target state")
    adv.add_argument("--registration", help="满足需求的登记记录 the registration record that fulfilled it (RG-…)")
    adv.add_argument("--actor", help="经办人（默认 $USER） who acts")
    adv.add_argument("--note", help="说明（未同意时必填） note; required when declined")
    adv.set_defaults(func=_advance)


def _db():
    from zqdata import opdb

    return opdb.get_engine()


def _fail(message: str) -> int:
    print(f"错误 error: {message}", file=sys.stderr)
    return 2


def _add(args: argparse.Namespace) -> int:
    from zqdata.governance import demand
    from zqdata.registry import registry

    reg = registry()
    try:
        created = demand.add_demand(_db(), reg, args.scenario, args.dataset, args.field, args.reason, actor=args.actor)
    except demand.DemandError as exc:
        return _fail(str(exc))
    for d in created:
        agency = reg.agencies[d.agency]
        print(f"已登记 recorded: {d.line()}\n  转 routed to {agency.name} ({d.agency})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    rows = demand.list_demands(_db(), state=args.state, agency=args.agency)
    if args.json:
        print(json.dumps([d.__dict__ for d in rows], ensure_ascii=False, indent=2, default=str))
        return 0
    for d in rows:
        print(d.line())
    print(f"共 {len(rows)} 项数据需求 requests")
    return 0


def _show(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    db = _db()
    try:
        d = demand.get_demand(db, args.demand_id)
    except demand.DemandError as exc:
        return _fail(str(exc))
    print(d.line())
    print(f"理由 reason: {d.reason}\n提出 requested: {d.requested_by} {d.requested_at:%Y-%m-%d %H:%M}")
    print("状态历史 history:")
    for e in demand.demand_events(db, d.demand_id):
        frm = demand.STATE_CN.get(e["from_state"], "-") if e["from_state"] else "-"
        print(f"  {e['event_at']:%Y-%m-%d %H:%M:%S}  {frm} → {demand.STATE_CN[e['to_state']]}  {e['actor']}  "
              f"{e['note'] or ''}")
    return 0


def _advance(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    try:
        d = demand.advance_demand(_db(), args.demand_id, args.to, registration_id=args.registration, actor=args.actor,
                                  note=args.note)
    except demand.DemandError as exc:
        return _fail(str(exc))
    print(f"已更新 updated: {d.line()}")
    return 0
