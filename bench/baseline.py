"""The floor: the nightly path's work as plain DuckDB SQL in one process (no Dagster, no dbt runtime, no pandas).

Same inputs (the delivered files), same rules, same outputs: ODS + quarantine with the ingestion contract
(`zqdata.contracts.PATTERNS`), the dbt models and tests as compiled by dbt itself (the query text only; compiling is
not timed), dataset-level checks and scores, the mask rules of `zqdata.desensitize`, the leak scan, the products.
Both DuckDB files are named like the pipeline's so the compiled SQL's qualified names resolve unchanged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

from zqdata.registry import Dataset, Registry

GOV_DB, OPS_DB = "gov_platform.duckdb", "ops_platform.duckdb"
STAGE_NAMES = ("ingest", "dbt", "checks", "boundary", "products")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# ------------------------------------------------------------------------------------------- compiled SQL


@dataclass
class CompiledProject:
    """The dbt manifests (with compiled SQL) of the gov and ops targets for one partition."""

    gov: dict
    ops: dict


def compile_dbt(work: Path, registry: Registry, day: dt.date) -> CompiledProject:
    """`dbt compile` both targets for ``day`` against empty DuckDB files named like the pipeline's (not timed)."""
    from assets.dbt_common import DBT_PROJECT_DIR, dbt_env, dbt_executable, dbt_vars

    out: dict[str, dict] = {}
    for target, select, scenarios in (("gov", "path:models/gov", False), ("ops", "path:models/ops", True)):
        cdir = work / f"compile-{target}"
        cdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **dbt_env(cdir / GOV_DB, cdir / OPS_DB)}
        subprocess.run(
            [dbt_executable(), "compile", "--quiet", "--project-dir", str(DBT_PROJECT_DIR),
             "--profiles-dir", str(DBT_PROJECT_DIR), "--target", target, "--target-path", str(cdir / "target"),
             "--select", select, "--vars", json.dumps(dbt_vars(registry, day, scenarios=scenarios))],
            check=True, env=env, cwd=DBT_PROJECT_DIR,
        )  # fmt: skip
        out[target] = json.loads((cdir / "target" / "manifest.json").read_text(encoding="utf-8"))
    return CompiledProject(gov=out["gov"], ops=out["ops"])


def _ordered_nodes(manifest: dict, path_prefix: str, resource_type: str) -> list[dict]:
    """Compiled nodes under ``path_prefix`` of one type, dependencies first."""
    nodes = {k: n for k, n in manifest["nodes"].items()
             if n["resource_type"] == resource_type and n.get("original_file_path", "").startswith(path_prefix)
             and n.get("compiled_code")}
    done: list[str] = []

    def visit(k: str) -> None:
        if k in done or k not in nodes:
            return
        for dep in nodes[k].get("depends_on", {}).get("nodes", []):
            visit(dep)
        done.append(k)

    for k in sorted(nodes):
        visit(k)
    return [nodes[k] for k in done]


def _run_models(con: duckdb.DuckDBPyConnection, manifest: dict, path_prefix: str) -> int:
    n = 0
    for node in _ordered_nodes(manifest, path_prefix, "model"):
        con.execute(f"create schema if not exists {_q(node['database'])}.{_q(node['schema'])}")
        con.execute(f"create or replace table {node['relation_name']} as {node['compiled_code']}")
        n += 1
    return n


def _run_tests(con: duckdb.DuckDBPyConnection, manifest: dict, path_prefix: str) -> int:
    """Every test's failing rows stored like dbt's store_failures (``<schema>.<alias>``); returns tests failing."""
    failing = 0
    for node in _ordered_nodes(manifest, path_prefix, "test"):
        target = f"{_q(node['database'])}.{_q(node['schema'])}.{_q(node.get('alias') or node['name'])}"
        con.execute(f"create schema if not exists {_q(node['database'])}.{_q(node['schema'])}")
        con.execute(f"create or replace table {target} as {node['compiled_code']}")
        failing += con.execute(f"select count(*) > 0 from {target}").fetchone()[0]
    return failing


