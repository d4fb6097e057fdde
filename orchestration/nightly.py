"""Run the nightly job for given days (what `make nightly` and the scheduler do) and summarize the result."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import dagster as dg
import duckdb

from zqdata.settings import get_settings


@dataclass
class DaySummary:
    partition: str
    success: bool
    stage_rows: list[tuple[str, str, int]] = field(default_factory=list)  # (platform, table, rows in partition)
    checks_passed: int = 0
    checks_failed: list[str] = field(default_factory=list)


def run_nightly(day: dt.date, instance: dg.DagsterInstance | None = None) -> tuple[dg.ExecuteInProcessResult, DaySummary]:
    """Execute `nightly_aggregation` for one partition in this process and summarize it."""
    from orchestration.definitions import defs

    job = defs().resolve_job_def("nightly_aggregation")
    instance = instance or dg.DagsterInstance.get()
    # INFO on the console: step starts/ends and warnings, not every event (the event log keeps everything)
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    result = job.execute_in_process(partition_key=day.isoformat(), instance=instance, raise_on_error=False,
                                    run_config=run_config)
    summary = DaySummary(partition=day.isoformat(), success=result.success)
    for ev in result.get_asset_check_evaluations():
        name = f"{ev.asset_key.to_user_string()}:{ev.check_name}"
        if ev.passed:
            summary.checks_passed += 1
        else:
            summary.checks_failed.append(name)
    summary.stage_rows = stage_row_counts(day)
    return result, summary


def _counts(db_path, platform: str, day: dt.date) -> list[tuple[str, str, int]]:
    if not db_path.exists():
        return []
    out = []
    with duckdb.connect(str(db_path), read_only=True) as con:
        tables = con.execute(
            """
            select t.table_schema, t.table_name,
                   bool_or(c.column_name = '_partition_date') as partitioned,
                   bool_or(c.column_name = 'partition_date') as partitioned_plain
            from information_schema.tables t
            join information_schema.columns c using (table_catalog, table_schema, table_name)
            where t.table_schema not in ('information_schema', 'pg_catalog') and t.table_schema not like 'dq_audit%'
            group by all order by 1, 2
            """
        ).fetchall()
        for schema, table, partitioned, partitioned_plain in tables:
            col = "_partition_date" if partitioned else ("partition_date" if partitioned_plain else None)
            where = f" where {col} = ?" if col else ""
            params = [day] if col else []
            n = con.execute(f'select count(*) from "{schema}"."{table}"{where}', params).fetchone()[0]
            out.append((platform, f"{schema}.{table}", n))
    return out


def stage_row_counts(day: dt.date) -> list[tuple[str, str, int]]:
    """Rows of the partition in every table of both platforms (tables without a partition column: all rows)."""
    s = get_settings()
    return _counts(s.gov_db, "市政务大数据平台 gov", day) + _counts(s.ops_db, "运营服务平台 ops", day)


def format_summary(summary: DaySummary) -> str:
    lines = [
        f"== 分区 partition {summary.partition}: {'成功 success' if summary.success else '失败 FAILED'} ==",
        f"{'platform':<22} {'table':<55} {'rows':>10}",
    ]
    lines += [f"{p:<22} {t:<55} {n:>10,}" for p, t, n in summary.stage_rows]
    lines.append(f"检查 checks: {summary.checks_passed} passed, {len(summary.checks_failed)} failed")
    lines += [f"  未通过 failed: {name}" for name in summary.checks_failed]
    return "\n".join(lines)
