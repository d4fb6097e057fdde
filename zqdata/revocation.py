"""Consent revocation and scenario expiry are retroactive (issue 11, finding 7).

Run by the boundary crossing inside its ops transaction (``zqdata.boundary.cross_boundary``), before its gates and
COMMIT: each table is cleaned by ONE set-based DELETE, never one statement per subject.

- ``scenario_<code>.<dataset>`` keeps, in every partition, only subjects whose latest consent for the scenario (as of
  the reference day: the run's day, or the newest consent day held on gov) is a grant;
- ``desensitized.<dataset>`` keeps only subjects who still authorize a scenario in force that uses the dataset;
- a scenario revoked or expired has every one of its tables and its product table emptied;
- product rows built from a purged row (``_source_lineage_ids``) are deleted, and after COMMIT the published snapshots
  of the affected days are replaced by snapshots derived from them without those rows (manifest: ``reason``,
  ``derived_from``), or withdrawn when the rows cannot be told apart (``apply_purge_to_published``).

The subject on the ops side is the subject field after its mask rule in that table's pseudonym domain (credit codes
are kept as is; citizen IDs are pseudonyms): the crossing holds the gov connection and the key, so it computes the set
of subjects to keep, masked, on the gov side; only that masked set reaches the ops connection.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import sqlalchemy as sa

from zqdata.desensitize import PseudonymKey, quote_ident, release_select
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ
from zqdata.warehouse import relation_columns

if TYPE_CHECKING:
    from zqdata.boundary import BoundaryReport
    from zqdata.storage import ObjectStore

REVOKED_REASON = "consent revoked"
_RETURNING = "_lineage_id, _partition_date"


def _delete_returning(con: duckdb.DuckDBPyConnection, target: str, where: str, columns: str) -> pa.Table:
    """``DELETE FROM target where RETURNING columns`` in a form a DuckLake runs too (it has no RETURNING for
    deletes): the rows' columns are selected first, then the same DELETE, in the caller's transaction."""
    rows = con.execute(f"SELECT {columns} FROM {target} {where}").fetch_arrow_table()
    if rows.num_rows:
        con.execute(f"DELETE FROM {target} {where}")
    return rows


def _empty_returning() -> pa.Table:
    return pa.table({"_lineage_id": pa.array([], pa.string()), "_partition_date": pa.array([], pa.date32())})


def table_exists(ops_con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(relation_columns(ops_con, schema, table))


def keep_subjects(gov_con: duckdb.DuckDBPyConnection, registry: Registry, dataset: Dataset, scenarios: list[str],
                  reference_day: dt.date, key: PseudonymKey, scope: str, cache: dict | None = None,
                  subject_sets=None) -> pa.Table:
    """The subjects of ``dataset`` whose latest consent for any of ``scenarios`` as of ``reference_day`` is a grant, as
    they appear in the ops schema ``scope`` (one column named after the subject field, masked on the gov side). ``cache`` reuses a set computed for another
    dataset of the same scenarios whose subject looks the same on ops (kept as is, or the same pseudonym domain).
    ``subject_sets`` (`zqdata.boundary.SubjectSets`): the crossing's consent sets, evaluated once for all its uses."""
    from zqdata.boundary import BoundaryError, _params, granted_subjects_sql
    from zqdata.desensitize import pseudonym_role

    name = dataset.consent.subject_field
    method = dataset.field(name).mask.method
    if method not in ("keep", "pseudonymize"):
        raise BoundaryError(f"{dataset.code}.{name}: 授权主体字段的脱敏规则 {method} 无法逐主体撤回 "
                            f"(a consent subject field must be kept or pseudonymized to purge revoked subjects)")
    domain = pseudonym_role(dataset, dataset.field(name)) if method == "pseudonymize" else "keep"
    cache_key = (tuple(sorted(scenarios)), dataset.consent.subject_type, reference_day, scope, domain)
    if cache is not None and cache_key in cache:
        return cache[cache_key].rename_columns([name])
    inner, params = granted_subjects_sql(gov_con, registry, scenarios, dataset.consent.subject_type, reference_day)
    if subject_sets is not None:
        inner, params = f"SELECT subject_id FROM {subject_sets.relation(inner, params)}", {}
    items, pads = release_select(dataset, [name], reference_day, key, scope, table_alias="k")
    sql = f"SELECT DISTINCT {items[0]} FROM (SELECT subject_id AS {quote_ident(name)} FROM ({inner})) AS k"
    keep = gov_con.execute(sql, _params(sql, {**params, **pads})).fetch_arrow_table()
    if cache is not None:
        cache[cache_key] = keep
    return keep


