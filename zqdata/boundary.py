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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from zqdata.authorization import AuthorizationError, authorized_fields, check_scenario_active
from zqdata.desensitize import PseudonymKey, quote_ident, release_select, released_fields
from zqdata.warehouse import relation_columns as _relation_columns
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
    # Retroactive purge (revocation, expiry) and the gate run before COMMIT (issue 11):
    reference_day: dt.date | None = None  # the day whose consent and scenario state applies to every partition
    ended: dict[str, str] = field(default_factory=dict)  # scenario revoked/expired -> reason (its tables emptied)
    purged: dict[str, int] = field(default_factory=dict)  # ops table -> rows deleted from earlier partitions
    purged_lineage: dict[str, list[str]] = field(default_factory=dict)  # product -> lineage ids of purged input rows
    product_days: dict[str, list[dt.date]] = field(default_factory=dict)  # product -> partitions whose rows changed
    gate: GateResult | None = None  # exclusions + leak gate, evaluated inside the ops transaction
    # Quality gate per dataset (issue 12): dataset -> why it was held back; its partition left every ops table.
    held_back: dict[str, str] = field(default_factory=dict)


@dataclass
class GateResult:
    """The Art. 2 gates of one crossing, run on the uncommitted ops data: exclusion problems per dataset and leaks."""

    exclusions: dict[str, list[str]] = field(default_factory=dict)
    leaks: list = field(default_factory=list)  # zqdata.leakgate.Leak

    @property
    def passed(self) -> bool:
        return not self.leaks and not any(self.exclusions.values())

    def problems(self) -> list[str]:
        out = [p for problems in self.exclusions.values() for p in problems]
        out += [f"leak {lk.table}.{lk.column}: {lk.rows} {lk.kind} (e.g. {lk.sample})" for lk in self.leaks]
        return out


class BoundaryGateFailed(BoundaryError):
    """The crossing found an Art. 2 problem or a leak before COMMIT: rolled back, the ops DB is as it was."""

    def __init__(self, report: "BoundaryReport") -> None:
        problems = report.gate.problems() if report.gate else []
        super().__init__("出域门禁未通过，本次出域已回滚 (boundary gate failed: rolled back, nothing committed; "
                         f"exclusion problems / personal data leak): {'; '.join(problems[:10])}")
        self.report = report


Gate = Callable[[duckdb.DuckDBPyConnection, duckdb.DuckDBPyConnection, Registry, dt.date], GateResult]


def run_gates(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, registry: Registry,
              partition_date: dt.date) -> GateResult:
    """``check_exclusions`` for every released dataset and ``find_leaks`` over the ops DB (as the connection sees it)."""
    exclusions = {ds.code: check_exclusions(ops_con, registry, ds.code, partition_date)
                  for ds in registry.datasets.values() if ds.release}
    return GateResult(exclusions=exclusions, leaks=find_leaks(gov_con, ops_con, partition_date, registry))


# -- which scenarios count: in force on the partition day, and not ended as of the reference day ------------------

def scenario_ended(scenario: Scenario, reference_day: dt.date) -> bool:
    """Revoked, or its term over by ``reference_day``: everything on ops made for it goes (retroactive)."""
    return scenario.status != "active" or scenario.valid_to < reference_day


def scenarios_in_force(registry: Registry, day: dt.date, reference_day: dt.date | None = None) -> list[Scenario]:
    """Scenarios in force on ``day`` and not ended as of ``reference_day`` (default ``day``)."""
    ref = max(day, reference_day or day)
    return [s for s in registry.scenarios.values()
            if not scenario_ended(s, ref) and s.valid_from <= day <= s.valid_to]


def scenarios_live(registry: Registry, reference_day: dt.date) -> list[Scenario]:
    """Scenarios started and not ended as of ``reference_day``: what the ops platform may still hold data for."""
    return [s for s in registry.scenarios.values()
            if not scenario_ended(s, reference_day) and s.valid_from <= reference_day]


