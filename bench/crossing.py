"""Probe of one table's write at the crossing (issue 15, bench/notes.md item 25): where its seconds and memory go.

    python -m bench.crossing --dir <a bench size folder> [--date 2025-06-01] [--dataset bus_card_swipes]
                             [--scope desensitized | scenario_<code>] [--variants streamed,gov_export,...]

Reads the folder's gov file (``warehouse/gov_platform.duckdb``, left as it is) and writes a scratch ops file per variant
under ``<dir>/crossing-probe`` (removed afterwards). Each variant runs in its own child process with the domains'
DuckDB memory limit; it prints wall seconds, CPU seconds (user + system) and the child's peak RSS. The query is the
crossing's own for that table (`zqdata.boundary`: the fields the scenarios in force use, the mask rules, the consent
filter); ``ZQ_PSEUDONYM_KEY`` must be set (any key: the figures do not depend on it).

- ``streamed``: the boundary's `_write_partition` (the gov query's Arrow batches inserted by the ops connection).
- ``streamed_per_value``: the same with each recurring pseudonymized field (a card, a meter: not alone the primary
  key) hashed once per distinct value in a CTE joined back on the value (not how the platform crosses: item 25).
- ``gov_export``: the gov query's Arrow export alone, what the stream pulls.
- ``gov_compute``: the same query computed by DuckDB into an aggregate (no export).
- ``ops_insert``: the ops insert alone, from the batches already exported.
- ``one_instance``: ``INSERT … SELECT`` with the gov file attached read-only to the ops instance (as the baseline
  crosses; not how the platform crosses).
The variants that write print a checksum of the rows written, whatever their order: they must agree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("streamed", "streamed_per_value", "gov_export", "gov_compute", "ops_insert", "one_instance")


def crossing_query(gov, registry, dataset: str, scope: str, day: dt.date, key, subject_sets,
                   per_value: bool = False) -> tuple[str, dict]:
    """(sql, params): the crossing's query for ``scope.dataset`` on ``day``, built as `zqdata.boundary.cross_boundary`
    builds it; with ``per_value`` each pseudonymized field that is not alone the primary key is hashed once per
    distinct value instead (`per_value_items`)."""
    from zqdata.authorization import authorized_fields
    from zqdata.boundary import (LINEAGE_COLUMNS, consent_filter_sql, consent_reference_day, fields_used,
                                 gov_relation, release_consent_filter_sql, scenarios_in_force)
    from zqdata.desensitize import release_select

    ds = registry.datasets[dataset]
    ref = consent_reference_day(gov, registry, day)
    if scope == "desensitized":
        fields = fields_used(ds, [s for s in scenarios_in_force(registry, day, ref) if dataset in s.authorized_fields])
        where, extra = release_consent_filter_sql(gov, registry, ds, day, ref, subject_sets)
    else:
        scenario = registry.scenarios[scope.removeprefix("scenario_")]
        fields = authorized_fields(registry, scenario.code, dataset)
        where, extra = "TRUE", {}
        if scenario.consent_required:
            where, extra = consent_filter_sql(gov, registry, scenario, ds, day, ref, subject_sets)
    relation, where = gov_relation(gov, registry, dataset), f"src._partition_date = $zq_partition AND {where}"
    items, pads = release_select(ds, fields, day, key, scope)
    head, joins = "", ""
    if per_value:
        head, items, joins = per_value_items(ds, fields, items, day, relation, where)
    lineage = [f"src.{c}" for c in LINEAGE_COLUMNS]
    return (f"{head}SELECT {', '.join([*items, *lineage])} FROM {relation} AS src {joins} WHERE {where}",
            {"zq_partition": day, **pads, **extra})


def per_value_items(ds, fields: list[str], items: list[str], day: dt.date, relation: str, where: str):
    """(WITH clause, select items, joins): each recurring pseudonymized field (not alone the primary key) hashed once
    per distinct value of the selected rows in a CTE ``zq_pk_<i>`` and joined back on the value (same pseudonyms)."""
    from zqdata.desensitize import mask_expression, quote_ident

    items, ctes, joins = list(items), [], []
    for i, name in enumerate(fields):
        if ds.field(name).mask.method != "pseudonymize" or ds.primary_key == [name]:
            continue
        col = quote_ident(name)
        expr = mask_expression(ds, ds.field(name), day, "k", (f"zq_ipad_{i}", f"zq_opad_{i}"))
        ctes.append(f"zq_pk_{i} AS (SELECT k, {expr} FROM (SELECT DISTINCT CAST(src.{col} AS VARCHAR) AS k "
                    f"FROM {relation} AS src WHERE {where}))")
        joins.append(f"LEFT JOIN zq_pk_{i} ON CAST(src.{col} AS VARCHAR) = zq_pk_{i}.k")
        items[i] = f"zq_pk_{i}.{col} AS {col}"
    return (f"WITH {', '.join(ctes)} " if ctes else ""), items, " ".join(joins)


def run_variant(data_dir: Path, work: Path, variant: str, dataset: str, scope: str, day: dt.date) -> dict:
    """One variant in this process; returns its figures."""
    import pyarrow as pa

    from zqdata import warehouse
    from zqdata.boundary import BATCH_ROWS, SubjectSets, _params, _write_partition
    from zqdata.desensitize import key_from_env, quote_ident
    from zqdata.registry import registry as load_registry

    reg, key = load_registry(), key_from_env()
    gov_file, ops_file = data_dir / "warehouse" / "gov_platform.duckdb", work / f"{variant}.duckdb"
    ops_file.unlink(missing_ok=True)
    gov = warehouse.connect("gov", gov_file, read_only=True)
    ops = warehouse.connect("ops", ops_file)
    sets = SubjectSets(gov)
    sql, params = crossing_query(gov, reg, dataset, scope, day, key, sets, per_value=variant == "streamed_per_value")
    params = _params(sql, params)
    target = f"{quote_ident(scope)}.{quote_ident(dataset)}"

    def create_target() -> None:
        empty = gov.execute(f"SELECT * FROM ({sql}) LIMIT 0", params).to_arrow_table()
        ops.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(scope)}")
        ops.register("_probe_empty", empty)
        ops.execute(f"CREATE TABLE {target} AS SELECT * FROM _probe_empty")
        ops.unregister("_probe_empty")

    batches = None
    if variant == "ops_insert":  # exported before the clock starts
        batches = pa.Table.from_batches(list(gov.execute(sql, params).to_arrow_reader(BATCH_ROWS)))
    if variant not in ("streamed", "streamed_per_value", "gov_export", "gov_compute"):
        create_target()
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rows: int
    if variant in ("streamed", "streamed_per_value"):
        rows = _write_partition(gov, ops, scope, dataset, sql, params, day)
    elif variant == "gov_export":
        rows = sum(b.num_rows for b in gov.execute(sql, params).to_arrow_reader(BATCH_ROWS))
    elif variant == "gov_compute":
        rows = gov.execute(f"SELECT count(*), max(hash(COLUMNS(*))) FROM ({sql})", params).fetchone()[0]
    elif variant == "ops_insert":
        ops.register("_probe_batches", batches)
        ops.execute(f"INSERT INTO {target} SELECT * FROM _probe_batches")
        rows = batches.num_rows
    elif variant == "one_instance":
        for name in sets._views.values():  # the consent subject sets, as registered on the gov connection
            ops.register(name, gov.execute(f"SELECT * FROM {name}").to_arrow_table())
        ops.execute(f"ATTACH '{gov_file}' AS zq_probe_gov (READ_ONLY)")
        ops.execute("USE zq_probe_gov")
        ops.execute(f"INSERT INTO {quote_ident(ops_file.stem)}.{target} {sql}", params)
        rows = ops.execute(f"SELECT count(*) FROM {quote_ident(ops_file.stem)}.{target}").fetchone()[0]
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    checksum = None  # of the rows written, whatever their order: the variants that write must agree
    if variant not in ("gov_export", "gov_compute"):
        name = f"{quote_ident(ops_file.stem)}.{target}" if variant == "one_instance" else target
        checksum = str(ops.execute(f"SELECT sum(hash(t)::HUGEINT) FROM {name} AS t").fetchone()[0])
    sets.close()
    gov.close()
    ops.close()
    ops_file.unlink(missing_ok=True)
    return {"variant": variant, "rows": int(rows), "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "checksum": checksum}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="a bench size folder (with warehouse/gov_platform.duckdb)")
    p.add_argument("--date", type=dt.date.fromisoformat, default=dt.date(2025, 6, 1))
    p.add_argument("--dataset", default="bus_card_swipes")
    p.add_argument("--scope", default="desensitized", help="desensitized or scenario_<code>")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # the child's own
    args = p.parse_args(argv)
    work = args.dir / "crossing-probe"
    if args.variant:
        print(json.dumps(run_variant(args.dir, work, args.variant, args.dataset, args.scope, args.date)))
        return 0
    if not (args.dir / "warehouse" / "gov_platform.duckdb").exists():
        p.error(f"{args.dir}/warehouse/gov_platform.duckdb not found")
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for variant in args.variants.split(","):
            proc = subprocess.run([sys.executable, "-m", "bench.crossing", "--dir", str(args.dir), "--date",
                                   args.date.isoformat(), "--dataset", args.dataset, "--scope", args.scope,
                                   "--variant", variant], capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{r['variant']:<20} rows {r['rows']:>10,}  wall {r['wall_s']:>6.1f} s  cpu {r['cpu_s']:>6.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:>7.1f} MB  rows checksum {r['checksum'] or '-'}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
