"""One way to open a security domain's warehouse, whatever the mode (issue 16).

Embedded default: the domain's DuckDB file (``ZQ_GOV_DB`` / ``ZQ_OPS_DB``), exactly as before. ``ZQ_WAREHOUSE=ducklake``:
the domain's DuckLake (``zqdata.lakes.connect_lake``), attached under the file's catalog name (``gov_platform`` /
``ops_platform``), so 3-part names and ``current_database()`` read the same in both modes. Every place outside the
Dagster resource that opens a warehouse (the CLI, column lineage, the nightly summary) goes through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb

from zqdata import lakes

DOMAINS = lakes.DOMAINS


def lake_mode() -> bool:
    """True when ``ZQ_WAREHOUSE=ducklake`` (the warehouse is two DuckLakes, not two DuckDB files)."""
    return lakes.warehouse_mode() == "ducklake"


def domain_path(domain: str) -> Path:
    """The DuckDB file of ``domain`` in the embedded mode (settings)."""
    from zqdata.settings import get_settings

    lakes._check_domain(domain)
    s = get_settings()
    return s.gov_db if domain == "gov" else s.ops_db


def exists(domain: str, path: Path | str | None = None) -> bool:
    """Whether the domain's warehouse exists: its file (embedded), always for a configured lake."""
    return True if lake_mode() else Path(path or domain_path(domain)).exists()


def connect(domain: str, path: Path | str | None = None, read_only: bool = False,
            memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A connection to the domain's warehouse with DuckDB's memory limit (settings when not given).

    Embedded: ``path`` (default the domain's file; its folder is made, as before) opened with ``SET memory_limit`` (not
    ``config=``: a file already open in this process with another configuration would refuse it)."""
    from zqdata.settings import get_settings

    limit = memory_limit or get_settings().duckdb_memory_limit
    if lake_mode():
        try:
            return lakes.connect_lake(domain, read_only=read_only, memory_limit=limit)
        except duckdb.InvalidInputException as exc:
            if not read_only or "does not exist" not in str(exc):
                raise
            # a reader before the first writer (a DuckDB file is created by its first connection too): the lake's
            # catalog tables are created once, empty, then it is opened read-only
            lakes.connect_lake(domain, memory_limit=limit).close()
            return lakes.connect_lake(domain, read_only=True, memory_limit=limit)
    file = Path(path or domain_path(domain))
    file.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(file), read_only=read_only)
    try:
        con.execute(f"SET memory_limit = '{limit}'")  # validated by get_settings()
    except BaseException:
        con.close()
        raise
    return con


def connect_read_only_waiting(domain: str, path: Path | str | None = None,
                              wait_seconds: float | None = None) -> duckdb.DuckDBPyConnection:
    """Read-only, from outside a run (the CLI): a DuckDB file waits (bounded) while a step writes it
    (``zqdata.readonly``); a lake has no such lock, its readers see the last committed snapshot."""
    if lake_mode():
        return lakes.connect_lake(domain, read_only=True)
    from zqdata.readonly import connect_read_only

    return connect_read_only(path or domain_path(domain), wait_seconds)



def tables(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(schema, table) of every base table of the connected warehouse (its own catalog only)."""
    return [tuple(r) for r in con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        "AND table_type = 'BASE TABLE' ORDER BY 1, 2").fetchall()]


class _Frozen:
    """One connection's catalog, read at the first question of each kind."""

    def __init__(self) -> None:
        self.tables: set[tuple[str, str]] | None = None
        self.columns: dict[tuple[str, str], dict[str, str]] | None = None
        self.rows: dict[tuple, object] = {}  # `frozen_rows`


_FROZEN: dict[int, _Frozen] = {}  # id(connection) -> its catalog, inside `frozen_catalog`


@contextlib.contextmanager
def frozen_catalog(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Inside the block, `table_exists`, `existing_tables` and `relation_columns` on ``con`` answer
    from ONE catalog read (made at the first question). For a connection whose catalog cannot change while the block
    runs: read-only, its file's pool held (the issues step traces ~45 issues a day, each asking which tables exist; the
    crossing asks for a gov model's columns several times per dataset and day; issue 15)."""
    key = id(con)
    _FROZEN[key] = _Frozen()
    try:
        yield
    finally:
        _FROZEN.pop(key, None)


def _frozen(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]] | None:
    frozen = _FROZEN.get(id(con))
    if frozen is None:
        return None
    if frozen.tables is None:
        frozen.tables = _catalog(con, None)
    return frozen.tables


def frozen_columns(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], dict[str, str]] | None:
    """{(schema, table): {column: type}} of ``con`` inside `frozen_catalog` (read once), else None."""
    frozen = _FROZEN.get(id(con))
    if frozen is None:
        return None
    if frozen.columns is None:
        frozen.columns = {}
        for s, t, c, dtype in con.execute(
                "select schema_name, table_name, column_name, data_type from duckdb_columns() where not internal "
                "order by database_name, schema_name, table_name, column_index").fetchall():
            frozen.columns.setdefault((s, t), {}).setdefault(c, dtype)
    return frozen.columns


