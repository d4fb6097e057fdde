"""逐级溯源 (Art. 20): trace a product, ops dataset, gov model or quality finding back to the delivery file, rows and agency.

The asset levels come from a static map (asset-key conventions, refined by the dbt manifest when it exists); the rows come
from lineage ids: `_source_lineage_ids` / `_lineage_id` on the ops side, then `ods.<dataset>` / `quarantine.rows` /
`meta.deliveries` on the gov side. Reads only; personal fields are masked for display with the registry's mask rules.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from zqdata import asset_keys, display
from zqdata.quality.dimensions import cn_name
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ, repo_root

log = logging.getLogger(__name__)

MAX_TRACE_ROWS = 50  # a trace is for people; the full list of failing rows stays in quality.findings

_LINEAGE_RE = re.compile(r"^(?P<dataset>[a-z][a-z0-9_]*)/(?P<day>\d{4}-\d{2}-\d{2})/(?P<file>[^#]+)#(?P<row>\d+)$")

# Level kinds from the product down to the agency, with their Chinese names (rendering and JSON).
LEVEL_NAMES = {
    "check": "质量检查 quality check",
    "product": "数据产品 product (运营服务平台)",
    "ops_dataset": "场景/脱敏数据 ops dataset (运营服务平台)",
    "intermediate": "整合模型 intermediate model (市政务大数据平台)",
    "staging": "标准化模型 staging model (市政务大数据平台)",
    "ods": "贴源层 ODS (市政务大数据平台)",
    "delivery": "交付文件 delivery file (落地区 landing zone)",
    "agency": "数源机构 source agency",
}


class TraceError(ValueError):
    """The trace target or its lineage ids cannot be resolved."""


@dataclass
class TraceLevel:
    kind: str
    name_cn: str
    asset_key: str
    table: str = ""
    platform: str = ""  # "ops" | "gov" | "landing" | ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceRow:
    lineage_id: str
    dataset: str
    agency: str
    delivery_file: str
    row_number: int
    partition_date: str
    status: str  # "ods" | "quarantined" | "not_found"
    batch_id: str = ""
    values: dict[str, str] = field(default_factory=dict)  # masked for display
    quarantine_reason: str = ""


@dataclass
class SourceDelivery:
    agency: str
    agency_name: str
    contact_person: str
    contact_email: str
    dataset: str
    dataset_name: str
    partition_date: str
    delivery_file: str
    row_numbers: list[int]
    manifest: list[dict[str, Any]] = field(default_factory=list)  # meta.deliveries rows of that file
    redeliver_to: str = ""


@dataclass
class Trace:
    target: str
    generated_at: str
    levels: list[TraceLevel]
    sources: list[SourceDelivery]
    rows: list[SourceRow]
    findings: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    @property
    def agencies(self) -> list[str]:
        return sorted({s.agency for s in self.sources})

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Trace":
        """Rebuild a trace stored as JSON (e.g. in the issue register) to render it again."""
        return cls(
            target=d["target"],
            generated_at=d["generated_at"],
            levels=[TraceLevel(**lv) for lv in d.get("levels", [])],
            sources=[SourceDelivery(**s) for s in d.get("sources", [])],
            rows=[SourceRow(**r) for r in d.get("rows", [])],
            findings=list(d.get("findings", [])),
            truncated=bool(d.get("truncated")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def to_text(self) -> str:
        """Chinese plain text, level by level (for the CLI and e-mail)."""
        return _render(self, markdown=False)

    def to_markdown(self) -> str:
        """Markdown for the Dagster UI."""
        return _render(self, markdown=True)


# --------------------------------------------------------------------------- lineage ids


def parse_lineage_id(lineage_id: str) -> tuple[str, str, str, int]:
    """`<dataset>/<YYYY-MM-DD>/<file>#<row>` → (dataset, day, file name, row number)."""
    m = _LINEAGE_RE.match(lineage_id.strip())
    if not m:
        raise TraceError(f"无法解析的血缘编号 lineage id: {lineage_id!r} (expected <dataset>/<YYYY-MM-DD>/<file>#<row>)")
    return m["dataset"], m["day"], m["file"], int(m["row"])


# --------------------------------------------------------------------------- display masking

# Masking for display lives in zqdata.display (by classification, whatever a value looks like); re-exported here.
HIDDEN = display.HIDDEN
scrub_text = display.scrub_text


def mask_rows(ds: Dataset, rows: Sequence[Mapping[str, Any]], as_of: dt.date) -> list[dict[str, str]]:
    """Field values of a few rows as they may be shown in a trace or alert: `zqdata.display.mask_value` per field (the
    registry's classification and mask rule, whatever the value looks like; equal to the boundary's SQL on well-formed
    values). Pseudonymized and suppressed fields are hidden (no key is needed to display a trace); the agency finds the
    row by delivery file + row number.
    """
    return [display.mask_row(ds, r, as_of) for r in rows]


# --------------------------------------------------------------------------- asset levels (static map)


def manifest_path() -> Path:
    return repo_root() / "dbt_project" / "target" / "manifest.json"


def load_manifest(path: Path | None = None) -> dict[str, Any] | None:
    """The dbt manifest if it has been built (`dbt parse`), else None (conventions are used)."""
    p = path or manifest_path()
    if not p.exists():
        return None
    return _read_manifest(p, p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_manifest(path: Path, mtime_ns: int) -> dict[str, Any]:
    """Parsed once per file version (read only by the callers): a night traces dozens of failed checks."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _manifest_models(manifest: Mapping[str, Any] | None, dataset: str) -> tuple[list[str], list[str]]:
    """(staging models, intermediate models) fed by `ods.<dataset>` according to the dbt manifest."""
    if not manifest:
        return [], []
    nodes = manifest.get("nodes", {})
    sources = {
        uid for uid, s in manifest.get("sources", {}).items() if s.get("source_name") == "ods" and s.get("name") == dataset
    }
    staging = {uid for uid, n in nodes.items() if n.get("resource_type") == "model" and sources & set(_parents(n))}
    # Direct children only: an intermediate model that merely joins this dataset in (e.g. int_electricity_usage reading
    # int_enterprise_registry for a consistency rule) belongs to its own dataset's path, not this one.
    intermediate = {
        uid
        for uid, n in nodes.items()
        if n.get("resource_type") == "model" and "intermediate" in n.get("fqn", []) and staging & set(_parents(n))
    }
    return sorted(nodes[u]["name"] for u in staging), sorted(nodes[u]["name"] for u in intermediate)


