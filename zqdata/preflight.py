"""Settings validated before any work (issue 17): a night that cannot finish should not start.

`zq nightly` calls `preflight_problems()` first and stops with the list when it is not empty, instead of discovering
an empty key after the whole gov side ran or a bad memory limit in the first dbt step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
