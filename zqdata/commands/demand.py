"""`zq demand add|list|show|advance`: the operator's unmet data needs, raised with the agency holding the data (Art. 18).

Only the operational DB is used.
"""

from __future__ import annotations

import argparse

from zqdata.commands._common import command, governance_command, operational_db, print_history, print_listing


def register(sub: argparse._SubParsersAction) -> None:
    from zqdata.governance.demand import STATES

    p = sub.add_parser("demand", help="数据需求 unmet data needs raised with the agencies (Art. 18)")
    dsub = p.add_subparsers(dest="demand_command", required=True)

    add = command(dsub, "add", "登记数据需求 record an unmet data need", _add)
    add.add_argument("--scenario", required=True, help="应用场景 scenario code (registry/scenarios.yaml, or a planned one)")
    add.add_argument("--dataset", action="append", required=True, help="所需数据集 dataset code (repeatable)")
    add.add_argument("--field", action="append", default=[],
                     help="所需字段 dataset.field (repeatable; may not exist yet)")
    add.add_argument("--reason", required=True, help="需求理由 why it is needed")
    add.add_argument("--actor", help="提出人（默认 $USER） who records it")

    ls = command(dsub, "list", "列出数据需求 list demand requests", _list)
    ls.add_argument("--state", action="append", choices=STATES)
    ls.add_argument("--agency", help="数源机构代码 agency code")
    ls.add_argument("--json", action="store_true")

    command(dsub, "show", "查看数据需求及其状态历史 show a request and its history", _show, "demand_id")

    adv = command(dsub, "advance", "推进数据需求状态 move a request to its next state", _advance, "demand_id")
    adv.add_argument("--to", choices=STATES, help="目标状态（协调中后须选 agreed 或 declined） target state")
    adv.add_argument("--registration", help="满足需求的登记记录 the registration record that fulfilled it (RG-…)")
    adv.add_argument("--actor", help="经办人（默认 $USER） who acts")
    adv.add_argument("--note", help="说明（未同意时必填） note; required when declined")


@governance_command
def _add(args: argparse.Namespace) -> int:
    from zqdata.governance import demand
    from zqdata.registry import registry

    reg = registry()
    created = demand.add_demand(operational_db(), reg, args.scenario, args.dataset, args.field, args.reason,
                                actor=args.actor)
    for d in created:
        agency = reg.agencies[d.agency]
        print(f"已登记 recorded: {d.line()}\n  转 routed to {agency.name} ({d.agency})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    rows = demand.list_demands(operational_db(), state=args.state, agency=args.agency)
    return print_listing(rows, args.json, "项数据需求 requests")


@governance_command
def _show(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    db = operational_db()
    d = demand.get_demand(db, args.demand_id)
    print(d.line())
    print(f"理由 reason: {d.reason}\n提出 requested: {d.requested_by} {d.requested_at:%Y-%m-%d %H:%M}")
    print("状态历史 history:")
    print_history(demand.demand_events(db, d.demand_id), demand.STATE_CN)
    return 0


@governance_command
def _advance(args: argparse.Namespace) -> int:
    from zqdata.governance import demand

    d = demand.advance_demand(operational_db(), args.demand_id, args.to, registration_id=args.registration,
                              actor=args.actor, note=args.note)
    print(f"已更新 updated: {d.line()}")
    return 0