def _parents(node: Mapping[str, Any]) -> list[str]:
    return list((node.get("depends_on") or {}).get("nodes", []))


def dataset_models(registry: Registry, dataset: str, manifest: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """The gov dbt models of a dataset: from the manifest, else by the naming convention (stg_<agency>__<ds>, int_<ds>)."""
    staging, intermediate = _manifest_models(manifest, dataset)
    ds = registry.datasets[dataset]
    return staging or [f"stg_{ds.agency}__{dataset}"], intermediate or [f"int_{dataset}"]


def normalize_target(target: str) -> str:
    """Asset key (`ops/products/x`) or table (`products.x`, `scenario_s.ds`, `ods.ds`, ...) → asset key string."""
    t = target.strip().strip("/")
    if "/" in t:
        return asset_keys.canonical(t)
    if "." not in t:
        raise TraceError(f"无法识别的溯源对象 {target!r}: give an asset key like ops/products/<model> or a table like products.<model>")
    schema, name = t.split(".", 1)
    if schema == "products":
        return asset_keys.key_string("product", name)
    if schema == "desensitized" or schema.startswith("scenario_"):
        return asset_keys.key_string("desensitized", name)
    if schema in ("staging", "intermediate", "ods"):
        return asset_keys.key_string(schema, name)
    if schema == "quality":
        return f"gov/quality/{name}"
    raise TraceError(f"无法识别的表 {target!r}: unknown schema {schema!r}")


def asset_levels(
    registry: Registry, target: str, dataset: str, manifest: Mapping[str, Any] | None = None
) -> list[TraceLevel]:
    """The level-by-level asset path from `target` down to the dataset's delivery and agency."""
    key = normalize_target(target)
    ds = registry.datasets[dataset]
    agency = registry.agencies[ds.agency]
    staging, intermediate = dataset_models(registry, dataset, manifest)
    chain: list[TraceLevel] = []
    parts = key.split("/")
    if parts[:2] == ["ops", "products"]:
        product = parts[2]
        table = f"products.{product}"
        try:
            sc = registry.scenario_for_product(product)
            chain.append(TraceLevel("product", LEVEL_NAMES["product"], key, table, "ops", {"scenario": sc.code, "scenario_name": sc.name}))
            ops_table = f"scenario_{sc.code}.{dataset}"
        except KeyError:
            chain.append(TraceLevel("product", LEVEL_NAMES["product"], key, table, "ops"))
            ops_table = f"desensitized.{dataset}"
        chain.append(TraceLevel("ops_dataset", LEVEL_NAMES["ops_dataset"], asset_keys.key_string("desensitized", dataset), ops_table, "ops"))
    elif parts[:2] == ["ops", "desensitized"]:
        chain.append(TraceLevel("ops_dataset", LEVEL_NAMES["ops_dataset"], key, f"desensitized.{dataset}", "ops"))
    elif parts[0] == "gov" and parts[1] not in ("intermediate", "staging", "ods"):
        chain.append(TraceLevel("check", LEVEL_NAMES["check"], key, ".".join(parts[1:]), "gov"))
    start = {"intermediate": 0, "staging": 1, "ods": 2}.get(parts[1], 0) if parts[0] == "gov" else 0
    if parts[0] == "landing":
        start = 3
    gov_levels = [
        *[TraceLevel("intermediate", LEVEL_NAMES["intermediate"], f"gov/intermediate/{m}", f"intermediate.{m}", "gov") for m in intermediate],
        *[TraceLevel("staging", LEVEL_NAMES["staging"], f"gov/staging/{m}", f"staging.{m}", "gov") for m in staging],
        TraceLevel("ods", LEVEL_NAMES["ods"], asset_keys.key_string("ods", dataset), f"ods.{dataset}", "gov"),
        TraceLevel("delivery", LEVEL_NAMES["delivery"], asset_keys.key_string("delivery", dataset),
                   f"landing/{ds.agency}/{dataset}/", "landing"),
    ]
    kinds = ["intermediate", "staging", "ods", "delivery"]
    chain += [lv for lv in gov_levels if kinds.index(lv.kind) >= start]
    chain.append(
        TraceLevel(
            "agency",
            LEVEL_NAMES["agency"],
            agency.code,
            detail={"name": agency.name, "contact_person": agency.contact.person, "email": agency.contact.email},
        )
    )
    return chain


# --------------------------------------------------------------------------- rows


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    from zqdata.warehouse import table_exists as exists

    return exists(con, schema, table)


def _columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str]:
    from zqdata.warehouse import table_columns

    return table_columns(con, schema).get((schema, table), [])


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def product_lineage_ids(
    ops_con: duckdb.DuckDBPyConnection,
    registry: Registry,
    product: str,
    row_filter: Mapping[str, Any],
    limit: int = MAX_TRACE_ROWS,
) -> list[str]:
    """Lineage ids of the input rows of the product rows matching `row_filter` (column = value, parameterized).

    Record-level products carry `_source_lineage_ids`; aggregates (transit) are matched back to the scenario table by the
    product's grouping columns shared with it, `_partition_date`, and an hour column against the event-time field.
    """
    if not table_exists(ops_con, "products", product):
        raise TraceError(f"运营服务平台没有产品表 products.{product}")
    cols = _columns(ops_con, "products", product)
    unknown = [c for c in row_filter if c not in cols]
    if unknown:
        raise TraceError(f"产品 {product} 没有字段 {unknown} (columns: {cols})")
    where, params = _where(row_filter)
    if "_source_lineage_ids" in cols:
        rows = ops_con.execute(
            f'select distinct unnest("_source_lineage_ids")::varchar from products."{product}"{where} limit {int(limit) + 1}',
            params,
        ).fetchall()
        return [r[0] for r in rows]
    # Aggregate product: the input rows are the scenario rows of the same partition and group.
    sc = registry.scenario_for_product(product)
    out: list[str] = []
    for ds_code in sc.authorized_fields:
        schema, table = f"scenario_{sc.code}", ds_code
        if not table_exists(ops_con, schema, table):
            continue
        src_cols = _columns(ops_con, schema, table)
        ds = registry.datasets[ds_code]
        clauses, p = [], []
        groups = fetch_dicts(ops_con, f'select * from products."{product}"{where} limit {int(limit)}', params)
        for g in groups:
            parts = []
            for c, v in g.items():
                if c in src_cols and not c.startswith("_source") and v is not None:
                    parts.append(f'"{c}" = ?')
                    p.append(v)
                elif c in ("hour", "hour_of_day", "swipe_hour") and ds.event_time_field in src_cols and v is not None:
                    parts.append(f'hour(try_cast("{ds.event_time_field}" as timestamp)) = ?')
                    p.append(int(v))
            if parts:
                clauses.append("(" + " and ".join(parts) + ")")
        if clauses:
            rows = ops_con.execute(
                f'select "_lineage_id" from {schema}."{table}" where {" or ".join(clauses)} order by 1 limit {int(limit) + 1}', p
            ).fetchall()
            out += [r[0] for r in rows]
    return out