def fields_used(dataset: Dataset, scenarios: list[Scenario]) -> list[str]:
    """The fields of ``dataset`` authorized by any of ``scenarios``, in registry order (data minimisation)."""
    used = {name for s in scenarios for name in s.authorized_fields.get(dataset.code, [])}
    return [f.name for f in dataset.fields if f.name in used]


def consent_reference_day(gov_con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                          pending: tuple[dt.date, dt.date] | None = None,
                          applied: dt.date | None = None) -> dt.date:
    """The day whose consent and scenario state applies to every partition: the run's day, or the newest day of consent
    records the gov platform holds when later (a backfill of an old day still honours a later revocation).

    ``pending`` (first, last): days of a range run crossed after this one. Their consent is left out here, as a
    single-day run of this day before them would not have seen it; their own crossings apply it (and purge back).
    ``applied``: the newest consent state the ops platform already applied (`revocation.applied_reference_day`).
    Days up to it are not pending: a range crossed again must not go back to an older state than ops holds, whose
    later crossings would then keep the newer state instead of purging back (a subject revoked and granted again
    would get the rows of the days before the revocation back)."""
    if CONSENT_DATASET not in registry.datasets:
        return partition_date
    if pending is not None and applied is not None and applied >= pending[0]:
        first = applied + dt.timedelta(days=1)
        pending = (first, pending[1]) if first <= pending[1] else None
    relation = gov_relation(gov_con, registry, CONSENT_DATASET)
    where, params = ("", []) if pending is None else (" WHERE CAST(_partition_date AS DATE) NOT BETWEEN ? AND ?",
                                                      list(pending))
    (latest,) = gov_con.execute(f"SELECT max(_partition_date) FROM {relation}{where}", params).fetchone()
    latest = dt.date.fromisoformat(str(latest)[:10]) if latest is not None else None
    return max(partition_date, latest) if latest else partition_date


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


class SubjectSets:
    """The consent subject sets of one crossing (`granted_subjects_sql`, `lapsed_subjects_sql`), each evaluated once on
    the gov connection and registered there as an Arrow view for the day's queries. The release of four datasets and a
    scenario's four tables filter by the same set: each query re-ranked every consent record ever delivered (~40 ms a
    query after four months, growing with history; issue 15). ``close`` unregisters the views."""

    def __init__(self, gov_con: duckdb.DuckDBPyConnection) -> None:
        self.con, self._views = gov_con, {}

    def relation(self, sql: str, params: dict) -> str:
        """A view of the ``subject_id`` column of ``sql``'s result (evaluated at the first call with these arguments)."""
        key = (sql, tuple(sorted((k, repr(v)) for k, v in params.items())))
        if key not in self._views:
            name = f"_zq_consent_subjects_{id(self)}_{len(self._views)}"
            self.con.register(name, self.con.execute(sql, _params(sql, params)).to_arrow_table())
            self._views[key] = name
        return self._views[key]

    def close(self) -> None:
        for name in self._views.values():
            self.con.unregister(name)
        self._views.clear()


def consent_filter_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenario: Scenario, dataset: Dataset,
                       partition_date: dt.date, reference_day: dt.date | None = None,
                       subject_sets: SubjectSets | None = None) -> tuple[str, dict]:
    """A WHERE clause keeping only subjects whose latest consent for ``scenario`` at the end of the day is granted
    (and, with a later ``reference_day``, still granted then: a revocation is retroactive)."""
    if dataset.consent is None or dataset.consent.subject_type != scenario.consent_required:
        raise BoundaryError(
            f"场景 {scenario.code} 要求 {scenario.consent_required} 授权，但数据集 {dataset.code} 无对应主体字段 "
            f"(scenario needs {scenario.consent_required} consent; dataset {dataset.code} has no such subject field)"
        )
    return _granted_for_any_sql(gov_con, registry, [scenario.code], dataset, partition_date, reference_day,
                                subject_sets)