# ------------------------------------------------------------------------------------------- ingestion


def _file_relation(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, encoding: str, fields: list[str]) -> str:
    """A SQL relation over one delivered file: every column as VARCHAR plus ``_row_number`` (1-based, file order)."""
    p = _lit(str(path))
    if fmt == "parquet":
        cols = con.execute(f"select name from parquet_schema({p}) where name <> 'schema'").fetchall()
        casts = ", ".join(f"cast({_q(c)} as varchar) as {_q(c)}" for (c,) in cols)
        return f"(select {casts}, cast(file_row_number + 1 as integer) as _row_number from read_parquet({p}, file_row_number = true))"
    if fmt == "jsonl":
        spec = "{" + ", ".join(f"{_lit(f)}: 'VARCHAR'" for f in fields) + "}"
        return (f"(select *, cast(row_number() over () as integer) as _row_number "
                f"from read_json({p}, format = 'newline_delimited', columns = {spec}))")
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig", "ascii"):
        return (f"(select *, cast(row_number() over () as integer) as _row_number "
                f"from read_csv({p}, header = true, all_varchar = true))")
    # DuckDB reads utf-8/utf-16/latin-1 only (the encodings extension cannot be installed here): decode via Arrow
    import csv

    import pyarrow as pa
    import pyarrow.csv as pcsv

    with path.open(encoding=encoding, newline="") as fh:
        header = next(csv.reader(fh), [])
    table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(encoding=encoding),
                          convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in header}))
    view = f"_bl_arrow_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    con.register(view, table)
    return f"(select *, cast(row_number() over () as integer) as _row_number from {view})"


_CALENDAR_MACROS = """
create or replace temp macro _bl_num(v) as coalesce(try_cast(nullif(v, '') as integer), 0);
create or replace temp macro _bl_calendar(s) as
    _bl_num(s.month) between 1 and 12 and _bl_num(s.day) >= 1
    and _bl_num(s.day) <= day(last_day(make_date(_bl_num(s.year), greatest(least(_bl_num(s.month), 12), 1), 1)))
    and _bl_num(s.hour) < 24 and _bl_num(s.minute) < 60 and _bl_num(s.second) < 60;
"""


def _contract_failures_sql(ds: Dataset) -> str:
    """One row per (record, failed contract rule) of ``_bl_raw``: the pandera contract of `zqdata.contracts` in SQL."""
    from zqdata import contracts

    parts = []
    for order, f in enumerate(ds.fields):
        col = _q(f.name)
        blank = f"({col} is null or trim({col}) = '')"
        if f.required:
            r = contracts.rule_for_required(f)
            parts.append(f"select _row_number, {order} as ord, {_lit(f.name)} as field, {_lit(r.rule)} as rule, "
                         f"{_lit(r.dimension)} as dimension, {_lit(r.reason)} as detail from _bl_raw where {blank}")
        if f.type != "string":
            r = contracts.rule_for_type(f)
            calendar, pieces = "true", "null"
            if f.type in ("date", "timestamp"):  # the calendar check reads the parts extracted once per value
                pieces = (f"regexp_extract({col}, {_lit(contracts._PARTS)}, "
                          "['year', 'month', 'day', 'hour', 'minute', 'second'])")
                calendar = "_bl_calendar(s)"
            parts.append(
                f"select _row_number, {order} as ord, {_lit(f.name)} as field, {_lit(r.rule)} as rule, "
                f"{_lit(r.dimension)} as dimension, {_lit(r.reason)} || '：''' || v || '''' as detail "
                f"from (select _row_number, {col} as v, regexp_full_match({col}, {_lit(contracts.PATTERNS[f.type])}) "
                f"as m, {pieces} as s from _bl_raw where {col} is not null and not {blank}) where not (m and {calendar})")
    return " union all ".join(parts) if parts else "select 0 as _row_number, 0 as ord, '' as field, '' as rule, '' as dimension, '' as detail where false"


