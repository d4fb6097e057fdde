"""The one crossing from 市政务大数据平台 (gov DB) to 市公共数据资源运营服务平台 (ops DB) (Arts. 2, 19, 23, 29).

Only this module reads the gov DB and writes the ops DB. Per partition it writes ``desensitized.<dataset>`` (released
fields after each field's mask rule) and, for each scenario, ``scenario_<code>.<dataset>`` (authorized fields only,
consented subjects only). Masking runs in the gov-side DuckDB query; masked Arrow batches stream into the ops DB,
so raw values never enter the ops connection. ``find_leaks`` is the leak gate: raw ID numbers, phones and names
of the gov platform must never appear in any ops table.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from zqdata.authorization import AuthorizationError, authorized_fields, check_scenario_active
from zqdata.desensitize import PseudonymKey, quote_ident, release_select, released_fields
from zqdata.registry import Dataset, Registry, Scenario
from zqdata.settings import TZ

BATCH_ROWS = 100_000  # Arrow batch size streamed gov → ops: bounded memory whatever the partition size
LINEAGE_COLUMNS = ["_lineage_id", "_partition_date"]
CONSENT_DATASET = "subject_consent"


class BoundaryError(RuntimeError):
    """The crossing cannot run: a missing gov model, a missing field, or a scenario that cannot be consent-filtered."""


@dataclass
class BoundaryReport:
    """What one crossing wrote, per table, and which scenarios were blocked and why."""

    partition_date: dt.date
    sources: dict[str, str] = field(default_factory=dict)  # dataset -> gov relation read
    released: dict[str, int] = field(default_factory=dict)  # dataset -> rows in desensitized.<dataset>
    scenario_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # scenario -> dataset -> rows
    consent_excluded: dict[str, dict[str, int]] = field(default_factory=dict)  # rows dropped for lack of consent
    blocked: dict[str, str] = field(default_factory=dict)  # scenario -> reason (nothing written)


def _relation_columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
        [schema, table],
    ).fetchall()
    return {name: dtype for name, dtype in rows}


def gov_relation(gov_con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str) -> str:
    """The gov model the crossing reads for ``dataset``: ``intermediate.int_<dataset>``, else its staging model."""
    ds = registry.datasets[dataset]
    candidates = [("intermediate", f"int_{dataset}"), ("staging", f"stg_{ds.agency}__{dataset}")]
    for schema, table in candidates:
        if _relation_columns(gov_con, schema, table):
            return f"{schema}.{table}"
    names = " / ".join(f"{s}.{t}" for s, t in candidates)
    raise BoundaryError(f"市政务大数据平台缺少 {dataset} 的模型 {names} (gov model missing: run dbt for the gov target first)")


def _check_columns(gov_con: duckdb.DuckDBPyConnection, relation: str, needed: list[str]) -> dict[str, str]:
    schema, table = relation.split(".", 1)
    cols = _relation_columns(gov_con, schema, table)
    missing = [c for c in needed if c not in cols]
    if missing:
        raise BoundaryError(f"{relation} 缺少字段 {missing} (gov model lacks columns)")
    return cols


def _params(sql: str, params: dict) -> dict:
    # DuckDB refuses named parameters the statement does not use.
    return {k: v for k, v in params.items() if re.search(r"\$" + k + r"\b", sql)}


def consent_filter_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenario: Scenario, dataset: Dataset,
                       partition_date: dt.date) -> tuple[str, dict]:
    """A WHERE clause keeping only subjects whose latest consent for ``scenario`` at the end of the day is granted."""
    if dataset.consent is None or dataset.consent.subject_type != scenario.consent_required:
        raise BoundaryError(
            f"场景 {scenario.code} 要求 {scenario.consent_required} 授权，但数据集 {dataset.code} 无对应主体字段 "
            f"(scenario needs {scenario.consent_required} consent; dataset {dataset.code} has no such subject field)"
        )
    return _granted_for_any_sql(gov_con, registry, [scenario.code], dataset, partition_date)


def release_consent_filter_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, dataset: Dataset,
                               partition_date: dt.date) -> tuple[str, dict]:
    """Art. 2 for desensitized.<dataset>: personal information and trade secrets cross only for subjects who authorized
    at least one scenario in force that day (each scenario's own tables then keep only its own consents); a dataset
    without a consent subject crosses whole."""
    if dataset.consent is None:
        return "TRUE", {}
    scenarios = [s.code for s in registry.scenarios.values()
                 if s.status == "active" and s.valid_from <= partition_date <= s.valid_to]
    if not scenarios:
        return "FALSE", {}  # nobody could have authorized a use: nothing of these subjects leaves the domain
    return _granted_for_any_sql(gov_con, registry, scenarios, dataset, partition_date)


def _granted_for_any_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenarios: list[str],
                         dataset: Dataset, partition_date: dt.date) -> tuple[str, dict]:
    """Subjects whose latest consent record (as of the end of the day) for any of ``scenarios`` is a grant."""
    relation = gov_relation(gov_con, registry, CONSENT_DATASET)
    cols = _check_columns(gov_con, relation, ["subject_type", "subject_id", "scenario_code", "status", "effective_at",
                                              "_partition_date"])
    end_naive = dt.datetime.combine(partition_date + dt.timedelta(days=1), dt.time())
    etype = cols["effective_at"].upper()
    if "TIME ZONE" in etype:
        effective, end = "c.effective_at", end_naive.replace(tzinfo=TZ)
    elif etype.startswith("TIMESTAMP"):
        effective, end = "c.effective_at", end_naive  # naive timestamps are Beijing time (registry)
    else:
        effective, end = "TRY_CAST(c.effective_at AS TIMESTAMP)", end_naive
    subject = f"src.{quote_ident(dataset.consent.subject_field)}"
    # Latest record per subject as of the end of the day; on a tie a revocation wins.
    sql = f"""{subject} IN (
        SELECT subject_id FROM (
            SELECT trim(c.subject_id) AS subject_id, lower(trim(c.status)) AS status,
                   row_number() OVER (PARTITION BY trim(c.subject_id), trim(c.scenario_code)
                                      ORDER BY {effective} DESC, (lower(trim(c.status)) = 'revoked') DESC,
                                               c._partition_date DESC) AS rn
            FROM {relation} AS c
            WHERE trim(c.scenario_code) IN (SELECT unnest($zq_scenarios::VARCHAR[]))
              AND lower(trim(c.subject_type)) = $zq_subject_type
              AND c._partition_date <= $zq_partition AND {effective} < $zq_consent_end
        ) WHERE rn = 1 AND status = 'granted')"""
    return sql, {"zq_scenarios": scenarios, "zq_subject_type": dataset.consent.subject_type,
                 "zq_consent_end": end}


def _write_partition(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, schema: str, table: str,
                     sql: str, params: dict, partition_date: dt.date) -> int:
    """Replace one partition of ``schema.table`` in the ops DB with the rows of a gov-side query, streamed as Arrow."""
    target = f"{quote_ident(schema)}.{quote_ident(table)}"
    reader = gov_con.execute(sql, _params(sql, params)).to_arrow_reader(BATCH_ROWS)
    ops_con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    ops_con.register("_zq_boundary_empty", pa.Table.from_batches([], reader.schema))
    try:
        columns = ops_con.execute("DESCRIBE SELECT * FROM _zq_boundary_empty").fetchall()
    finally:
        ops_con.unregister("_zq_boundary_empty")
    # Explicit DDL, not CREATE TABLE AS: in DuckDB 1.5.5 a CTAS followed by a large INSERT in the same
    # transaction silently keeps 0 rows (found by the 200k-row check in tests/test_boundary.py).
    ddl = ", ".join(f"{quote_ident(name)} {ctype}" for name, ctype, *_ in columns)
    ops_con.execute(f"CREATE TABLE IF NOT EXISTS {target} ({ddl})")
    ops_con.execute(f"DELETE FROM {target} WHERE _partition_date = ?", [partition_date])
    ops_con.register("_zq_boundary_batches", reader)
    try:
        ops_con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM _zq_boundary_batches")
    finally:
        ops_con.unregister("_zq_boundary_batches")
    return ops_con.execute(f"SELECT count(*) FROM {target} WHERE _partition_date = ?", [partition_date]).fetchone()[0]


def _count(gov_con: duckdb.DuckDBPyConnection, relation: str, partition_date: dt.date) -> int:
    return gov_con.execute(f"SELECT count(*) FROM {relation} WHERE _partition_date = ?", [partition_date]).fetchone()[0]


def cross_boundary(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, registry: Registry,
                   partition_date: dt.date | str, key: PseudonymKey, strict: bool = True) -> BoundaryReport:
    """Cross one partition gov → ops in ONE ops transaction (a failure leaves the previous state).

    A revoked or expired scenario gets nothing written; with ``strict`` an AuthorizationError naming it is raised
    after the rest has been committed (``exc.report`` holds the report); otherwise it is only listed in ``report.blocked``.
    """
    d = dt.date.fromisoformat(partition_date) if isinstance(partition_date, str) else partition_date
    report = BoundaryReport(partition_date=d)
    base = {**key.params(), "zq_partition": d}
    # Resolve every input before writing anything, so a missing model fails without a partial crossing.
    released = [ds for ds in registry.datasets.values() if ds.release]
    for ds in released:
        report.sources[ds.code] = gov_relation(gov_con, registry, ds.code)
        _check_columns(gov_con, report.sources[ds.code], ds.field_names + LINEAGE_COLUMNS)

    ops_con.execute("BEGIN TRANSACTION")
    try:
        for ds in released:
            relation = report.sources[ds.code]
            items = release_select(ds, released_fields(ds), d)
            where, consent_params = release_consent_filter_sql(gov_con, registry, ds, d)
            sql = (f"SELECT {', '.join(items)}, src._lineage_id, src._partition_date "
                   f"FROM {relation} AS src WHERE src._partition_date = $zq_partition AND {where}")
            report.released[ds.code] = _write_partition(gov_con, ops_con, "desensitized", ds.code, sql,
                                                        {**base, **consent_params}, d)

        for scenario in registry.scenarios.values():
            try:
                check_scenario_active(scenario, d)
            except AuthorizationError as exc:
                report.blocked[scenario.code] = str(exc)
                continue
            rows, dropped = {}, {}
            for ds_code in scenario.authorized_fields:
                ds = registry.datasets[ds_code]
                if not ds.release:
                    raise AuthorizationError(f"场景 {scenario.code} 不得使用不发布的数据集 {ds_code} (dataset never released)")
                relation = report.sources[ds_code]
                items = release_select(ds, authorized_fields(registry, scenario.code, ds_code), d)
                where, consent_params = "TRUE", {}
                if scenario.consent_required:
                    where, consent_params = consent_filter_sql(gov_con, registry, scenario, ds, d)
                sql = (f"SELECT {', '.join(items)}, src._lineage_id, src._partition_date FROM {relation} AS src "
                       f"WHERE src._partition_date = $zq_partition AND {where}")
                rows[ds_code] = _write_partition(gov_con, ops_con, f"scenario_{scenario.code}", ds_code, sql,
                                                 {**base, **consent_params}, d)
                dropped[ds_code] = _count(gov_con, relation, d) - rows[ds_code]
            report.scenario_rows[scenario.code] = rows
            report.consent_excluded[scenario.code] = dropped
        ops_con.execute("COMMIT")
    except Exception:
        ops_con.execute("ROLLBACK")
        raise
    if strict and report.blocked:
        exc = AuthorizationError("；".join(report.blocked.values()))
        exc.report = report  # type: ignore[attr-defined]
        raise exc
    return report


# ---------------------------------------------------------------------------------------------------------------
# Art. 2 exclusions and the leak gate


def check_exclusions(ops_con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str,
                     partition_date: dt.date) -> list[str]:
    """Problems with the ops tables of ``dataset`` under Art. 2 (empty when respected).

    desensitized.<dataset> holds exactly the released fields; no suppressed/confidential field anywhere in ops;
    scenario tables hold only authorized fields; pseudonyms are 64-hex, masked values contain ``*``, age bands are bands.
    """
    ds = registry.datasets[dataset]
    problems: list[str] = []
    tables = ops_con.execute(
        "SELECT DISTINCT table_schema FROM information_schema.tables WHERE table_name = ?", [dataset]
    ).fetchall()
    schemas = [s for (s,) in tables]
    if not ds.release and schemas:
        problems.append(f"不发布的数据集 {dataset} 出现在运营平台 {schemas} (release: false dataset found in ops)")
    forbidden = {f.name for f in ds.fields if f.mask.method == "suppress" or f.class_.confidential}
    for schema in schemas:
        cols = set(_relation_columns(ops_con, schema, dataset))
        leaked = sorted(cols & forbidden)
        if leaked:
            problems.append(f"{schema}.{dataset} 含有不得出域的字段 {leaked} (suppressed/confidential fields present)")
        if schema == "desensitized":
            expected = set(released_fields(ds)) | set(LINEAGE_COLUMNS)
            if cols != expected:
                problems.append(f"desensitized.{dataset} 字段与发布规则不符 (columns differ from the released fields): "
                                f"extra {sorted(cols - expected)}, missing {sorted(expected - cols)}")
        elif schema.startswith("scenario_"):
            code = schema.removeprefix("scenario_")
            allowed = set(registry.scenarios[code].authorized_fields.get(dataset, [])) if code in registry.scenarios else set()
            extra = sorted(cols - allowed - set(LINEAGE_COLUMNS))
            if extra:
                problems.append(f"{schema}.{dataset} 含有未授权字段 {extra} (unauthorized fields)")
        problems.extend(_shape_problems(ops_con, ds, schema, cols, partition_date))
    return problems


_SHAPES = {"pseudonymize": r"^[0-9a-f]{64}$", "mask": r"\*", "age_band": r"^[0-9]+-[0-9]+$"}


def _shape_problems(ops_con: duckdb.DuckDBPyConnection, ds: Dataset, schema: str, cols: set[str],
                    partition_date: dt.date) -> list[str]:
    problems = []
    target = f"{quote_ident(schema)}.{quote_ident(ds.code)}"
    for f in ds.fields:
        pattern = _SHAPES.get(f.mask.method)
        if pattern is None or f.name not in cols:
            continue
        col = quote_ident(f.name)
        bad = ops_con.execute(
            f"SELECT count(*) FROM {target} WHERE _partition_date = ? AND {col} IS NOT NULL "
            f"AND NOT regexp_matches(CAST({col} AS VARCHAR), ?)",
            [partition_date, pattern],
        ).fetchone()[0]
        if bad:
            problems.append(f"{schema}.{ds.code}.{f.name}: {bad} 行未按 {f.mask.method} 脱敏 (values not desensitized)")
    return problems


# The leak gate lives in zqdata.leakgate; re-exported here for existing callers.
from zqdata.leakgate import Leak, find_leaks, gov_personal_values, personal_value_fields  # noqa: E402,F401