def release_consent_filter_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, dataset: Dataset,
                               partition_date: dt.date, reference_day: dt.date | None = None,
                               subject_sets: SubjectSets | None = None) -> tuple[str, dict]:
    """Art. 2 and data minimisation for desensitized.<dataset>: rows cross only when a scenario in force that day uses
    the dataset, and only of subjects who authorized such a scenario (each scenario's own tables then keep only its
    own consents); all rows when one of those scenarios needs no consent (or the dataset has no consent subject)."""
    users = [s for s in scenarios_in_force(registry, partition_date, reference_day)
             if dataset.code in s.authorized_fields]
    if not users:
        return "FALSE", {}  # no use in force: nothing of this dataset leaves the domain
    if dataset.consent is None or any(not s.consent_required for s in users):
        return "TRUE", {}
    codes = [s.code for s in users if s.consent_required == dataset.consent.subject_type]
    if not codes:
        return "FALSE", {}
    return _granted_for_any_sql(gov_con, registry, codes, dataset, partition_date, reference_day, subject_sets)


def _granted_for_any_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenarios: list[str],
                         dataset: Dataset, partition_date: dt.date, reference_day: dt.date | None = None,
                         subject_sets: SubjectSets | None = None) -> tuple[str, dict]:
    """Subjects whose latest consent record (as of the end of the day) for any of ``scenarios`` is a grant, and with a
    later ``reference_day`` whose consent held at the end of EVERY day up to it (a later revocation applies to earlier
    days; see `lapsed_subjects_sql`). With ``subject_sets`` the sets are read from its views (evaluated once)."""
    subject = f"src.{quote_ident(dataset.consent.subject_field)}"

    def subjects(sql: str, params: dict) -> tuple[str, dict]:
        if subject_sets is None:
            return sql, params
        return f"SELECT subject_id FROM {subject_sets.relation(sql, params)}", {}

    inner, params = subjects(*granted_subjects_sql(gov_con, registry, scenarios, dataset.consent.subject_type,
                                                    partition_date))
    sql = f"{subject} IN ({inner})"
    if reference_day is not None and reference_day > partition_date:
        lapsed, more = subjects(*lapsed_subjects_sql(gov_con, registry, scenarios, dataset.consent.subject_type,
                                                     partition_date, reference_day))
        sql, params = f"{sql} AND {subject} NOT IN ({lapsed})", {**params, **more}
    return sql, params


def lapsed_subjects_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenarios: list[str],
                        subject_type: str, after: dt.date, through: dt.date) -> tuple[str, dict]:
    """``SELECT subject_id``: subjects who, at the end of some day in (``after``, ``through``], held no grant for any of
    ``scenarios`` (as `granted_subjects_sql` sees that day).

    Night by night, each day's crossing purges with that day's consent, so a subject revoked on day 2 and granted again
    on day 3 keeps no rows of days 1–2. A crossing of day 1 that already sees day 3's consent (days crossed concurrently
    on the lakes, a backfill of an old day) must drop the same rows, whatever order the days run in: checking both ends
    would keep them. A record counts from the day it is both delivered and effective, so the state can change only on
    such days; they are checked for the subjects with a record then — bounded by the consent records of the window."""
    relation = gov_relation(gov_con, registry, CONSENT_DATASET)
    cols = _check_columns(gov_con, relation, ["subject_type", "subject_id", "scenario_code", "status", "effective_at",
                                              "_partition_date"])
    etype = cols["effective_at"].upper()
    if "TIME ZONE" in etype:
        effective, eff_day = "c.effective_at", f"CAST(c.effective_at AT TIME ZONE '{TZ.key}' AS DATE)"
    elif etype.startswith("TIMESTAMP"):
        effective, eff_day = "c.effective_at", "CAST(c.effective_at AS DATE)"  # naive = Beijing time (registry)
    else:
        effective = "TRY_CAST(c.effective_at AS TIMESTAMP)"
        eff_day = f"CAST({effective} AS DATE)"
    sql = f"""
        WITH known AS (
            SELECT trim(c.subject_id) AS subject_id, trim(c.scenario_code) AS scenario, lower(trim(c.status)) AS status,
                   {effective} AS eff, CAST(c._partition_date AS DATE) AS pd,
                   greatest(CAST(c._partition_date AS DATE), {eff_day}) AS known_day
            FROM {relation} AS c
            WHERE trim(c.scenario_code) IN (SELECT unnest($zq_lapse_scenarios::VARCHAR[]))
              AND lower(trim(c.subject_type)) = $zq_lapse_subject_type AND trim(c.subject_id) IS NOT NULL
              AND CAST(c._partition_date AS DATE) <= $zq_lapse_through AND {eff_day} <= $zq_lapse_through
        ), changes AS (
            SELECT DISTINCT subject_id, known_day AS day FROM known WHERE known_day > $zq_lapse_after
        ), latest AS (
            SELECT ch.subject_id, ch.day, k.status,
                   row_number() OVER (PARTITION BY ch.subject_id, ch.day, k.scenario
                                      ORDER BY k.eff DESC, (k.status = 'revoked') DESC, k.pd DESC) AS rn
            FROM changes AS ch JOIN known AS k ON k.subject_id = ch.subject_id AND k.known_day <= ch.day
        )
        SELECT subject_id FROM latest WHERE rn = 1 GROUP BY subject_id, day HAVING NOT bool_or(status = 'granted')"""
    return sql, {"zq_lapse_scenarios": scenarios, "zq_lapse_subject_type": subject_type,
                 "zq_lapse_after": after, "zq_lapse_through": through}


