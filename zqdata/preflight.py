"""Settings validated before any work (issue 17): a night that cannot finish should not start.

`zq nightly` calls `preflight_problems()` first and stops with the list when it is not empty, instead of discovering
an empty key after the whole gov side ran or a bad memory limit in the first dbt step.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path


def last_partition_day(now: dt.datetime | None = None) -> dt.date:
    """The latest daily partition: yesterday in Asia/Shanghai. A day becomes a partition once it is over (Dagster's
    ``DailyPartitionsDefinition`` in orchestration.partitions ends there too; a test keeps the two in step)."""
    from zqdata.settings import TZ

    return (now or dt.datetime.now(TZ)).astimezone(TZ).date() - dt.timedelta(days=1)


def partition_range_problem(first: dt.date, days: int = 1, now: dt.datetime | None = None) -> str | None:
    """One line when ``first`` .. ``first + days - 1`` is not inside the partitions [PARTITION_START, yesterday]
    (Asia/Shanghai), else None. Checked before anything runs, instead of a DagsterUnknownPartitionError mid-run."""
    from zqdata.settings import PARTITION_START

    if days < 1:
        return f"--days 必须至少为 1，实为 {days}，未开始运行 (--days must be at least 1, nothing was run)"
    start, last = dt.date.fromisoformat(PARTITION_START), last_partition_day(now)
    end = first + dt.timedelta(days=days - 1)
    if start <= first and end <= last:
        return None
    asked = first.isoformat() if days == 1 else f"{first.isoformat()} 至 {end.isoformat()}（--days {days}）"
    why_cn, why_en = (("早于首个分区", "is before the first partition") if first < start
                      else ("晚于最后一个分区（当天尚未结束或在未来）", "runs past the last partition (yesterday)"))
    return (f"日期超出分区范围：{asked} {why_cn}，可运行的分区为 {start.isoformat()} 至 {last.isoformat()}"
            f"（北京时间），未开始运行 (date {why_en}; partitions are {start.isoformat()}..{last.isoformat()}, "
            f"nothing was run)")


def preflight_problems() -> list[str]:
    """Every configuration problem found without touching the warehouse (empty when the night can start)."""
    from zqdata.desensitize import DesensitizationError, key_from_env
    from zqdata.settings import get_settings

    problems: list[str] = []
    try:
        settings = get_settings()
    except ValueError as exc:
        return [str(exc)]
    try:
        key_from_env()
    except DesensitizationError as exc:
        problems.append(str(exc))
    for label, path in (("数据目录 data dir (ZQ_DATA_DIR)", settings.data_dir),
                        ("政务库目录 gov DB folder (ZQ_GOV_DB)", settings.gov_db.parent),
                        ("运营库目录 ops DB folder (ZQ_OPS_DB)", settings.ops_db.parent)):
        problem = _writable_folder(path)
        if problem:
            problems.append(f"{label} {path}: {problem}")
    try:
        from zqdata.storage import store_from_env

        store = store_from_env()
        store.exists("_zq_preflight")  # one bounded request: the store answers (timeouts in zqdata.storage)
    except Exception as exc:  # noqa: BLE001 - reported, the night does not start
        problems.append(f"对象存储不可用 landing store unreachable: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return problems


def _writable_folder(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".zq-preflight-"):
            pass
    except OSError as exc:
        return f"不可写 not writable ({exc.strerror or exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "不可写 not writable"
    return None
