"""Run the nightly job for given days (what `make nightly` and the scheduler do) and summarize the result."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from zqdata import asset_keys
from zqdata.settings import get_settings


@dataclass
class DaySummary:
    partition: str
    success: bool
    stage_rows: list[tuple[str, str, int]] = field(default_factory=list)  # (platform, table, rows in partition)
    checks_passed: int = 0
    checks_failed: list[str] = field(default_factory=list)
    # failed checks by (agency, Art. 20 dimension) from their metadata -> rules; checks without either: ("", "")
    failed_by_agency: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    gate_passed: bool | None = None  # the quality gate on gov/quality/scores; None: not evaluated
    gate_failures: list[str] = field(default_factory=list)
    held_back: dict[str, str] = field(default_factory=dict)  # datasets the gate held back (not crossed) -> why
    issues: list[Any] = field(default_factory=list)  # the partition's unverified issues (zqdata.issues.Issue)
    notify: str = ""  # what the notification run did
    published: list[str] = field(default_factory=list)  # products published for the partition


# INFO on the console: step starts/ends and warnings, not every event (the event log keeps everything)
_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_nightly(day: dt.date, instance: dg.DagsterInstance | None = None) -> tuple[dg.ExecuteInProcessResult, DaySummary]:
    """Execute `nightly_aggregation` for one partition in this process, deliver the agencies' messages (the run the
    alert sensor requests under `make ui`), and summarize both."""
    result, summaries = _execute(day, day, instance, {})
    return result, summaries[0]


def run_nightly_range(start: dt.date, end: dt.date, instance: dg.DagsterInstance | None = None
                      ) -> tuple[dg.ExecuteInProcessResult, list[DaySummary]]:
    """Execute `nightly_aggregation` ONCE over the days [start, end] (a range run, issue 15: each step processes the
    days in order), then the notification run; one summary per day. One day: the same as `run_nightly`."""
    from orchestration.ranges import range_tags

    return _execute(start, end, instance, {} if start == end else range_tags(start, end))


def _execute(start: dt.date, end: dt.date, instance: dg.DagsterInstance | None,
             tags: dict[str, str]) -> tuple[dg.ExecuteInProcessResult, list[DaySummary]]:
    from assets.governance.issues import NOTIFY_JOB
    from orchestration.definitions import defs
    from orchestration.jobs import NIGHTLY_JOB
    from orchestration.instance import ensure_instance
    from orchestration.runs import process_tags, sweep_orphaned_runs

    location = defs()
    instance = instance or ensure_instance()
    for run_id in sweep_orphaned_runs(instance):
        print(f"已将进程不存在的运行 {run_id} 标记为失败并释放其并发池 (run of a dead process marked failed)", flush=True)
    result = location.resolve_job_def(NIGHTLY_JOB).execute_in_process(
        partition_key=None if tags else start.isoformat(), instance=instance, raise_on_error=False,
        run_config=_RUN_CONFIG, tags={**process_tags(), **tags})
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    events = _events_by_day(result, days, single=not tags)
    summaries = [summarize_day(result, day, single=not tags, events=events[day]) for day in days]
    notify = location.resolve_job_def(NOTIFY_JOB).execute_in_process(instance=instance, raise_on_error=False,
                                                                       run_config=_RUN_CONFIG, tags=process_tags())
    rows = stage_row_counts_by_day(days)
    for summary, day in zip(summaries, days):
        add_day_state(summary, _notify_text(notify), rows[day])
    return result, summaries


def _events_by_day(result: dg.ExecuteInProcessResult, days: list[dt.date], single: bool
                   ) -> dict[dt.date, tuple[list, list]]:
    """(check evaluations, materializations) of each day's partition, read from the run once (a range of a year has
    ~100,000 events: reading them all for each day took minutes)."""
    out: dict[dt.date, tuple[list, list]] = {d: ([], []) for d in days}
    keys = {d.isoformat(): d for d in days}
    for ev in result.get_asset_check_evaluations():
        for d in (days if single else [keys[ev.partition]] if ev.partition in keys else []):
            out[d][0].append(ev)
    for m in result.get_asset_materialization_events():
        for d in (days if single else [keys[m.partition]] if m.partition in keys else []):
            out[d][1].append(m)
    return out


def summarize_day(result: dg.ExecuteInProcessResult, day: dt.date, single: bool = True,
                  events: tuple[list, list] | None = None) -> DaySummary:
    """A day's summary from the run's check evaluations and materializations (of that day's partition only;
    ``events``: those already picked out, `_events_by_day`)."""
    summary = DaySummary(partition=day.isoformat(), success=result.success)
    evaluations, materializations = events or _events_by_day(result, [day], single)[day]
    for ev in evaluations:
        name = f"{ev.asset_key.to_user_string()}:{ev.check_name}"
        if ev.check_name == "quality_gate":
            summary.gate_passed = ev.passed
            failures = ev.metadata.get("failures")
            summary.gate_failures = [] if ev.passed or failures is None else [
                line[2:] for line in str(getattr(failures, "value", failures)).splitlines() if line.startswith("- ")]
            held = ev.metadata.get("held_back")
            summary.held_back = dict(getattr(held, "value", held) or {}) if not ev.passed else {}
        if ev.passed:
            summary.checks_passed += 1
        else:
            summary.checks_failed.append(name)
            meta = {k: getattr(v, "value", v) for k, v in ev.metadata.items()}
            where = (str(meta.get("agency") or ""), str(meta.get("dimension") or ""))
            summary.failed_by_agency.setdefault(where, []).append(str(meta.get("rule") or name))
    summary.published = sorted(asset_keys.parse(m.asset_key.path)[1] for m in materializations
                               if m.asset_key.path[:2] == ["ops", "published"])
    return summary


def add_day_state(summary: DaySummary, notify: str, stage_rows: list[tuple[str, str, int]] | None = None) -> None:
    """The day's open issues and row counts as they stand now (``stage_rows``: counted already), and what the
    notification run did."""
    from zqdata import issues, opdb

    day = dt.date.fromisoformat(summary.partition)
    summary.notify = notify
    summary.issues = [i for i in issues.list_issues(opdb.get_engine(), partition_date=day) if i.status not in issues.CLOSED]
    summary.stage_rows = stage_row_counts(day) if stage_rows is None else stage_rows


def _notify_text(result: dg.ExecuteInProcessResult) -> str:
    if not result.success:
        return "通知投递运行失败 notification run failed (see the Dagster event log)"
    (mat,) = [m.materialization for m in result.get_asset_materialization_events()] or [None]
    if mat is None:
        return ""
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    where = "本地发件箱 Maildir " + str(meta.get("maildir")) if meta.get("email_transport") == "maildir" else "SMTP"
    return f"已发送 {meta.get('sent', 0)} 条，失败待重试 {meta.get('failed', 0)} 条；邮件 → {where}"


def _counts(domain: str, db_path, platform: str, days: list[dt.date]) -> dict[dt.date, list[tuple[str, str, int]]]:
    """{day: [(platform, table, rows of the day)]} for every table of the domain, one grouped count per table for all
    the days (a range's summaries counted each table once per day: ~100 queries and two connections a day)."""
    from zqdata import warehouse

    out: dict[dt.date, list[tuple[str, str, int]]] = {d: [] for d in days}
    if not days or not warehouse.exists(domain, db_path):
        return out
    with warehouse.connect(domain, db_path, read_only=True) as con:
        tables = con.execute(
            """
            select t.table_schema, t.table_name,
                   bool_or(c.column_name = '_partition_date') as partitioned,
                   bool_or(c.column_name = 'partition_date') as partitioned_plain
            from information_schema.tables t
            join information_schema.columns c using (table_catalog, table_schema, table_name)
            where t.table_catalog = current_database()  -- a lake's connection also sees its in-memory catalog
              and t.table_schema not in ('information_schema', 'pg_catalog') and t.table_schema not like 'dq_audit%'
            group by all order by 1, 2
            """
        ).fetchall()
        for schema, table, partitioned, partitioned_plain in tables:
            col = "_partition_date" if partitioned else ("partition_date" if partitioned_plain else None)
            if col is None:  # no partition column: all its rows, the same for every day
                (n,) = con.execute(f'select count(*) from "{schema}"."{table}"').fetchone()
                by_day = {d: n for d in days}
            else:
                by_day = {str(d)[:10]: n for d, n in con.execute(
                    f'select "{col}", count(*) from "{schema}"."{table}" where "{col}" between ? and ? group by 1',
                    [min(days), max(days)]).fetchall()}
                by_day = {d: by_day.get(d.isoformat(), 0) for d in days}
            for d in days:
                out[d].append((platform, f"{schema}.{table}", by_day[d]))
    return out


def stage_row_counts(day: dt.date) -> list[tuple[str, str, int]]:
    """Rows of the partition in every table of both platforms (tables without a partition column: all rows)."""
    return stage_row_counts_by_day([day])[day]


def stage_row_counts_by_day(days: list[dt.date]) -> dict[dt.date, list[tuple[str, str, int]]]:
    """`stage_row_counts` of each of ``days``, each table counted once for all of them."""
    s = get_settings()
    gov, ops = _counts("gov", s.gov_db, "市政务大数据平台 gov", days), _counts("ops", s.ops_db, "运营服务平台 ops", days)
    return {d: gov[d] + ops[d] for d in days}


def format_summary(summary: DaySummary) -> str:
    from zqdata.lineage import dimension_label
    from zqdata.registry import registry

    reg = registry()
    lines = [
        f"== 分区 partition {summary.partition}: 运行 run {'成功 success' if summary.success else '失败 FAILED'} ==",
        f"{'platform':<22} {'table':<55} {'rows':>10}",
    ]
    lines += [f"{p:<22} {t:<55} {n:>10,}" for p, t, n in summary.stage_rows]
    lines.append(f"检查 checks: {summary.checks_passed} passed, {len(summary.checks_failed)} failed"
                 + ("（按数源机构、第二十条维度 by agency and Art. 20 dimension）" if summary.checks_failed else ""))
    for (agency, dim), rules in sorted(summary.failed_by_agency.items()):
        who = f"{reg.agencies[agency].name} ({agency})" if agency in reg.agencies else (agency or "平台 platform")
        lines.append(f"  {who} · {dimension_label(dim) if dim else '—'}: {len(rules)} — {'、'.join(sorted(set(rules)))}")
    gate = {True: "通过 passed（允许出域）", False: "未通过 FAILED（逐数据集决定 decided per dataset）",
            None: "未运行 not evaluated"}
    lines.append(f"质量门禁 quality gate: {gate[summary.gate_passed]}")
    if summary.gate_passed is False:
        def named(code: str) -> str:
            return f"{reg.datasets[code].name}（{code}）" if code in reg.datasets else code

        held = sorted(summary.held_back)
        lines.append("  留置 held back（本分区不出域，读取它们的产品不发布 not crossed, products reading them not "
                     "published）: " + ("、".join(named(c) for c in held) if held else "未知 unknown"))
        others = [c for c in reg.datasets if c not in summary.held_back]
        lines.append("  通过门禁 passed: " + ("、".join(others) if others else "无 none"))
    lines += [f"  - {f}" for f in summary.gate_failures]
    lines.append("已发布产品 published: " + ("、".join(summary.published) if summary.published else "无 none"))
    by_agency: dict[str, dict[str, list]] = {}
    for i in summary.issues:
        by_agency.setdefault(i.agency, {}).setdefault(dimension_label(i.dimension), []).append(i)
    lines.append(f"未关闭的质量问题 open quality issues: {len(summary.issues)}（按数源机构、第二十条维度 by agency and Art. 20 dimension）")
    for agency, dims in sorted(by_agency.items()):
        name = reg.agencies[agency].name if agency in reg.agencies else agency
        lines.append(f"  {name} ({agency})")
        for dim, items in sorted(dims.items()):
            rules = "、".join(sorted({i.rule for i in items}))
            records = sum(int(i.records_failed or 0) for i in items)
            lines.append(f"    {dim}: {len(items)} 条规则未通过, {records} 条记录 — {rules}")
    if summary.notify:
        lines.append(f"通知 notifications: {summary.notify}")
    lines.append("下一步 next: `.venv/bin/zq issues list` 查看问题；`.venv/bin/zq issues show <QI-…>` 查看溯源与通知；"
                 f"`make ui` 在 Dagster UI 查看检查与血缘；GX Data Docs: {get_settings().docs_dir / 'gx'}")
    return "\n".join(lines)