def relation_columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dict[str, str]:
    """{column: DuckDB type} of the table or view ``schema.table``, in order (empty when it does not exist).

    Inside `frozen_catalog` from the catalog read once. Else by binding ``SELECT * FROM schema.table LIMIT 0``
    (~0.1 ms): a filtered ``duckdb_columns()`` lists every column of the database first (2-10 ms in a gov DB of
    ~180 relations; asked a few times per dataset and day: issue 15). A relation that does not bind (missing, or a
    view over a missing table) is looked up in the catalog, as before."""
    frozen = frozen_columns(con)
    if frozen is not None:
        return dict(frozen.get((schema, table), {}))
    name = ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))
    try:
        rel = con.sql(f"SELECT * FROM {name} LIMIT 0")
        return dict(zip(rel.columns, (str(t) for t in rel.dtypes)))
    except duckdb.Error:
        pass
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? AND NOT internal "
        "ORDER BY column_index", [schema, table]).fetchall()
    return {column: dtype for column, dtype in rows}


def frozen_rows(con: duckdb.DuckDBPyConnection) -> dict[tuple, object] | None:
    """Inside `frozen_catalog`: a memo of rows read from the tables only the ingestion writes (ODS, quarantine,
    meta.deliveries), which no step running such a block writes; lineage traces keep what they read there (a day's ~45
    traces read the same deliveries and rows; issue 15). `zqdata.lineage.prefetch_source_rows` starts it afresh for
    each day. None outside the block."""
    frozen = _FROZEN.get(id(con))
    return None if frozen is None else frozen.rows


def _catalog(con: duckdb.DuckDBPyConnection, schemas: list[str] | None) -> set[tuple[str, str]]:
    """(schema, table) of the tables and views of ``schemas`` (None: of every schema), in one catalog query."""
    where = "" if schemas is None else " where list_contains(?, schema_name)"
    return {(s, t) for s, t in con.execute(
        f"select schema_name, table_name from duckdb_tables(){where} union all "
        f"select schema_name, view_name from duckdb_views(){where}", [] if schemas is None else [schemas, schemas]
    ).fetchall()}


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """Whether a table or view `schema.table` exists. DuckDB's own catalog functions: a filtered
    information_schema.tables query took ~10 ms, ~1.5 ms this way, and a trace asks once per delivery it names."""
    frozen = _frozen(con)
    if frozen is not None:
        return (schema, table) in frozen
    return bool(con.execute(
        "select exists(select 1 from duckdb_tables() where schema_name = ? and table_name = ? "
        "union all select 1 from duckdb_views() where schema_name = ? and view_name = ?)",
        [schema, table, schema, table]).fetchone()[0])


def existing_tables(con: duckdb.DuckDBPyConnection, schemas: Iterable[str]) -> set[tuple[str, str]]:
    """(schema, table) of the tables and views of `schemas`, in one catalog query."""
    names = list(schemas)
    frozen = _frozen(con)
    if frozen is not None:
        return {(s, t) for s, t in frozen if s in names}
    return _catalog(con, names)


def table_columns(con: duckdb.DuckDBPyConnection, schema: str | None = None) -> dict[tuple[str, str], list[str]]:
    """{(schema, table): its columns in order} of every table and view (of one schema), in one catalog query."""
    out: dict[tuple[str, str], list[str]] = {}
    where = " where schema_name = ?" if schema else ""
    for s, t, c in con.execute(
            f"select schema_name, table_name, column_name from duckdb_columns(){where} "
            "order by database_name, schema_name, table_name, column_index", [schema] if schema else []).fetchall():
        out.setdefault((s, t), []).append(c)
    return out


def domain_checksums(con: duckdb.DuckDBPyConnection, ignore_columns: Iterable[str] = (),
                     ignore_types: Iterable[str] = ()) -> dict[str, tuple[int, int, int]]:
    """``lakes.table_checksum`` of every table of the connected warehouse, without the columns named in
    ``ignore_columns`` or whose type starts with one of ``ignore_types`` (what records when, not what): two warehouses
    holding the same data, one in DuckDB files and one in DuckLakes, give equal dicts."""
    ignored, types = {c.lower() for c in ignore_columns}, tuple(t.upper() for t in ignore_types)
    out = {}
    for schema, table in tables(con):
        name = f'"{schema}"."{table}"'
        cols = [c for c, t in con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog = current_database() "
            "AND table_schema = ? AND table_name = ? ORDER BY ordinal_position", [schema, table]).fetchall()
            if c.lower() not in ignored and not str(t).upper().startswith(types)]
        out[f"{schema}.{table}"] = lakes.table_checksum(con, name, cols)
    return out