def granted_subjects_sql(gov_con: duckdb.DuckDBPyConnection, registry: Registry, scenarios: list[str],
                         subject_type: str, as_of: dt.date, suffix: str = "") -> tuple[str, dict]:
    """``SELECT subject_id``: subjects whose latest consent record for any of ``scenarios`` as of the end of ``as_of``
    (Asia/Shanghai) is a grant; parameter names end in ``suffix``."""
    partition_date = as_of
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
    s = suffix
    # Latest record per subject as of the end of the day; on a tie a revocation wins.
    sql = f"""
        SELECT subject_id FROM (
            SELECT trim(c.subject_id) AS subject_id, lower(trim(c.status)) AS status,
                   row_number() OVER (PARTITION BY trim(c.subject_id), trim(c.scenario_code)
                                      ORDER BY {effective} DESC, (lower(trim(c.status)) = 'revoked') DESC,
                                               c._partition_date DESC) AS rn
            FROM {relation} AS c
            WHERE trim(c.scenario_code) IN (SELECT unnest($zq_scenarios{s}::VARCHAR[]))
              AND lower(trim(c.subject_type)) = $zq_subject_type{s}
              AND c._partition_date <= $zq_consent_day{s} AND {effective} < $zq_consent_end{s}
        ) WHERE rn = 1 AND status = 'granted' AND subject_id IS NOT NULL"""
    return sql, {f"zq_scenarios{s}": scenarios, f"zq_subject_type{s}": subject_type,
                 f"zq_consent_end{s}": end, f"zq_consent_day{s}": partition_date}


def _write_partition(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, schema: str, table: str,
                     sql: str, params: dict, partition_date: dt.date, keep_columns: list[str] | None = None) -> int:
    """Replace one partition of ``schema.table`` in the ops DB with the rows of a gov-side query, streamed as Arrow.

    The table gets the query's columns it lacks; with ``keep_columns`` it loses every other column (data
    minimisation: a field no scenario uses any more leaves every partition). Columns are altered before any row is
    deleted in the transaction (DuckDB refuses to commit an ALTER after a DELETE of the same table)."""
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
    existing = _relation_columns(ops_con, schema, table)
    for name, ctype, *_ in columns:
        if name not in existing:
            ops_con.execute(f"ALTER TABLE {target} ADD COLUMN {quote_ident(name)} {ctype}")
    if keep_columns is not None:
        wanted = set(keep_columns) | set(LINEAGE_COLUMNS) | {name for name, *_ in columns}
        for name in existing:
            if name not in wanted:
                ops_con.execute(f"ALTER TABLE {target} DROP COLUMN {quote_ident(name)}")
    ops_con.execute(f"DELETE FROM {target} WHERE _partition_date = ?", [partition_date])
    ops_con.register("_zq_boundary_batches", reader)
    try:
        ops_con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM _zq_boundary_batches")
    finally:
        ops_con.unregister("_zq_boundary_batches")
    return ops_con.execute(f"SELECT count(*) FROM {target} WHERE _partition_date = ?", [partition_date]).fetchone()[0]