def _normalize_raw(con: duckdb.DuckDBPyConnection, ds: Dataset) -> None:
    """The severity policy's accepted spellings rewritten to the standard one and values trimmed, as ingestion does
    (`zqdata.standards.normalize_text`, Arrow compute over whole columns)."""
    from zqdata.contracts import field_kind
    from zqdata.standards import normalize_text

    table = con.execute("select * from _bl_raw").fetch_arrow_table()
    kinds = {f.name: field_kind(f) for f in ds.fields}
    for i, name in enumerate(table.column_names):
        if name in kinds and table.schema.field(name).type == "string":
            table = table.set_column(i, name, normalize_text(table.column(name).combine_chunks(), kinds[name]))
    con.register("_bl_raw_arrow", table)
    try:
        con.execute("create or replace temp table _bl_raw as select * from _bl_raw_arrow")
    finally:
        con.unregister("_bl_raw_arrow")


def ingest_dataset(con: duckdb.DuckDBPyConnection, landing_root: Path, ds: Dataset, day: dt.date) -> dict[str, int]:
    """Delivered files of one dataset → ods + quarantine + meta.deliveries + pandera/delivery findings."""
    from zqdata.ingest import DELIVERY_COLUMNS, LINEAGE_COLUMNS, batch_id, ensure_gov_tables
    from zqdata.landing import Manifest

    ensure_gov_tables(con, ds)
    con.execute(_CALENDAR_MACROS)
    folder = landing_root / ds.agency / ds.code / day.isoformat()
    mpath = folder / "_manifest.json"
    manifest = Manifest.model_validate_json(mpath.read_bytes()) if mpath.exists() else None
    entries = {f.name: f for f in manifest.files} if manifest else {}
    now = dt.datetime.now(dt.timezone.utc)
    counts = {"delivered": 0, "accepted": 0, "quarantined": 0}
    fields = ds.field_names
    field_list = ", ".join(_q(f) for f in fields)
    lineage = ("? || _row_number, ?, ?, ?, _row_number, ?, ?, ?")
    for path in sorted(p for p in folder.glob("*") if p.name != "_manifest.json") if folder.exists() else []:
        entry = entries.get(path.name)
        fmt = entry.format if entry else path.suffix.lstrip(".")
        key = f"{ds.agency}/{ds.code}/{day.isoformat()}/{path.name}"
        with path.open("rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        rel = _file_relation(con, path, fmt, entry.encoding if entry else ds.delivery.encoding, fields)
        con.execute(f"create or replace temp table _bl_raw as select * from {rel}")
        _normalize_raw(con, ds)
        cols = [c for (c,) in con.execute("select column_name from (describe _bl_raw)").fetchall() if c != "_row_number"]
        delivered = con.execute("select count(*) from _bl_raw").fetchone()[0]
        params = [f"{ds.code}/{day.isoformat()}/{path.name}#", ds.agency, ds.code, key, batch_id(ds.code, day, sha), now, day]
        raw = "to_json(struct_pack(" + ", ".join(f"{_q(c)} := {_q(c)}" for c in cols) + "))::VARCHAR"
        problems = []
        if set(cols) != set(fields):
            problems.append(("contract.column_set", "understandability", "文件列与登记的数据集结构不一致"))
        if entry and entry.sha256 != sha:
            problems.append(("delivery.checksum_mismatch", "accuracy", "文件校验和与清单不符"))
        if problems:  # the whole file is quarantined with the delivery-level reason
            rule, dim, reason = problems[0]
            con.execute(f"insert into quarantine.rows select {lineage}, {raw}, ?, ?, ?, NULL from _bl_raw",
                        [*params, reason, rule, dim])
            accepted = 0
        else:
            con.execute(f"create or replace temp table _bl_fail as {_contract_failures_sql(ds)}")
            con.execute(
                f"insert into ods.{_q(ds.code)} ({field_list}, {', '.join(n for n, _ in LINEAGE_COLUMNS)}) "
                f"select {field_list}, {lineage} from _bl_raw anti join _bl_fail using (_row_number)", params)
            con.execute(
                f"insert into quarantine.rows select {lineage}, {raw}, f.reason, f.rule, f.dimension, f.field "
                f"from _bl_raw join (select _row_number, string_agg(detail, '；' order by ord, rule) as reason, "
                f"arg_min(rule, ord) as rule, arg_min(dimension, ord) as dimension, arg_min(field, ord) as field "
                f"from _bl_fail group by _row_number) f using (_row_number) order by _row_number", params)
            con.execute(
                "insert into quality.findings select ?, ?, ?, 'pandera', rule, dimension, 'error', ?, _row_number, "
                "? || _row_number, field, detail from _bl_fail",
                [day, ds.agency, ds.code, key, params[0]])
            accepted = delivered - con.execute("select count(distinct _row_number) from _bl_fail").fetchone()[0]
        if entry and entry.record_count != delivered:
            con.execute("insert into quality.findings values (?, ?, ?, 'delivery', 'delivery.record_count_mismatch', "
                        "'completeness', 'error', ?, NULL, NULL, NULL, ?)",
                        [day, ds.agency, ds.code, key, f"清单 {entry.record_count} 条，实际 {delivered} 条"])
        row = {n: None for n, _ in DELIVERY_COLUMNS}
        row.update(partition_date=day, agency=ds.agency, dataset=ds.code, delivery_file=key, file_name=path.name,
                   format=fmt, manifest_present=manifest is not None, actual_record_count=delivered,
                   manifest_record_count=entry.record_count if entry else None, actual_sha256=sha,
                   manifest_sha256=entry.sha256 if entry else None, size_bytes=path.stat().st_size,
                   rows_delivered=delivered, rows_accepted=accepted, rows_quarantined=delivered - accepted,
                   status="ok" if not problems else "quarantined", ingested_at=now,
                   delivered_at=manifest.delivered_at if manifest else None)
        names = [n for n, _ in DELIVERY_COLUMNS if n in row]
        con.execute(f"insert into meta.deliveries ({', '.join(names)}) values ({', '.join('?' for _ in names)})",
                    [row[n] for n in names])
        counts["delivered"] += delivered
        counts["accepted"] += accepted
        counts["quarantined"] += delivered - accepted
    return counts


# ------------------------------------------------------------------------------------------- checks


def dataset_checks(con: duckdb.DuckDBPyConnection, registry: Registry, day: dt.date) -> dict[str, dict]:
    """The dataset-level metrics the GX suites test (volume, key uniqueness, fill rates, code-table share, medians)."""
    from zqdata.reference import staging_model

    out: dict[str, dict] = {}
    for ds in registry.datasets.values():
        rel = f"staging.{_q(staging_model(registry, ds.code))}"
        pk = "concat_ws('|', " + ", ".join(f"cast({_q(c)} as varchar)" for c in ds.primary_key) + ")"
        items = ["count(*) as rows", f"count(distinct {pk}) as pk_distinct"]
        for f in ds.fields:
            if not f.required:
                items.append(f"avg(({_q(f.name)} is not null)::int) as {_q('fill_' + f.name)}")
            if f.code_table:
                items.append(
                    f"avg(({_q(f.name)} in (select code from ref.code_tables where table_name = {_lit(f.code_table)}))::int) "
                    f"as {_q('code_' + f.name)}")
            if f.range is not None and f.type in ("integer", "decimal"):
                items.append(f"median({_q(f.name)}) as {_q('median_' + f.name)}")
        cur = con.execute(f"select {', '.join(items)} from {rel} where _partition_date = ?", [day])
        out[ds.code] = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    return out


def scores(con: duckdb.DuckDBPyConnection, day: dt.date) -> int:
    """Per dataset × dimension: records checked / failed and pass rate (the shape of quality.scores)."""
    con.execute("create schema if not exists bench")
    con.execute(
        """create or replace table bench.scores as
           select f.dataset, f.dimension, d.rows as records_checked, count(distinct f.lineage_id) as records_failed,
                  count(distinct f.rule) as rules_failed,
                  1 - count(distinct f.lineage_id) / greatest(d.rows, 1) as pass_rate
           from quality.findings f
           join (select dataset, sum(rows_delivered) as rows from meta.deliveries where partition_date = ? group by 1) d
             using (dataset)
           where f.partition_date = ? group by f.dataset, f.dimension, d.rows""", [day, day])
    return con.execute("select count(*) from bench.scores").fetchone()[0]


# ------------------------------------------------------------------------------------------- boundary


def cross(con: duckdb.DuckDBPyConnection, registry: Registry, day: dt.date, key) -> dict[str, int]:
    """gov → ops in one statement per table: the registry's mask rules (`zqdata.desensitize`), consent filter."""
    from zqdata.authorization import authorized_fields
    from zqdata.boundary import (SubjectSets, consent_filter_sql, consent_reference_day, fields_used, gov_relation,
                                 release_consent_filter_sql, scenarios_in_force)
    from zqdata.desensitize import release_select

    rows: dict[str, int] = {}
    base = {"zq_partition": day}  # pseudonym keys per (field role, ops schema), as the boundary does

    def write(schema: str, table: str, sql: str, params: dict) -> None:
        con.execute(f"create schema if not exists ops_platform.{_q(schema)}")
        target = f"ops_platform.{_q(schema)}.{_q(table)}"
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        con.execute(f"create or replace table {target} as {sql}", used)
        rows[f"{schema}.{table}"] = con.execute(f"select count(*) from {target}").fetchone()[0]

    released = [ds for ds in registry.datasets.values() if ds.release]
    ref = consent_reference_day(con, registry, day)
    in_force = scenarios_in_force(registry, day, ref)
    sets = SubjectSets(con)  # each consent subject set evaluated once, as the boundary does
    for ds in released:
        # data minimisation as the boundary does it: the fields the scenarios in force use, their consenting subjects
        items, pads = release_select(ds, fields_used(ds, [s for s in in_force if ds.code in s.authorized_fields]),
                                     day, key, "desensitized")
        where, extra = release_consent_filter_sql(con, registry, ds, day, ref, sets)
        write("desensitized", ds.code, f"select {', '.join([*items, 'src._lineage_id', 'src._partition_date'])} "
              f"from {gov_relation(con, registry, ds.code)} as src where src._partition_date = $zq_partition "
              f"and {where}", {**base, **pads, **extra})
    for sc in in_force:
        for ds_code in sc.authorized_fields:
            ds = registry.datasets[ds_code]
            items, pads = release_select(ds, authorized_fields(registry, sc.code, ds_code), day, key, f"scenario_{sc.code}")
            where, extra = "TRUE", {}
            if sc.consent_required:
                where, extra = consent_filter_sql(con, registry, sc, ds, day, subject_sets=sets)
            write(f"scenario_{sc.code}", ds_code, f"select {', '.join(items)}, src._lineage_id, src._partition_date "
                  f"from {gov_relation(con, registry, ds_code)} as src where src._partition_date = $zq_partition "
                  f"and {where}", {**base, **pads, **extra})
    sets.close()
    return rows


def leak_scan(gov_con: duckdb.DuckDBPyConnection, ops_path: Path, registry: Registry, day: dt.date) -> int:
    """The leak gate's scan (`zqdata.boundary.find_leaks`: SQL over both files); returns leaks found."""
    from zqdata.boundary import find_leaks

    with duckdb.connect(str(ops_path), read_only=True) as ops:
        return len(find_leaks(gov_con, ops, day, registry))


# ------------------------------------------------------------------------------------------- driver


@dataclass
class BaselineResult:
    partition: str
    stages: dict[str, dict] = field(default_factory=dict)
    total_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0


@contextmanager
def _stage(result: BaselineResult, name: str, sampler=None) -> Iterator[None]:
    start = time.time()
    yield
    end = time.time()
    result.stages[name] = {"seconds": round(end - start, 3)}
    if sampler is not None:
        result.stages[name].update(sampler.peak(start, end))


def run_baseline(landing_root: Path, work: Path, registry: Registry, day: dt.date, compiled: CompiledProject,
                 key, sampler=None) -> BaselineResult:
    """The whole path for one day in one DuckDB connection (gov file + attached ops file), timed per stage."""
    from zqdata.reference import sync_reference_tables

    work.mkdir(parents=True, exist_ok=True)
    gov_path, ops_path = work / GOV_DB, work / OPS_DB
    for p in (gov_path, ops_path):
        p.unlink(missing_ok=True)
    res = BaselineResult(partition=day.isoformat())
    t0 = time.time()
    con = duckdb.connect(str(gov_path))
    try:
        with _stage(res, "ingest", sampler):
            for ds in registry.datasets.values():
                for k, v in ingest_dataset(con, landing_root, ds, day).items():
                    res.counts[k] = res.counts.get(k, 0) + v
        with _stage(res, "dbt", sampler):
            sync_reference_tables(con, registry)
            res.counts["gov_models"] = _run_models(con, compiled.gov, "models/gov")
            res.counts["gov_tests_failing"] = _run_tests(con, compiled.gov, "models/gov")
        with _stage(res, "checks", sampler):
            from zqdata.quality.dbt_findings import collect_dbt_findings
            from zqdata.quality.timeliness import collect_delivery_findings

            collect_delivery_findings(con, registry, day)
            res.counts["dbt_findings"] = collect_dbt_findings(con, compiled.gov, day)
            res.counts["datasets_checked"] = len(dataset_checks(con, registry, day))
            res.counts["score_rows"] = scores(con, day)
        con.execute(f"attach {_lit(str(ops_path))} as ops_platform")
        with _stage(res, "boundary", sampler):
            crossed = cross(con, registry, day, key)
            con.execute("detach ops_platform")
            res.counts["leaks"] = leak_scan(con, ops_path, registry, day)
            res.counts["released_rows"] = sum(crossed.values())
        with _stage(res, "products", sampler):
            con.execute(f"attach {_lit(str(ops_path))} as ops_platform")
            _run_models(con, compiled.ops, "models/ops")
            res.counts["ops_tests_failing"] = _run_tests(con, compiled.ops, "models/ops")
            for node in _ordered_nodes(compiled.ops, "models/ops", "model"):
                res.products[node["name"]] = con.execute(f"select count(*) from {node['relation_name']}").fetchone()[0]
        res.counts["findings"] = con.execute(
            "select count(*) from quality.findings where partition_date = ?", [day]).fetchone()[0]
    finally:
        con.close()
    res.total_seconds = round(time.time() - t0, 3)
    return res


def main(argv: list[str] | None = None) -> int:
    from bench.memory import RssSampler, high_water_mb
    from zqdata.desensitize import key_from_env
    from zqdata.registry import registry

    p = argparse.ArgumentParser(description="Bare-DuckDB floor of the nightly path for one day.")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True)
    p.add_argument("--landing", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    reg = registry()
    compiled = compile_dbt(args.work, reg, args.date)  # query text only: not part of the floor
    sampler = RssSampler()
    sampler.start()
    try:
        res = run_baseline(args.landing, args.work / "db", reg, args.date, compiled, key_from_env(), sampler)
        res.peak_rss_mb = sampler.peak()["peak_rss_mb"]
    finally:
        sampler.stop()
    args.out.write_text(json.dumps({**asdict(res), **high_water_mb()}, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"[bench] baseline {args.date}: {res.total_seconds:.1f}s "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in res.stages.items()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
