"""Settings from the environment that change how the warehouse runs."""

from __future__ import annotations

import pytest

from orchestration.resources import WarehouseResource
from zqdata.settings import get_settings


def test_every_warehouse_connection_gets_the_duckdb_memory_limit(tmp_path, monkeypatch) -> None:
    """DuckDB's default would be 80 % of RAM; the limit keeps the nightly job bounded (it spills beyond it)."""
    monkeypatch.setenv("ZQ_DUCKDB_MEMORY_LIMIT", "300MB")
    wh = WarehouseResource(gov_db=str(tmp_path / "gov.duckdb"), ops_db=str(tmp_path / "ops.duckdb"))
    with wh.gov() as gov, wh.ops() as ops:
        for con in (gov, ops):
            assert con.execute("select current_setting('memory_limit')").fetchone()[0] == "286.1 MiB"
    with wh.gov(read_only=True) as gov:
        assert gov.execute("select current_setting('memory_limit')").fetchone()[0] == "286.1 MiB"


@pytest.mark.parametrize("value", ["80%", "lots", "1 G", "-1GB"])
def test_a_malformed_memory_limit_is_a_clear_error(monkeypatch, value: str) -> None:
    monkeypatch.setenv("ZQ_DUCKDB_MEMORY_LIMIT", value)
    with pytest.raises(ValueError, match="ZQ_DUCKDB_MEMORY_LIMIT must be a size"):
        get_settings()