#: The keep set last applied to each ops table (``relation`` = ``schema.table``), as the subjects appear on ops
#: (pseudonyms or kept codes: nothing gov does not already send). Bounded by the consenting population, not by history.
KEPT_SUBJECTS = "revocation.kept_subjects"
#: The tables whose keep set is recorded (an empty keep set is a valid state, so it is marked apart).
KEPT_RELATIONS = "revocation.kept_relations"


def _ensure_kept_state(ops_con: duckdb.DuckDBPyConnection) -> None:
    ops_con.execute("CREATE SCHEMA IF NOT EXISTS revocation")
    ops_con.execute(f"CREATE TABLE IF NOT EXISTS {KEPT_SUBJECTS} (relation VARCHAR, subject VARCHAR)")
    ops_con.execute(f"CREATE TABLE IF NOT EXISTS {KEPT_RELATIONS} (relation VARCHAR, reference_day DATE)")


def applied_reference_day(ops_con: duckdb.DuckDBPyConnection) -> dt.date | None:
    """The newest consent reference day a purge by subject applied on the ops platform (None: none recorded)."""
    if not table_exists(ops_con, "revocation", "kept_relations"):
        return None
    (day,) = ops_con.execute(f"SELECT max(reference_day) FROM {KEPT_RELATIONS}").fetchone()
    return day


def forget_kept(ops_con: duckdb.DuckDBPyConnection, schema: str, table: str) -> None:
    """The table was written tonight without a purge by subject: its next purge checks the whole table."""
    if table_exists(ops_con, "revocation", "kept_relations"):
        ops_con.execute(f"DELETE FROM {KEPT_RELATIONS} WHERE relation = ?", [f"{schema}.{table}"])


def purge_subjects(ops_con: duckdb.DuckDBPyConnection, schema: str, table: str, subject_field: str,
                   keep: pa.Table, partition_date: dt.date | None = None, stats: dict | None = None,
                   reference_day: dt.date | None = None) -> pa.Table:
    """Delete, from every partition of ``schema.table``, the rows whose subject is not in ``keep``; returns their
    ``_lineage_id`` and ``_partition_date``.

    Nothing here may cost what the table's history costs every night (issue 15). The table holds, by construction,
    only subjects of the keep set applied last time (``KEPT_SUBJECTS``) and the rows written for ``partition_date``
    tonight; so only the subjects that LOST consent since (that set minus tonight's ``keep``) are looked for in the
    whole table — no statement on the table when nobody did — and tonight's partition is checked against ``keep``.
    Without a recorded set (first night, a table from before this state existed) or without ``partition_date``, one
    anti-join over the whole table, as before. Either way the table then holds only subjects of ``keep``, which is
    recorded in the same transaction. ``stats`` (optional) gets ``mode`` (full / incremental) and ``lost_subjects``."""
    if not table_exists(ops_con, schema, table):
        return _empty_returning()
    target, relation = f"{quote_ident(schema)}.{quote_ident(table)}", f"{schema}.{table}"
    col, subject = quote_ident(subject_field), f"CAST({quote_ident(table)}.{quote_ident(subject_field)} AS VARCHAR)"
    not_kept = f"NOT EXISTS (SELECT 1 FROM _zq_keep_subjects AS k WHERE CAST(k.{col} AS VARCHAR) = {subject})"
    _ensure_kept_state(ops_con)
    recorded_ref = ops_con.execute(f"SELECT max(reference_day), count(*) FROM {KEPT_RELATIONS} WHERE relation = ?",
                                   [relation]).fetchone() if partition_date is not None else (None, 0)
    recorded = recorded_ref[1] > 0
    if recorded and reference_day is not None and recorded_ref[0] is not None and recorded_ref[0] > reference_day:
        # A crossing that already applied a NEWER consent state (a concurrent day on the lakes, a range re-run): that
        # state stands; tonight's partition is checked against it, and nothing else changes.
        tonight = f"CAST(_partition_date AS DATE) = DATE '{partition_date.isoformat()}'"
        rel = relation.replace("'", "''")
        deleted = _delete_returning(ops_con, target, f"WHERE {tonight} AND NOT EXISTS (SELECT 1 FROM {KEPT_SUBJECTS} "
                                    f"AS k WHERE k.relation = '{rel}' AND k.subject = {subject})", _RETURNING)
        if stats is not None:
            stats.update(mode="newer state kept", lost_subjects=0)
        return deleted
    ops_con.register("_zq_keep_subjects", keep)
    try:
        if not recorded:
            deleted = _delete_returning(ops_con, target, f"WHERE {not_kept}", _RETURNING)
            ops_con.execute(f"DELETE FROM {KEPT_SUBJECTS} WHERE relation = ?", [relation])
            ops_con.execute(f"INSERT INTO {KEPT_SUBJECTS} SELECT DISTINCT ?, CAST({col} AS VARCHAR) "
                            f"FROM _zq_keep_subjects WHERE {col} IS NOT NULL", [relation])
            ops_con.execute(f"DELETE FROM {KEPT_RELATIONS} WHERE relation = ?", [relation])
            ops_con.execute(f"INSERT INTO {KEPT_RELATIONS} VALUES (?, ?)", [relation, reference_day])
            lost = 0
        else:
            lost_subjects = ops_con.execute(
                f"SELECT subject FROM {KEPT_SUBJECTS} WHERE relation = ? "
                f"EXCEPT SELECT CAST({col} AS VARCHAR) FROM _zq_keep_subjects", [relation]).fetch_arrow_table()
            lost = lost_subjects.num_rows
            tonight = f"CAST(_partition_date AS DATE) = DATE '{partition_date.isoformat()}'"
            parts = [_delete_returning(ops_con, target, f"WHERE {tonight} AND {not_kept}", _RETURNING)]
            ops_con.register("_zq_lost_subjects", lost_subjects)
            try:
                if lost:
                    parts.append(_delete_returning(
                        ops_con, target, f"WHERE {subject} IN (SELECT subject FROM _zq_lost_subjects)", _RETURNING))
                    ops_con.execute(f"DELETE FROM {KEPT_SUBJECTS} WHERE relation = ? AND subject IN "
                                    "(SELECT subject FROM _zq_lost_subjects)", [relation])
            finally:
                ops_con.unregister("_zq_lost_subjects")
            ops_con.execute(f"INSERT INTO {KEPT_SUBJECTS} SELECT ?, s FROM (SELECT DISTINCT CAST({col} AS VARCHAR) AS s "
                            f"FROM _zq_keep_subjects WHERE {col} IS NOT NULL EXCEPT SELECT subject FROM {KEPT_SUBJECTS} "
                            "WHERE relation = ?)", [relation, relation])
            deleted = pa.concat_tables([t.cast(_empty_returning().schema) for t in parts])
            ops_con.execute(f"UPDATE {KEPT_RELATIONS} SET reference_day = ? WHERE relation = ?", [reference_day, relation])
        if stats is not None:
            stats.update(mode="incremental" if recorded else "full", lost_subjects=lost)
        return deleted
    finally:
        ops_con.unregister("_zq_keep_subjects")


