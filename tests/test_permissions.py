"""The data folder holds personal data: created private (folder 0700, files 0600) whatever the caller's umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _run(code: str, data_dir: Path) -> None:
    env = {**os.environ, "ZQ_DATA_DIR": str(data_dir), "ZQ_STORE_BACKEND": "local"}
    for var in ("ZQ_LANDING_DIR", "ZQ_GOV_DB", "ZQ_OPS_DB", "ZQ_OPDB_URL"):
        env.pop(var, None)
    # a permissive umask, as a login shell often has: the platform must not inherit it
    subprocess.run([sys.executable, "-c", "import os; os.umask(0o022)\n" + textwrap.dedent(code)], env=env, check=True,
                   timeout=600)


def test_cli_creates_private_landing_files_and_operational_db(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    _run("""
        from zqdata.cli import main
        main(["simulate", "--date", "2025-06-01", "--rows-per-day", "200"])
        main(["issues", "list"])
    """, data_dir)
    assert _mode(data_dir) == 0o700
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files) and any("landing" in p.parts for p in files)
    assert {oct(_mode(p)) for p in files} == {oct(0o600)}
    assert {oct(_mode(p)) for p in data_dir.rglob("*") if p.is_dir()} == {oct(0o700)}


def test_processes_that_load_the_code_location_create_private_warehouse_files(tmp_path):
    data_dir = tmp_path / "data"
    _run("""
        from orchestration.definitions import defs
        from orchestration.resources import WarehouseResource
        defs()
        with WarehouseResource().gov() as con:
            con.execute("create table t as select 1 as x")
    """, data_dir)
    db = data_dir / "warehouse" / "gov_platform.duckdb"
    assert _mode(db) == 0o600 and _mode(db.parent) == 0o700