def ops_dataset_lineage_ids(
    ops_con: duckdb.DuckDBPyConnection, table: str, row_filter: Mapping[str, Any], limit: int = MAX_TRACE_ROWS
) -> list[str]:
    """Lineage ids of the rows of an ops dataset table (`desensitized.<ds>` / `scenario_<s>.<ds>`) matching the filter."""
    schema, name = table.split(".", 1)
    if not table_exists(ops_con, schema, name):
        raise TraceError(f"运营服务平台没有表 {table}")
    where, params = _where(row_filter)
    return [r[0] for r in ops_con.execute(f'select "_lineage_id" from {schema}."{name}"{where} limit {int(limit) + 1}', params).fetchall()]


def _where(row_filter: Mapping[str, Any]) -> tuple[str, list[Any]]:
    for c in row_filter:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c):
            raise TraceError(f"非法字段名 invalid column name {c!r}")
    if not row_filter:
        return "", []
    return " where " + " and ".join(f'"{c}"::varchar = ?' for c in row_filter), [str(v) for v in row_filter.values()]


def source_rows(gov_con: duckdb.DuckDBPyConnection, registry: Registry, lineage_ids: Iterable[str]) -> list[SourceRow]:
    """The gov-side rows of the lineage ids (ODS, else quarantine), personal fields masked for display."""
    return _source_rows(gov_con, registry, lineage_ids)[0]