def _empty_partition(ops_con: duckdb.DuckDBPyConnection, schema: str, table: str, partition_date: dt.date) -> int:
    """Remove one partition of an ops table, when the table exists (a held-back dataset whose gov model is unreadable)."""
    if _relation_columns(ops_con, schema, table):
        ops_con.execute(f"DELETE FROM {quote_ident(schema)}.{quote_ident(table)} WHERE _partition_date = ?",
                        [partition_date])
    return 0


HELD_BACK_TABLE = "boundary.held_back"  # ops: (partition_date, dataset, reason) of the last crossing of each partition


def _record_held_back(ops_con: duckdb.DuckDBPyConnection, partition_date: dt.date, held: Mapping[str, str]) -> None:
    """Replace the partition's rows of boundary.held_back (created only once something is held back)."""
    if not held and not _relation_columns(ops_con, "boundary", "held_back"):
        return
    ops_con.execute("CREATE SCHEMA IF NOT EXISTS boundary")
    ops_con.execute(f"CREATE TABLE IF NOT EXISTS {HELD_BACK_TABLE} (partition_date DATE, dataset VARCHAR, reason VARCHAR)")
    ops_con.execute(f"DELETE FROM {HELD_BACK_TABLE} WHERE partition_date = ?", [partition_date])
    if held:
        ops_con.executemany(f"INSERT INTO {HELD_BACK_TABLE} VALUES (?, ?, ?)",
                            [(partition_date, code, reason) for code, reason in sorted(held.items())])


def held_back_on_ops(ops_con: duckdb.DuckDBPyConnection, partition_date: dt.date | str) -> dict[str, str]:
    """The datasets the last crossing of the partition held back (dataset -> why): nothing of them is on ops for that
    day, and no product reading them may be published for it. Empty when nothing was held back."""
    d = dt.date.fromisoformat(partition_date) if isinstance(partition_date, str) else partition_date
    if not _relation_columns(ops_con, "boundary", "held_back"):
        return {}
    return dict(ops_con.execute(f"SELECT dataset, reason FROM {HELD_BACK_TABLE} WHERE partition_date = ? ORDER BY 1",
                                [d]).fetchall())


def _count(gov_con: duckdb.DuckDBPyConnection, relation: str, partition_date: dt.date) -> int:
    return gov_con.execute(f"SELECT count(*) FROM {relation} WHERE _partition_date = ?", [partition_date]).fetchone()[0]