def empty_table(ops_con: duckdb.DuckDBPyConnection, schema: str, table: str) -> pa.Table:
    """Delete every row of ``schema.table`` (when it exists); returns the deleted rows' lineage ids and partitions."""
    if not table_exists(ops_con, schema, table):
        return _empty_returning()
    return _delete_returning(ops_con, f"{quote_ident(schema)}.{quote_ident(table)}", "", _RETURNING)


def scenario_tables(ops_con: duckdb.DuckDBPyConnection, code: str) -> list[str]:
    return [t for (t,) in ops_con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
                                          "ORDER BY 1", [f"scenario_{code}"]).fetchall()]


def purge_product(ops_con: duckdb.DuckDBPyConnection, product: str, purged: pa.Table | None) -> list[dt.date]:
    """Delete the rows of ``products.<product>`` built from a purged input row (``_source_lineage_ids``), or all its
    rows when ``purged`` is None; a product table without lineage ids loses the partitions of the purged rows. Returns
    the partition day of every deleted row (one set-based DELETE)."""
    if not table_exists(ops_con, "products", product):
        return []
    target = f"products.{quote_ident(product)}"
    if purged is None:
        return _delete_returning(ops_con, target, "", "_partition_date").column(0).to_pylist()
    if purged.num_rows == 0:
        return []
    cols = set(relation_columns(ops_con, "products", product))
    ops_con.register("_zq_purged_rows", purged)
    try:
        if "_source_lineage_ids" in cols:
            # no rowid (a DuckLake has none): a row goes when any of its lineage ids is a purged row's. A semi-join
            # of its unnested ids, not list_has_any(ids, <every purged id>): that compares each row with the whole list
            # (150,000 rows × 3,000 purged ids: 11.9 s against 0.06 s), and both grow with history (issue 15)
            where = ("WHERE EXISTS (SELECT 1 FROM (SELECT unnest(_source_lineage_ids) AS id) AS u "
                     "WHERE u.id IN (SELECT CAST(_lineage_id AS VARCHAR) FROM _zq_purged_rows))")
        else:  # no row-level lineage: the days that used a purged row go whole (rebuilt by their next run)
            where = ("WHERE CAST(_partition_date AS DATE) IN "
                     "(SELECT DISTINCT CAST(_partition_date AS DATE) FROM _zq_purged_rows)")
        return _delete_returning(ops_con, target, where, "_partition_date").column(0).to_pylist()
    finally:
        ops_con.unregister("_zq_purged_rows")


