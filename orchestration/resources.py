"""Resources, configured from the environment (one class each; no per-environment dicts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb

from zqdata.settings import get_settings


class WarehouseResource(dg.ConfigurableResource):
    """The two security domains: the gov big-data platform DB and the operations platform DB (separate files)."""

    gov_db: str = ""
    ops_db: str = ""

    def gov_path(self) -> Path:
        return Path(self.gov_db) if self.gov_db else get_settings().gov_db

    def ops_path(self) -> Path:
        return Path(self.ops_db) if self.ops_db else get_settings().ops_db

    @contextlib.contextmanager
    def gov(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        yield from _connect(self.gov_path(), read_only)

    @contextlib.contextmanager
    def ops(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        yield from _connect(self.ops_path(), read_only)


def _connect(path: Path, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        yield con
    finally:
        con.close()
