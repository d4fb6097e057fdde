"""Column lineage of the dbt models: which upstream (relation, column) pairs every model output column is computed from.

Parsed from the compiled SQL (sqlglot, DuckDB dialect) with the relations' columns read from the DuckDB file after dbt
has finished. Relations are named `<schema>.<table>` (lowercase, no catalog: each dbt target writes one DuckDB file).
Dagster-free: `assets.dbt_common` turns the result into `dagster/column_lineage` metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from sqlglot import exp, parse_one
from sqlglot.errors import SqlglotError
from sqlglot.lineage import lineage

DIALECT = "duckdb"
LINEAGE_RESOURCE_TYPES = ("model", "snapshot")
CACHE_VERSION = 1  # bump when sql_column_lineage's result changes for the same SQL and columns
CACHE_ENTRIES_KEPT = 512  # lineage cache files kept (newest used first); a night reuses ~20
_DAY_LITERAL = re.compile(r"'[0-9]{4}-[0-9]{2}-[0-9]{2}'")

# {relation: {column: duckdb type}}, relation = "<schema>.<table>"
RelationColumns = dict[str, dict[str, str]]
# {output column: [(upstream relation, upstream column), ...]} (sorted, no duplicates)
ColumnLineage = dict[str, list[tuple[str, str]]]


@dataclass
class ManifestLineage:
    """Lineage per model unique_id, and the models whose lineage could not be computed (unique_id -> reason)."""

    by_model: dict[str, ColumnLineage] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def relation_of(relation_name: str) -> str:
    """`"gov"."staging"."stg_x"` (a dbt relation_name) -> `staging.stg_x`."""
    table = exp.to_table(relation_name, dialect=DIALECT)
    return f"{table.db}.{table.name}".lower()


def read_relation_columns(con: duckdb.DuckDBPyConnection, relations: Iterable[str] | None = None) -> RelationColumns:
    """Columns and types of the tables/views of the connected DuckDB file (only `relations` when given)."""
    wanted = {r.lower() for r in relations} if relations is not None else None
    rows = con.execute(
        "select table_schema, table_name, column_name, data_type from information_schema.columns"
        " where table_catalog = current_database() order by table_schema, table_name, ordinal_position"
    ).fetchall()
    out: RelationColumns = {}
    for schema, table, column, data_type in rows:
        relation = f"{schema}.{table}".lower()
        if wanted is None or relation in wanted:
            out.setdefault(relation, {})[column] = data_type
    return out


def read_relation_columns_file(path: str | Path, relations: Iterable[str] | None = None,
                               domain: str | None = None) -> RelationColumns:
    """`read_relation_columns` on a read-only connection closed right away (dbt must have finished writing).

    With ``domain`` and ``ZQ_WAREHOUSE=ducklake``: that domain's lake instead of the file (zqdata.warehouse)."""
    from zqdata import warehouse

    if domain is not None and warehouse.lake_mode():
        con = warehouse.connect(domain, read_only=True)
    else:
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.ConnectionException as e:
            if "different configuration" not in str(e):
                raise
            # this process already holds the file with the default configuration (an in-process dbt adapter, an
            # open resource): DuckDB only lets us share that instance; we still only read
            con = duckdb.connect(str(path))
    try:
        return read_relation_columns(con, relations)
    finally:
        con.close()


def _sqlglot_schema(columns: RelationColumns) -> dict[str, dict[str, dict[str, str]]]:
    nested: dict[str, dict[str, dict[str, str]]] = {}
    for relation, cols in columns.items():
        schema, _, table = relation.partition(".")
        nested.setdefault(schema, {})[table] = dict(cols)
    return nested


def sql_column_lineage(sql: str, columns: RelationColumns) -> ColumnLineage:
    """For each output column of one SELECT: the (relation, column) pairs of physical tables it is computed from.

    Only projections count (as in sqlglot.lineage); filter and join columns are not dependencies.
    `select *` is expanded from `columns`, so every relation read must be in it.
    """
    expression = parse_one(sql, dialect=DIALECT)
    # relations are keyed without catalog: the catalog is the DuckDB file's name, which differs per environment
    for table in expression.find_all(exp.Table):
        table.set("catalog", None)
    # trim_selects only shortens the SQL kept on each node for display; it costs ~5x the walk itself
    nodes = lineage(None, expression, _sqlglot_schema(columns), dialect=DIALECT, trim_selects=False, copy=False)
    out: ColumnLineage = {}
    for column, root in nodes.items():
        deps: set[tuple[str, str]] = set()
        for node in root.walk():
            if node.downstream or not isinstance(node.expression, exp.Expr):
                continue  # only the leaves are physical columns
            table = node.expression if isinstance(node.expression, exp.Table) else node.expression.find(exp.Table)
            if table is None or not table.db:
                continue  # a constant, count(*), or a CTE without a table behind it
            deps.add((f"{table.db}.{table.name}".lower(), exp.to_column(node.name).name.lower()))
        out[column.lower()] = sorted(deps)
    return out