def _source_rows(
    gov_con: duckdb.DuckDBPyConnection, registry: Registry, lineage_ids: Iterable[str]
) -> tuple[list[SourceRow], dict[str, Mapping[str, Any]]]:
    """(masked source rows, raw values by lineage id): the raw values never leave this module — they let a finding's
    detail be masked wherever it repeats a personal value of its row (`zqdata.display.mask_text`)."""
    from zqdata.warehouse import existing_tables

    raw_by_id: dict[str, Mapping[str, Any]] = {}
    by_ds: dict[str, list[str]] = {}
    for lid in dict.fromkeys(lineage_ids):
        ds, *_ = parse_lineage_id(lid)
        if ds not in registry.datasets:
            raise TraceError(f"血缘编号 {lid!r} 指向未登记的数据集 {ds!r}")
        by_ds.setdefault(ds, []).append(lid)
    out: list[SourceRow] = []
    present = existing_tables(gov_con, ("ods", "quarantine")) if by_ds else set()
    for ds_code, ids in by_ds.items():
        ds = registry.datasets[ds_code]
        found: dict[str, SourceRow] = {}
        raw_values: dict[str, Mapping[str, Any]] = {}
        reason_field: dict[str, Any] = {}
        ods, quarantined = _stored_rows(gov_con, ds_code, ids, present)
        for lid, r in ods.items():
            found[lid] = _source_row(ds, r, "ods")
            raw_values[lid] = r
        for lid, r in quarantined.items():
            if lid not in found:
                row = _source_row(ds, r, "quarantined")
                row.quarantine_reason = str(r.get("reason") or "")  # masked below, with the row's raw values
                reason_field[r["_lineage_id"]] = r.get("field")
                found[r["_lineage_id"]] = row
                raw_values[r["_lineage_id"]] = _json_obj(r.get("raw_record"))
        by_day: dict[str, list[str]] = {}
        for lid, row in found.items():
            by_day.setdefault(row.partition_date, []).append(lid)
        for day, lids in by_day.items():
            as_of = dt.date.fromisoformat(day[:10]) if day else dt.datetime.now(TZ).date()
            for lid, vals in zip(lids, mask_rows(ds, [raw_values[x] for x in lids], as_of)):
                found[lid].values = vals
                if found[lid].quarantine_reason:
                    found[lid].quarantine_reason = display.mask_text(
                        ds, reason_field.get(lid), found[lid].quarantine_reason, as_of, raw_row=raw_values[lid])
        raw_by_id.update(raw_values)
        for lid in ids:
            if lid in found:
                out.append(found[lid])
            else:
                _, day, file, rn = parse_lineage_id(lid)
                out.append(SourceRow(lid, ds_code, ds.agency, f"{ds.agency}/{ds_code}/{day}/{file}", rn, day, "not_found"))
    return out, raw_by_id


