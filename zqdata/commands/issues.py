"""`zq issues list|show|ack|resolve|sync`: the quality-issue register (Art. 20) from the command line.

The register is in the operational DB (`zqdata.opdb`); only `sync` reads the gov DuckDB (read only, for the findings).
"""

from __future__ import annotations

import argparse
import datetime as dt

from zqdata.commands._common import command, operational_db, print_json, print_listing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("issues", help="数据质量问题登记 quality issues: list, show, ack, resolve, sync")
    isub = p.add_subparsers(dest="issues_command", required=True)

    ls = command(isub, "list", "列出问题 list issues", _list)
    ls.add_argument("--status", action="append", help="open|notified|acknowledged|resolved|verified|superseded|reopened (repeatable)")
    ls.add_argument("--agency", help="数源机构代码 agency code")
    ls.add_argument("--dataset", help="数据集代码 dataset code")
    ls.add_argument("--partition", type=dt.date.fromisoformat, help="分区 YYYY-MM-DD")
    ls.add_argument("--json", action="store_true", help="JSON output")

    command(isub, "show", "查看问题、溯源、事件与通知 show one issue with its trace, events and notifications", _show,
            "issue_id", with_json=True)

    ack = command(isub, "ack", "确认问题 acknowledge an issue", _ack, "issue_id")
    ack.add_argument("--by", required=True, help="确认人 who acknowledges")
    ack.add_argument("--note")

    res = command(isub, "resolve", "已整改并重新交付 mark resolved (verified automatically on the next check)", _resolve,
                  "issue_id")
    res.add_argument("--note", required=True, help="整改说明 what was fixed and redelivered")
    res.add_argument("--by")

    sync = command(isub, "sync", "从 quality.findings 同步问题并发送通知 sync issues of a partition (and notify)", _sync)
    sync.add_argument("--partition", type=dt.date.fromisoformat, required=True)
    sync.add_argument("--notify", action="store_true", help="also send the notifications (e-mail via SMTP or the local Maildir outbox, webhook)")


def _gov_read_only():
    """The gov DuckDB, read only (for `sync`: the findings), waiting (bounded) while a run writes it; a clear error when
    it is missing or still locked after the wait."""
    import duckdb

    from zqdata import warehouse
    from zqdata.settings import get_settings

    path = get_settings().gov_db
    if not warehouse.exists("gov", path):
        raise SystemExit(f"市政务大数据平台数据库不存在 gov DB not found: {path}")
    try:
        return warehouse.connect_read_only_waiting("gov", path)
    except duckdb.IOException as exc:
        raise SystemExit(f"无法只读打开市政务大数据平台数据库（仍被运行中的作业写入，请稍后重试） gov DB busy: {exc}") from None


def _line(i) -> str:
    from zqdata.lineage import dimension_label

    esc = " ⚠升级" if i.escalated_at else ""
    return (
        f"{i.issue_id}  {i.partition_date}  {i.status:<12} {i.agency:<10} {i.dataset:<22} {i.rule:<36} "
        f"{dimension_label(i.dimension)} {i.severity} 记录 {i.records_failed}{esc}"
    )


def _list(args: argparse.Namespace) -> int:
    from zqdata import issues

    rows = issues.list_issues(operational_db(), status=args.status, agency=args.agency, partition_date=args.partition,
                              dataset=args.dataset)
    return print_listing(rows, args.json, "个问题 issues", _line, _public)


def _public(i) -> dict:
    """The issue as printed: sample details and the stored trace masked again by field classification."""
    from dataclasses import asdict

    from zqdata import display
    from zqdata.registry import registry

    reg = registry()
    d = asdict(i)
    d["sample_rows"] = [display.finding(reg, s) for s in i.sample_rows]
    d["trace"] = display.trace_dict(reg, i.trace) if i.trace else {}
    return d


def _show(args: argparse.Namespace) -> int:
    from zqdata import alerting, issues, lineage

    db = operational_db()
    try:
        i = issues.get_issue(db, args.issue_id)
    except issues.IssueError as exc:
        print(exc)
        return 1
    events = issues.issue_events(db, i.issue_id)
    notes = alerting.notifications(db, i.issue_id)
    if args.json:
        print_json({"issue": _public(i), "events": events, "notifications": notes})
        return 0
    print(_line(i))
    print(f"状态 status: {issues.STATUS_CN.get(i.status, i.status)}")
    print(f"确认 ack: {i.acknowledged_by or '-'} {i.acknowledged_at or ''}   整改说明 note: {i.resolution_note or '-'}")
    print()
    if i.trace.get("levels"):
        print(lineage.Trace.from_dict(_public(i)["trace"]).to_text())
    print("\n事件 events:")
    for e in events:
        print(f"  {e['event_at']}  {e['event']:<12} {e['from_status'] or '-'} → {e['to_status'] or '-'}  {e['actor'] or ''} {e['note'] or ''}")
    print("通知 notifications:")
    for n in notes:
        print(f"  {n['channel']:<8} {n['status_event']:<14} {n['status']:<8} {n['transport'] or '-':<8} 尝试 {n['attempts']} 次 {n['last_error'] or ''}")
    return 0


def _ack(args: argparse.Namespace) -> int:
    from zqdata import issues

    try:
        i = issues.acknowledge(operational_db(), args.issue_id, by=args.by, note=args.note)
    except issues.IssueError as exc:
        print(exc)
        return 1
    print(f"已确认 acknowledged: {i.issue_id} by {i.acknowledged_by}")
    return 0


def _resolve(args: argparse.Namespace) -> int:
    from zqdata import issues

    try:
        i = issues.resolve(operational_db(), args.issue_id, note=args.note, by=args.by)
    except issues.IssueError as exc:
        print(exc)
        return 1
    print(f"已标记整改 resolved: {i.issue_id}（重新交付并经该规则复核通过后自动关闭 verified；"
          "原问题记录已不在重新交付中则关闭 superseded）")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from zqdata import alerting, issues
    from zqdata.registry import registry

    db = operational_db()
    reg = registry()
    with _gov_read_only() as con:  # findings are read; the register is written in the operational DB
        rep = issues.sync_issues(con, db, reg, args.partition)
    print(rep.summary())
    if args.notify:
        n = alerting.notify_issues(db, reg)  # no gov DB needed (and not held) while sending
        print(n.summary())
        return 1 if n.failed else 0
    return 0