def lineage_cache_key(sql: str, columns: RelationColumns) -> str:
    """What `sql_column_lineage(sql, columns)` depends on, hashed: the SQL with its day literals ('YYYY-MM-DD') made
    equal, the columns and types it was resolved against, sqlglot's version and this module's cache version.

    A night's compiled SQL differs from the last night's only in the partition's day (macros/partition.sql puts it
    in as a literal); a string literal is a constant, never a column a projection reads, so the lineage is the
    same. Any other change (the SQL, an upstream column or type, sqlglot) is another key."""
    import sqlglot

    blob = json.dumps([CACHE_VERSION, sqlglot.__version__, _DAY_LITERAL.sub("'0000-00-00'", sql),
                       sorted((rel, sorted(cols.items())) for rel, cols in columns.items())],
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cached_sql_column_lineage(sql: str, columns: RelationColumns, cache_dir: Path | None) -> ColumnLineage:
    """`sql_column_lineage`, read from `cache_dir` when the same key was computed before (bench/notes.md 17: parsing
    and resolving a night's ~20 models with sqlglot took ~0.9 s of a 1,000-row night), else computed and stored.
    The cache holds relation and column names only (no value of any row); an unreadable entry is recomputed."""
    if cache_dir is None:
        return sql_column_lineage(sql, columns)
    path = cache_dir / f"{lineage_cache_key(sql, columns)}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        os.utime(path)  # recently used: kept by the pruning below
        return {col: [(rel, c) for rel, c in deps] for col, deps in cached.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    result = sql_column_lineage(sql, columns)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next night the parse
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(result, fh, ensure_ascii=False)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole entry or none
        finally:
            Path(tmp).unlink(missing_ok=True)  # only left when the write failed
        prune_lineage_cache(cache_dir)
    return result


def prune_lineage_cache(cache_dir: Path, keep: int = CACHE_ENTRIES_KEPT) -> None:
    """Remove the least recently used entries beyond `keep` (a writer's temporary file is not an entry)."""
    with contextlib.suppress(OSError):
        entries = sorted((p for p in cache_dir.glob("*.json") if not p.name.startswith(".tmp-")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[keep:]:
            stale.unlink(missing_ok=True)


def compiled_sql(node: Mapping[str, Any], target_path: str | Path | None = None) -> str | None:
    """The node's compiled SQL: `compiled_code` of a run-time manifest, else target/compiled/<package>/<path>."""
    code = node.get("compiled_code")
    if code:
        return str(code)
    if target_path is not None:
        path = Path(target_path) / "compiled" / node["package_name"] / node["original_file_path"]
        if path.exists():
            return path.read_text(encoding="utf-8")
    return None


def model_relations(manifest: Mapping[str, Any]) -> dict[str, str]:
    """{unique_id: relation} of the manifest's models, snapshots, seeds and sources that have a relation."""
    out: dict[str, str] = {}
    for section in ("nodes", "sources"):
        for uid, props in manifest.get(section, {}).items():
            if props.get("relation_name"):
                out[uid] = relation_of(props["relation_name"])
    return out


def relations_to_read(manifest: Mapping[str, Any], unique_ids: Iterable[str]) -> set[str]:
    """The relations whose columns the lineage of `unique_ids` needs: the models themselves and their direct parents."""
    relations = model_relations(manifest)
    out: set[str] = set()
    for uid in unique_ids:
        for rid in [uid, *manifest["nodes"][uid].get("depends_on", {}).get("nodes", [])]:
            if rid in relations:
                out.add(relations[rid])
    return out


def manifest_column_lineage(manifest: Mapping[str, Any], columns: RelationColumns,
                            unique_ids: Iterable[str] | None = None,
                            target_path: str | Path | None = None,
                            cache_dir: Path | None = None) -> ManifestLineage:
    """Column lineage of the given models (default: every model with compiled SQL); failures are reported, not raised.
    With `cache_dir`: each model's lineage through `cached_sql_column_lineage`."""
    nodes = manifest.get("nodes", {})
    ids = list(unique_ids) if unique_ids is not None else [
        uid for uid, n in nodes.items() if n.get("resource_type") in LINEAGE_RESOURCE_TYPES]
    result = ManifestLineage()
    for uid in ids:
        node = nodes.get(uid)
        if node is None or node.get("resource_type") not in LINEAGE_RESOURCE_TYPES:
            result.errors[uid] = "不是 dbt 模型 (not a dbt model in the manifest)"
            continue
        sql = compiled_sql(node, target_path)
        if sql is None:
            result.errors[uid] = "清单中没有编译后的 SQL (no compiled SQL: the model did not run)"
            continue
        try:
            lineage_ = cached_sql_column_lineage(sql, columns, cache_dir)
        except (SqlglotError, ValueError, KeyError, RecursionError) as e:
            result.errors[uid] = f"SQL 解析失败 (sqlglot): {type(e).__name__}: {e}"
            continue
        except Exception as e:  # noqa: BLE001 - sqlglot internals raise assorted errors on SQL it half-understands
            result.errors[uid] = f"血缘分析出错 (sqlglot): {type(e).__name__}: {e}"
            continue
        own = columns.get(relation_of(node["relation_name"])) if node.get("relation_name") else None
        if own:
            # the table is the truth: it may carry columns the SQL no longer selects (on_schema_change: append)
            wanted = {c.lower() for c in own}
            lineage_ = {c: deps for c, deps in lineage_.items() if c in wanted}
        result.by_model[uid] = lineage_
    return result