def _stored_rows(gov_con: duckdb.DuckDBPyConnection, ds_code: str, ids: list[str],
                 present: set[tuple[str, str]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({lineage id: its ODS row}, {lineage id: its quarantine row, for those not in the ODS}) of one dataset's ids.
    Inside `zqdata.warehouse.frozen_catalog` each id is read once per block (`prefetch_source_rows` reads many at once)."""
    from zqdata.warehouse import frozen_rows

    memo = frozen_rows(gov_con)
    out: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = ({}, {})
    for n, (table, schema_table) in enumerate(((f'ods."{ds_code}"', ("ods", ds_code)),
                                              ('quarantine."rows"', ("quarantine", "rows")))):
        wanted = [i for i in ids if i not in out[0]]  # the quarantine holds what the ODS does not
        todo = wanted if memo is None else [i for i in wanted if (table, i) not in memo]
        fetched: dict[str, dict[str, Any]] = {}
        if todo and schema_table in present:
            # The day and the row number are part of the lineage id. Rows are stored in delivery order, so the range of
            # row numbers (like the day) lets DuckDB skip every other row group: a day of 7 M swipes 0.4 s → 0.01 s.
            parsed = [parse_lineage_id(i) for i in todo]
            where = ('"_partition_date" in (select unnest(?::date[])) and "_row_number" between ? and ? '
                     'and "_lineage_id" in (select unnest(?::varchar[]))')
            params = [sorted({p[1] for p in parsed}), min(p[3] for p in parsed), max(p[3] for p in parsed), todo]
            for r in fetch_dicts(gov_con, f"select * from {table} where {where}", params):
                fetched.setdefault(r["_lineage_id"], r)  # a row quarantined twice: its first record
        if memo is not None:
            memo.update({(table, i): fetched.get(i) for i in todo})
            fetched = {i: memo[(table, i)] for i in wanted if memo[(table, i)] is not None}
        out[n].update(fetched)
    return out


def prefetch_source_rows(gov_con: duckdb.DuckDBPyConnection, registry: Registry, lineage_ids: Iterable[str]) -> None:
    """Inside `zqdata.warehouse.frozen_catalog`: read the stored rows of many lineage ids at once (one query per dataset
    and table), for the traces that follow (the issues step traces each issue of the day: ~45 traces, each reading its
    own sample rows, took ~0.2 s a day; issue 15). Outside the block it does nothing.

    It starts the block's memo afresh: the memo holds one day's working set (this prefetch and the reads of the traces
    after it), not every row a range of a year traced."""
    from zqdata.warehouse import existing_tables, frozen_rows

    memo = frozen_rows(gov_con)
    if memo is None:
        return
    memo.clear()
    by_ds: dict[str, list[str]] = {}
    for lid in dict.fromkeys(lineage_ids):
        m = _LINEAGE_RE.match(lid.strip())
        if m and m["dataset"] in registry.datasets:  # the others: each trace reports them itself
            by_ds.setdefault(m["dataset"], []).append(lid)
    try:
        present = existing_tables(gov_con, ("ods", "quarantine")) if by_ds else set()
        for ds_code, ids in by_ds.items():
            _stored_rows(gov_con, ds_code, ids, present)
    except duckdb.Error as exc:  # only a shortcut: each trace then reads (and reports) its own rows
        log.warning("溯源预读失败 prefetch of traced rows failed: %s", display.scrub_text(str(exc)))


def _json_obj(s: Any) -> dict[str, Any]:
    if isinstance(s, dict):
        return s
    try:
        v = json.loads(s) if s else {}
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _source_row(ds: Dataset, r: Mapping[str, Any], status: str) -> SourceRow:
    day = r.get("_partition_date")
    return SourceRow(
        lineage_id=r["_lineage_id"],
        dataset=ds.code,
        agency=str(r.get("_agency") or ds.agency),
        delivery_file=str(r.get("_delivery_file") or ""),
        row_number=int(r.get("_row_number") or 0),
        partition_date=str(day or ""),
        status=status,
        batch_id=str(r.get("_batch_id") or ""),
    )


def delivery_manifest(gov_con: duckdb.DuckDBPyConnection, dataset: str, partition_date: str, delivery_file: str,
                      deliveries_exist: bool | None = None) -> list[dict[str, Any]]:
    """The `meta.deliveries` rows of one delivered file (manifest vs actual counts, checksums, status).
    ``deliveries_exist``: whether meta.deliveries exists, when the caller knows (a trace asks once, not per file)."""
    if not (table_exists(gov_con, "meta", "deliveries") if deliveries_exist is None else deliveries_exist):
        return []
    from zqdata.warehouse import frozen_rows

    memo = frozen_rows(gov_con)
    if memo is None:
        rows = fetch_dicts(gov_con, "select * from meta.deliveries where dataset = ? and partition_date::varchar = ?",
                           [dataset, partition_date])
    else:  # inside frozen_catalog: the day's deliveries of every dataset, read once (a trace names several)
        key = ("meta.deliveries", partition_date)
        if key not in memo:
            memo[key] = fetch_dicts(gov_con, "select * from meta.deliveries where partition_date::varchar = ?",
                                    [partition_date])
        rows = [r for r in memo[key] if r.get("dataset") == dataset]  # type: ignore[union-attr]
    base = delivery_file.rsplit("/", 1)[-1]
    return _jsonable([r for r in rows if str(r.get("delivery_file") or "") in (delivery_file, base)
                      or str(r.get("delivery_file") or "").endswith("/" + base)])


# --------------------------------------------------------------------------- trace


def trace(
    gov_con: duckdb.DuckDBPyConnection,
    ops_con: duckdb.DuckDBPyConnection | None,
    registry: Registry,
    asset_key_or_table: str,
    lineage_ids: Sequence[str] | None = None,
    finding: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    row_filter: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
    max_rows: int = MAX_TRACE_ROWS,
) -> Trace:
    """Level-by-level trace from a product / ops dataset / gov model / finding down to delivery file, rows and agency.

    Give lineage ids, or finding row(s) of `quality.findings`, or (ops side) a `row_filter` selecting product/ops rows.
    """
    key = normalize_target(asset_key_or_table)
    findings = [dict(finding)] if isinstance(finding, Mapping) else [dict(f) for f in (finding or [])]
    ids = list(dict.fromkeys(lineage_ids or []))
    ids += [f["lineage_id"] for f in findings if f.get("lineage_id") and f["lineage_id"] not in ids]
    if row_filter is not None and not ids:
        if ops_con is None:
            raise TraceError("从运营侧溯源需要运营服务平台数据库连接 (ops connection required)")
        parts = key.split("/")
        if parts[:2] == ["ops", "products"]:
            ids = product_lineage_ids(ops_con, registry, parts[2], row_filter, max_rows)
        elif parts[:2] == ["ops", "desensitized"]:
            raw = asset_key_or_table.strip()
            table = raw if "/" not in raw else f"desensitized.{asset_keys.parse(key)[1]}"
            ids = ops_dataset_lineage_ids(ops_con, table, row_filter, max_rows)
        else:
            raise TraceError(f"按行条件溯源只支持运营侧对象 (row filters apply to ops products/datasets), got {key}")
    truncated = len(ids) > max_rows
    ids = ids[:max_rows]
    rows, raw_by_id = _source_rows(gov_con, registry, ids)
    # Delivery-level findings (no row): still name the delivery file and agency.
    datasets = list(dict.fromkeys([r.dataset for r in rows] + [f["dataset"] for f in findings if f.get("dataset")]))
    if not datasets:
        ds_guess = _dataset_of_key(registry, key)
        if ds_guess is None:
            raise TraceError(f"{key}: 没有可溯源的血缘编号 (no lineage ids, findings or matching rows)")
        datasets = [ds_guess]
    levels: list[TraceLevel] = []
    for ds_code in datasets:
        for lv in asset_levels(registry, key, ds_code, manifest if manifest is not None else load_manifest()):
            if not any(lv.asset_key == x.asset_key and lv.kind == x.kind for x in levels):
                levels.append(lv)
    sources = _sources(gov_con, registry, rows, findings)
    for lv in levels:
        if lv.kind == "delivery":
            lv.detail = {"files": [s.delivery_file for s in sources if s.dataset == asset_keys.parse(lv.asset_key)[1]]}
    return Trace(
        target=key,
        generated_at=dt.datetime.now(TZ).isoformat(timespec="seconds"),
        levels=levels,
        sources=sources,
        rows=rows,
        findings=[finding_for_display(f, registry, raw_by_id.get(f.get("lineage_id") or ""))
                  for f in findings[:max_rows]],
        truncated=truncated or len(findings) > max_rows,
    )


def _dataset_of_key(registry: Registry, key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    if name in registry.datasets:
        return name
    for ds_code, ds in registry.datasets.items():
        if name in (f"stg_{ds.agency}__{ds_code}", f"int_{ds_code}"):
            return ds_code
    return None


def _sources(
    gov_con: duckdb.DuckDBPyConnection, registry: Registry, rows: list[SourceRow], findings: list[dict[str, Any]]
) -> list[SourceDelivery]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r in rows:
        groups.setdefault((r.dataset, r.partition_date, r.delivery_file), []).append(r.row_number)
    for f in findings:
        if f.get("dataset") and f.get("delivery_file"):
            rn = f.get("row_number")
            lst = groups.setdefault((f["dataset"], str(f.get("partition_date") or ""), str(f["delivery_file"])), [])
            if rn is not None and int(rn) not in lst:
                lst.append(int(rn))
    out = []
    deliveries_exist = table_exists(gov_con, "meta", "deliveries")
    for (ds_code, day, file), rns in sorted(groups.items()):
        ds = registry.datasets[ds_code]
        ag = registry.agencies[ds.agency]
        out.append(
            SourceDelivery(
                agency=ag.code,
                agency_name=ag.name,
                contact_person=ag.contact.person,
                contact_email=ag.contact.email,
                dataset=ds_code,
                dataset_name=ds.name,
                partition_date=day,
                delivery_file=file,
                row_numbers=sorted(set(rns)),
                manifest=delivery_manifest(gov_con, ds_code, day, file, deliveries_exist),
                redeliver_to=f"landing/{ag.code}/{ds_code}/{day}/",
            )
        )
    return out


def finding_for_display(
    f: Mapping[str, Any], registry: Registry | None = None, raw_row: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A finding as it may be shown or sent: its detail masked by the finding's field classification
    (`zqdata.display.finding`; without a registry, the pattern scrub only). ``raw_row``: the row's raw values, so a
    personal value the detail repeats anywhere is masked too."""
    keep = ("partition_date", "agency", "dataset", "tool", "rule", "dimension", "severity", "delivery_file", "row_number", "lineage_id", "field", "detail")
    d = {k: f.get(k) for k in keep if k in f}
    if d.get("detail"):
        d["detail"] = display.finding(registry, d, raw_row)["detail"]
    return _jsonable(d)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dt.datetime):
        return (v.astimezone(TZ) if v.tzinfo else v).isoformat()
    if isinstance(v, dt.date):
        return v.isoformat()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


# --------------------------------------------------------------------------- rendering


def dimension_label(key: str | None) -> str:
    """'accuracy' → '准确性（accuracy）' (names from zqdata.quality.dimensions); unknown keys as given."""
    if not key:
        return "-"
    try:
        return f"{cn_name(key)}（{key}）"
    except ValueError:
        return key


def _render(t: Trace, markdown: bool) -> str:
    h = "### " if markdown else ""
    li = "- " if markdown else "  "
    code = (lambda s: f"`{s}`") if markdown else (lambda s: s)
    lines = [f"{h}逐级溯源 trace: {code(t.target)}", f"生成时间 generated: {t.generated_at}", ""]
    lines.append(f"{h}溯源路径 levels")
    for i, lv in enumerate(t.levels, 1):
        where = f" 表 {code(lv.table)}" if lv.table else ""
        extra = ""
        if lv.kind == "agency":
            extra = f" {lv.detail.get('name', '')}（联系人 {lv.detail.get('contact_person', '')}，{lv.detail.get('email', '')}）"
        elif lv.kind == "product" and lv.detail.get("scenario"):
            extra = f" 场景 {lv.detail['scenario']}（{lv.detail.get('scenario_name', '')}）"
        elif lv.kind == "delivery" and lv.detail.get("files"):
            extra = " 文件 " + "、".join(code(f) for f in lv.detail["files"])
        lines.append(f"{li}{i}. {lv.name_cn}: {code(lv.asset_key)}{where}{extra}")
    lines.append("")
    lines.append(f"{h}来源交付 source deliveries")
    for s in t.sources:
        rows = row_ranges(s.row_numbers)
        lines.append(
            f"{li}{s.agency_name}（{s.agency}）· {s.dataset_name}（{s.dataset}）· 分区 {s.partition_date} · "
            f"文件 {code(s.delivery_file)} · 行号 {rows or '（交付级问题，无行号）'}"
        )
        for m in s.manifest:
            summary = "，".join(f"{k}={m[k]}" for k in m if k in _MANIFEST_KEYS and m[k] is not None)
            if summary:
                lines.append(f"{li}  交付登记 meta.deliveries: {summary}")
        lines.append(f"{li}  修正后请重新交付至 redeliver to: {code(s.redeliver_to)}")
    if t.rows:
        lines.append("")
        lines.append(f"{h}源数据行（个人信息已按登记的脱敏规则遮蔽）source rows, masked")
        for r in t.rows:
            state = {"ods": "ODS", "quarantined": "已隔离 quarantined", "not_found": "未找到 not found"}[r.status]
            vals = "，".join(f"{k}={v}" for k, v in r.values.items())
            reason = f"；隔离原因 {r.quarantine_reason}" if r.quarantine_reason else ""
            lines.append(f"{li}{code(r.lineage_id)} [{state}] 文件 {r.delivery_file} 第 {r.row_number} 行{reason}")
            if vals:
                lines.append(f"{li}  {vals}")
    if t.findings:
        lines.append("")
        lines.append(f"{h}问题明细 findings")
        for f in t.findings:
            lines.append(
                f"{li}规则 {f.get('rule')}（{dimension_label(f.get('dimension'))}，{f.get('severity')}）字段 {f.get('field') or '-'} "
                f"行 {f.get('row_number') if f.get('row_number') is not None else '-'}：{f.get('detail') or ''}"
            )
    if t.truncated:
        lines.append(f"（仅显示前 {MAX_TRACE_ROWS} 行；完整清单见 quality.findings）")
    return "\n".join(lines)


_MANIFEST_KEYS = (
    "status",
    "manifest_record_count",
    "record_count",
    "rows_delivered",
    "rows_accepted",
    "rows_quarantined",
    "sha256",
    "manifest_sha256",
    "delivered_at",
    "error",
)


def row_ranges(nums: Sequence[int]) -> str:
    """[1,2,3,7] → '1-3, 7'."""
    out, nums = [], sorted(n for n in nums if n)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)