def cross_boundary(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, registry: Registry,
                   partition_date: dt.date | str, key: PseudonymKey, strict: bool = True,
                   gate: Gate | None = run_gates,
                   held_back: Mapping[str, str] | Iterable[str] | None = None,
                   pending_consent: tuple[dt.date, dt.date] | None = None) -> BoundaryReport:
    """Cross one partition gov → ops in ONE ops transaction (a failure leaves the previous state).

    Only the fields and datasets used by a scenario in force that day cross (data minimisation). Revocations and
    ended scenarios apply to every partition (``zqdata.revocation``): their rows leave every ops table, products
    included, in the same transaction. Then ``gate`` (default: exclusions + leak gate) runs on the uncommitted data;
    when it fails everything is rolled back and BoundaryGateFailed is raised (write–audit–publish).

    ``held_back`` (dataset -> reason, or dataset codes): datasets the quality gate held back for the partition. Nothing
    of them crosses; their partition is removed from ``desensitized.<dataset>`` and every ``scenario_*.<dataset>`` (the
    partition is not served), the other datasets cross as usual, and ``boundary.held_back`` records them for the
    products and publish steps (a product reading a held-back dataset is not published for the partition).

    ``pending_consent``: the later days of a range run (see `consent_reference_day`).

    A revoked or expired scenario gets nothing written; with ``strict`` an AuthorizationError naming it is raised
    after the rest has been committed (``exc.report`` holds the report); otherwise it is only listed in ``report.blocked``.
    """
    from zqdata import revocation

    d = dt.date.fromisoformat(partition_date) if isinstance(partition_date, str) else partition_date
    report = BoundaryReport(partition_date=d)
    held = dict(held_back) if isinstance(held_back, Mapping) else {c: "质量门禁留置 (held back)" for c in held_back or ()}
    report.held_back = {c: str(r) for c, r in held.items() if c in registry.datasets and registry.datasets[c].release}
    base = {"zq_partition": d}  # the pseudonym keys are per (field role, ops schema): from release_select
    # Resolve every input before writing anything, so a missing model fails without a partial crossing.
    released = [ds for ds in registry.datasets.values() if ds.release]
    unreadable: set[str] = set()  # held back AND its gov model missing or malformed: its ops partitions only emptied
    for ds in released:
        try:
            report.sources[ds.code] = gov_relation(gov_con, registry, ds.code)
            _check_columns(gov_con, report.sources[ds.code], ds.field_names + LINEAGE_COLUMNS)
        except BoundaryError as exc:
            if ds.code not in report.held_back:
                raise
            # e.g. its dbt model failed (zqdata.quality.model_failures): nothing of it is read, nothing crosses
            report.sources[ds.code] = f"（不可读 unreadable: {exc}）"
            unreadable.add(ds.code)

    applied = revocation.applied_reference_day(ops_con) if pending_consent is not None else None
    ref = report.reference_day = consent_reference_day(gov_con, registry, d, pending_consent, applied)
    in_force, live = scenarios_in_force(registry, d, ref), scenarios_live(registry, ref)
    purged_by_scenario: dict[str, list[pa.Table]] = {}
    keep_cache: dict = {}  # subject sets to keep, computed once per (scenarios, pseudonym domain)

    def purged(table: str, rows: pa.Table, scenario: str | None = None) -> None:
        if rows.num_rows:
            report.purged[table] = report.purged.get(table, 0) + rows.num_rows
            if scenario is not None:
                purged_by_scenario.setdefault(scenario, []).append(rows)

    subject_sets = SubjectSets(gov_con)  # each consent subject set of the day evaluated once
    ops_con.execute("BEGIN TRANSACTION")
    try:
        for ds in released:
            relation = report.sources[ds.code]
            users = [s for s in in_force if ds.code in s.authorized_fields]
            live_users = [s for s in live if ds.code in s.authorized_fields]
            fields = fields_used(ds, users)  # data minimisation: what the scenarios in force use, nothing else
            items, pseudonym_params = release_select(ds, fields, d, key, "desensitized")
            where, consent_params = release_consent_filter_sql(gov_con, registry, ds, d, ref, subject_sets)
            if ds.code in report.held_back:  # held back by the quality gate: the partition is emptied, not served
                where, consent_params = "FALSE", {}  # (the table keeps its columns: the products still compile)
            sql = (f"SELECT {', '.join([*items, 'src._lineage_id', 'src._partition_date'])} "
                   f"FROM {relation} AS src WHERE src._partition_date = $zq_partition AND {where}")
            report.released[ds.code] = (
                _empty_partition(ops_con, "desensitized", ds.code, d) if ds.code in unreadable else
                _write_partition(gov_con, ops_con, "desensitized", ds.code, sql,
                                 {**base, **pseudonym_params, **consent_params}, d,
                                 keep_columns=fields_used(ds, users + live_users)))
            if not live_users:  # no scenario may use this dataset any more: nothing of it stays on ops
                purged(f"desensitized.{ds.code}", revocation.empty_table(ops_con, "desensitized", ds.code))
            elif ds.consent is not None and all(s.consent_required == ds.consent.subject_type for s in live_users):
                keep = revocation.keep_subjects(gov_con, registry, ds, [s.code for s in live_users], ref, key,
                                                "desensitized", keep_cache, subject_sets)
                purged(f"desensitized.{ds.code}",
                       revocation.purge_subjects(ops_con, "desensitized", ds.code, ds.consent.subject_field, keep,
                                                 d, reference_day=ref))
            else:  # not purged by subject tonight: the next purge looks at the whole table again
                revocation.forget_kept(ops_con, "desensitized", ds.code)

        for scenario in registry.scenarios.values():
            try:
                check_scenario_active(scenario, d)
                check_scenario_active(scenario, ref)  # a backfill writes nothing for a scenario that has ended since
            except AuthorizationError as exc:
                report.blocked[scenario.code] = str(exc)
                if scenario_ended(scenario, ref):  # revoked or expired: retroactive, all its data leaves ops
                    report.ended[scenario.code] = str(exc)
                    for table in revocation.scenario_tables(ops_con, scenario.code):
                        purged(f"scenario_{scenario.code}.{table}",
                               revocation.empty_table(ops_con, f"scenario_{scenario.code}", table))
                    days = revocation.purge_product(ops_con, scenario.product, None)
                    if days:
                        report.purged[f"products.{scenario.product}"] = len(days)
                        report.product_days[scenario.product] = sorted(set(days))
                    continue
            blocked = scenario.code in report.blocked
            rows, dropped = {}, {}
            for ds_code in scenario.authorized_fields:
                ds = registry.datasets[ds_code]
                if not ds.release:
                    raise AuthorizationError(f"场景 {scenario.code} 不得使用不发布的数据集 {ds_code} (dataset never released)")
                relation = report.sources[ds_code]
                if not blocked and ds_code in unreadable:
                    rows[ds_code] = _empty_partition(ops_con, f"scenario_{scenario.code}", ds_code, d)
                    dropped[ds_code] = 0
                elif not blocked:
                    items, pseudonym_params = release_select(ds, authorized_fields(registry, scenario.code, ds_code), d,
                                                             key, f"scenario_{scenario.code}")
                    where, consent_params = "TRUE", {}
                    if ds_code in report.held_back:  # emptied for the partition (the product is not published)
                        where = "FALSE"
                    elif scenario.consent_required:
                        where, consent_params = consent_filter_sql(gov_con, registry, scenario, ds, d, ref,
                                                                   subject_sets)
                    sql = (f"SELECT {', '.join(items)}, src._lineage_id, src._partition_date FROM {relation} AS src "
                           f"WHERE src._partition_date = $zq_partition AND {where}")
                    rows[ds_code] = _write_partition(gov_con, ops_con, f"scenario_{scenario.code}", ds_code, sql,
                                                     {**base, **pseudonym_params, **consent_params}, d,
                                                     keep_columns=authorized_fields(registry, scenario.code, ds_code))
                    dropped[ds_code] = 0 if ds_code in report.held_back else _count(gov_con, relation, d) - rows[ds_code]
                if scenario.consent_required and ds.consent is not None and scenario.valid_from <= ref:
                    # a revocation applies to every partition already on ops, not only to the next one
                    keep = revocation.keep_subjects(gov_con, registry, ds, [scenario.code], ref, key,
                                                    f"scenario_{scenario.code}", keep_cache, subject_sets)
                    purged(f"scenario_{scenario.code}.{ds_code}",
                           revocation.purge_subjects(ops_con, f"scenario_{scenario.code}", ds_code,
                                                     ds.consent.subject_field, keep, d, reference_day=ref), scenario.code)
                else:
                    revocation.forget_kept(ops_con, f"scenario_{scenario.code}", ds_code)
            if not blocked:
                report.scenario_rows[scenario.code] = rows
                report.consent_excluded[scenario.code] = dropped

        for code, tables in purged_by_scenario.items():  # products built from a purged row lose that row
            product = registry.scenarios[code].product
            rows = pa.concat_tables(tables)
            days = revocation.purge_product(ops_con, product, rows)
            if days:
                report.purged[f"products.{product}"] = len(days)
            report.purged_lineage[product] = rows.column("_lineage_id").to_pylist()
            report.product_days[product] = sorted(set(days) | set(rows.column("_partition_date").to_pylist()))

        _record_held_back(ops_con, d, report.held_back)
        if gate is not None:  # write–audit–publish: audited before COMMIT, rolled back when it fails
            report.gate = gate(gov_con, ops_con, registry, d)
            if not report.gate.passed:
                raise BoundaryGateFailed(report)
        ops_con.execute("COMMIT")
    except Exception:
        ops_con.execute("ROLLBACK")
        raise
    finally:
        subject_sets.close()
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

    desensitized.<dataset> holds only fields some scenario still in force uses, the partition's values only of fields
    used by a scenario in force that day, and no row that day when none uses the dataset (data minimisation); no
    suppressed/confidential field anywhere in ops; scenario tables hold only authorized fields; pseudonyms are 64-hex,
    masked values contain ``*``, age bands are bands.
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
            problems.extend(_minimisation_problems(ops_con, registry, ds, cols, partition_date))
        elif schema.startswith("scenario_"):
            code = schema.removeprefix("scenario_")
            allowed = set(registry.scenarios[code].authorized_fields.get(dataset, [])) if code in registry.scenarios else set()
            extra = sorted(cols - allowed - set(LINEAGE_COLUMNS))
            if extra:
                problems.append(f"{schema}.{dataset} 含有未授权字段 {extra} (unauthorized fields)")
        problems.extend(_shape_problems(ops_con, ds, schema, cols, partition_date))
    return problems