def merge_purges(reports: list[BoundaryReport]) -> BoundaryReport:
    """One report with the purges of several committed crossings (the days of a range run), for
    `apply_purge_to_published`: the scenarios ended, the rows purged per table, and per product the purged input rows
    and the days whose rows changed. A row built from any of them goes, as it would night by night."""
    from zqdata.boundary import BoundaryReport

    out = BoundaryReport(partition_date=reports[-1].partition_date)
    for r in reports:
        out.ended.update(r.ended)
        for table, n in r.purged.items():
            out.purged[table] = out.purged.get(table, 0) + n
        for product, ids in r.purged_lineage.items():
            out.purged_lineage.setdefault(product, []).extend(ids)
        for product, days in r.product_days.items():
            out.product_days[product] = sorted(set(out.product_days.get(product, [])) | set(days))
    return out


def owe_purge(report: BoundaryReport, run_id: str, engine=None) -> int | None:
    """Record in the operational DB that the published snapshots owe ``report``'s purges (right after its crossing
    committed them on ops); the record's id, or None when the crossing purged nothing."""
    from zqdata import opdb

    if not (report.ended or report.product_days or report.purged):
        return None
    purge = {"partition_date": report.partition_date.isoformat(), "ended": report.ended, "purged": report.purged,
             "purged_lineage": report.purged_lineage,
             "product_days": {p: [d.isoformat() for d in days] for p, days in report.product_days.items()}}
    with opdb.transaction(engine) as conn:
        result = conn.execute(sa.insert(opdb.owed_snapshot_purges).values(
            run_id=run_id, recorded_at=dt.datetime.now(TZ).isoformat(timespec="seconds"),
            purge=json.dumps(purge, ensure_ascii=False, sort_keys=True)))
        return int(result.inserted_primary_key[0])


def settle_owed_purges(store: ObjectStore, registry: Registry, run_id: str,
                       engine=None) -> tuple[BoundaryReport | None, dict[str, list[str]]]:
    """Every purge the snapshots still owe (`owe_purge`: this step's crossings, and any an earlier step could not
    apply), applied at once (`merge_purges`, `apply_purge_to_published`), then forgotten. When the store fails the
    records stay, and the next boundary step applies them. Returns the merged purge (None: nothing owed) and what was
    done to the snapshots."""
    from zqdata import opdb
    from zqdata.boundary import BoundaryReport

    table = opdb.owed_snapshot_purges
    with opdb.transaction(engine) as conn:
        rows = conn.execute(sa.select(table.c.id, table.c.purge).order_by(table.c.id)).all()
    if not rows:
        return None, {"withdrawn": [], "republished": []}
    reports = []
    for _id, text in rows:
        doc = json.loads(text)
        reports.append(BoundaryReport(
            partition_date=dt.date.fromisoformat(doc["partition_date"]), ended=doc["ended"], purged=doc["purged"],
            purged_lineage=doc["purged_lineage"],
            product_days={p: [dt.date.fromisoformat(d) for d in days] for p, days in doc["product_days"].items()}))
    merged = merge_purges(reports)
    done = apply_purge_to_published(store, registry, merged, run_id)
    with opdb.transaction(engine) as conn:
        conn.execute(sa.delete(table).where(table.c.id.in_([r[0] for r in rows])))
    return merged, done


def apply_purge_to_published(store: ObjectStore, registry: Registry, report: BoundaryReport, run_id: str,
                             now: dt.datetime | None = None) -> dict[str, list[str]]:
    """After the crossing committed: the published snapshots follow the purge.

    The product of an ended scenario has every partition withdrawn. A snapshot of a day whose product rows were
    purged is replaced by one derived from it without the rows built from a purged input row (``reason: consent
    revoked`` in its manifest), or withdrawn when it carries no ``_source_lineage_ids``. Returns what was done:
    ``{"withdrawn": ["<product>/<day>", ...], "republished": [...]}``.
    """
    from zqdata import publish

    done: dict[str, list[str]] = {"withdrawn": [], "republished": []}
    ended_products = {registry.scenarios[c].product for c in report.ended if c in registry.scenarios}
    for product in sorted(ended_products):
        for day in publish.published_days(store, product):
            if publish.withdraw(store, product, day):
                done["withdrawn"].append(f"{product}/{day}")
    for product, days in sorted(report.product_days.items()):
        if product in ended_products:
            continue
        ids = report.purged_lineage.get(product, [])
        for day in sorted(set(days)):
            snap = publish.current_snapshot(store, product, day)
            if snap is None:
                continue
            if "_source_lineage_ids" not in snap.columns:
                publish.withdraw(store, product, day)
                done["withdrawn"].append(f"{product}/{day}")
                continue
            new = publish.derive_without(store, product, day, ids, reason=REVOKED_REASON, run_id=run_id, now=now)
            if new.key != snap.key:
                done["republished"].append(f"{product}/{day}")
    return done
