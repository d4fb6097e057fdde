"""The leak gate (泄露闸门): raw personal values of the gov platform must never appear in any ops table (Arts. 2, 24).

Split from zqdata.boundary (the crossing itself); ``find_leaks`` scans the ops DB against the gov value set.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from zqdata.desensitize import quote_ident
from zqdata.registry import Registry


def _relation_columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
        [schema, table],
    ).fetchall()
    return {name: dtype for name, dtype in rows}


@dataclass(frozen=True)
class Leak:
    """Raw personal values of the gov platform found in an ops column (``sample`` is itself masked)."""

    table: str
    column: str
    kind: str  # citizen_id | mobile | name
    rows: int
    sample: str


def personal_value_fields(registry: Registry) -> dict[str, dict[str, str]]:
    """dataset -> {field: kind} of raw identifiers the leak gate looks for: ID numbers, mobiles, personal names."""
    out: dict[str, dict[str, str]] = {}
    for ds in registry.datasets.values():
        for f in ds.fields:
            if f.class_.pi == "none":
                continue
            if f.format in ("citizen_id", "mobile"):
                out.setdefault(ds.code, {})[f.name] = f.format
            elif f.name == "name" or f.name.endswith("_name"):
                out.setdefault(ds.code, {})[f.name] = "name"
    return out


def gov_personal_values(gov_con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date) -> pa.Table:
    """Distinct (kind, value) of raw personal identifiers on the gov platform up to ``partition_date``, as Arrow."""
    selects = []
    for dataset, fields in personal_value_fields(registry).items():
        ds = registry.datasets[dataset]
        relations = [("ods", dataset), ("staging", f"stg_{ds.agency}__{dataset}"), ("intermediate", f"int_{dataset}")]
        staged: set[str] = set()
        for schema, table in relations:
            cols = _relation_columns(gov_con, schema, table)
            if "_partition_date" not in cols:
                continue
            names = [n for n in fields if n in cols]
            if schema == "staging":
                staged = set(names)
            elif schema == "intermediate" and set(names) <= staged:
                # int_<dataset> is its staging model minus rejected rows (models/gov/intermediate): no value it holds
                # is missing from staging, and this scan covers all history, so reading it again only costs time
                continue
            for name, kind in fields.items():
                if name in cols:
                    selects.append(
                        f"SELECT '{kind}' AS kind, upper(trim(CAST({quote_ident(name)} AS VARCHAR))) AS value "
                        f"FROM {schema}.{quote_ident(table)} WHERE _partition_date <= $zq_partition"
                    )
    if not selects:
        return pa.table({"kind": pa.array([], pa.string()), "value": pa.array([], pa.string())})
    # A one-character "name" would match ordinary text; real names have at least two characters.
    sql = f"SELECT DISTINCT kind, value FROM ({' UNION ALL '.join(selects)}) WHERE length(value) >= 2"
    return gov_con.execute(sql, {"zq_partition": partition_date}).fetch_arrow_table()


_VALUE_SET_CACHE: dict[tuple, pa.Table] = {}  # one entry: the latest (gov file version, partition) in this process


def _read_only_file_version(gov_con: duckdb.DuckDBPyConnection) -> tuple | None:
    """(path, size and mtime of the file and of its WAL) of a gov DB opened read-only; None otherwise.

    Read-only: nothing can change the file while the connection is open (DuckDB's lock), and any later write
    changes size or mtime, so the key names one version of the data. In-memory or writable DBs are never cached.
    """
    if gov_con.execute("SELECT current_setting('access_mode')").fetchone()[0] != "read_only":
        return None
    row = gov_con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    if not row or not row[0]:
        return None
    path = Path(row[0]).resolve()
    stats = []
    for f in (path, path.with_name(path.name + ".wal")):
        try:
            st = f.stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            stats.append(None)
    return (str(path), *stats)


def cached_gov_personal_values(gov_con: duckdb.DuckDBPyConnection, registry: Registry,
                               partition_date: dt.date) -> pa.Table:
    """`gov_personal_values`, computed once per gov file version and partition in this process.

    A night runs three leak gates (the boundary and one per product) on the same gov data: the all-history
    DISTINCT is the part of each gate that grows with history, so the later gates reuse the first one's set.
    """
    version = _read_only_file_version(gov_con)
    if version is None:
        return gov_personal_values(gov_con, registry, partition_date)
    key = (version, partition_date, tuple(sorted((d, tuple(sorted(f.items())))
                                                 for d, f in personal_value_fields(registry).items())))
    if key not in _VALUE_SET_CACHE:
        _VALUE_SET_CACHE.clear()
        _VALUE_SET_CACHE[key] = gov_personal_values(gov_con, registry, partition_date)
    return _VALUE_SET_CACHE[key]


def _mask_sample(value: str) -> str:
    return value[:1] + "*" * max(len(value) - 2, 1) + value[-1:] if len(value) > 2 else "*" * len(value)


def find_leaks(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, partition_date: dt.date | str,
               registry: Registry | None = None, all_partitions: bool = False,
               tables: Collection[str] | None = None) -> list[Leak]:
    """Every ops VARCHAR column holding a raw gov ID number, mobile or name (zero allowed).

    Tables with ``_partition_date`` are scanned for that partition (``all_partitions`` for a full sweep); others whole.
    ``tables`` (``"schema.table"`` names) limits the scan, e.g. a product gate checking its own product only.
    ID numbers and mobiles are also found inside longer text. The gov value set is registered on the ops
    connection only for the scan (an Arrow view, never written to the ops DB).
    """
    if registry is None:
        from zqdata.registry import registry as _registry

        registry = _registry()
    d = dt.date.fromisoformat(partition_date) if isinstance(partition_date, str) else partition_date
    values = cached_gov_personal_values(gov_con, registry, d)
    if values.num_rows == 0:
        return []
    columns = ops_con.execute(
        "SELECT c.table_schema, c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
        "WHERE c.data_type = 'VARCHAR' AND c.table_catalog = current_database() "
        "ORDER BY 1, 2, 3"
    ).fetchall()
    if tables is not None:  # the scan is per column and costly at scale: skip what the caller does not ask about
        wanted = set(tables)
        columns = [c for c in columns if f"{c[0]}.{c[1]}" in wanted]
    partitioned = {
        (s, t) for s, t in ops_con.execute(
            "SELECT table_schema, table_name FROM information_schema.columns WHERE column_name = '_partition_date' "
            "AND table_catalog = current_database()").fetchall()
    }
    leaks: list[Leak] = []
    if not columns:
        return leaks
    # One query over every column: the gov value set (all history, millions of values) is hashed once per scan,
    # not once per ops column.
    ctes, branches = [], []
    for i, (schema, table, column) in enumerate(columns):
        col = quote_ident(column)
        target = f"{quote_ident(schema)}.{quote_ident(table)}"
        scope = "TRUE" if all_partitions or (schema, table) not in partitioned else "_partition_date = $zq_partition"
        ctes.append(f"vals_{i} AS (SELECT DISTINCT {col} AS v FROM {target} WHERE {col} IS NOT NULL AND {scope})")
        # the whole value and the ID/mobile tokens standing alone inside it (a digit run inside a 64-hex pseudonym is
        # not a mobile number); one reference to vals_i, so DuckDB streams it instead of materializing every column
        branches.append(
            f"SELECT {i} AS c, v, upper(unnest(list_prepend(trim(v), regexp_extract_all(v, "
            f"'(?:^|[^0-9A-Za-z])([0-9]{{17}}[0-9Xx]|1[3-9][0-9]{{9}})(?:[^0-9A-Za-z]|$)', 1)))) AS tok FROM vals_{i}")
    sql = (f"WITH {', '.join(ctes)}, tokens AS ({' UNION ALL '.join(branches)}) "
           "SELECT tokens.c, g.kind, count(DISTINCT tokens.v), min(tokens.tok) "
           "FROM tokens JOIN _zq_gov_personal_values AS g ON tokens.tok = g.value "
           "GROUP BY tokens.c, g.kind ORDER BY tokens.c, g.kind")
    params = {"zq_partition": d} if "$zq_partition" in sql else {}
    ops_con.register("_zq_gov_personal_values", values)
    try:
        for c, kind, rows, sample in ops_con.execute(sql, params).fetchall():
            schema, table, column = columns[c]
            leaks.append(Leak(table=f"{schema}.{table}", column=column, kind=kind, rows=rows,
                              sample=_mask_sample(sample)))
    finally:
        ops_con.unregister("_zq_gov_personal_values")
    return leaks