def _minimisation_problems(ops_con: duckdb.DuckDBPyConnection, registry: Registry, ds: Dataset, cols: set[str],
                           partition_date: dt.date) -> list[str]:
    """desensitized.<dataset> against data minimisation: only fields used by a scenario not ended, values on the day
    only for fields used by a scenario in force that day, no row at all when none uses the dataset."""
    problems = []
    target = f"desensitized.{quote_ident(ds.code)}"
    current = [s for s in registry.scenarios.values() if s.status == "active" and s.valid_to >= partition_date]
    allowed = set(fields_used(ds, current)) & set(released_fields(ds))
    extra = sorted(cols - allowed - set(LINEAGE_COLUMNS))
    if extra:
        problems.append(f"desensitized.{ds.code} 含有无在用场景使用的字段 {extra} "
                        f"(fields no scenario in force uses: data minimisation)")
    users = [s for s in scenarios_in_force(registry, partition_date) if ds.code in s.authorized_fields]
    (rows,) = ops_con.execute(f"SELECT count(*) FROM {target} WHERE _partition_date = ?", [partition_date]).fetchone()
    if not users and rows:
        problems.append(f"desensitized.{ds.code} 在 {partition_date} 有 {rows} 行，但当日无在用场景使用该数据集 "
                        f"(rows crossed although no scenario in force uses the dataset)")
    unused = sorted((cols & allowed) - set(fields_used(ds, users)))
    if unused and rows:
        counts = ops_con.execute(
            f"SELECT {', '.join(f'count({quote_ident(c)})' for c in unused)} FROM {target} WHERE _partition_date = ?",
            [partition_date]).fetchone()
        filled = [c for c, n in zip(unused, counts) if n]
        if filled:
            problems.append(f"desensitized.{ds.code} 在 {partition_date} 含有当日无在用场景使用的字段值 {filled} "
                            f"(values of fields no scenario in force that day uses)")
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
