"""Registry-derived references for the dbt project: reference tables in the gov DB and the generated staging layer.

The registry is the one source of truth. `sync_reference_tables` copies its code tables and field rules into
`ref.*` of the gov DB, where the SQL rules read them; `render_dbt_models` writes the staging/intermediate models and
their tests from the registry (`python -m zqdata.reference` regenerates; tests/test_dbt.py checks they are current).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import yaml

from zqdata.registry import Dataset, DatasetField, Registry
from zqdata.txn import rollback_keeping_cause
from zqdata.settings import repo_root

# The daily full snapshot other enterprise datasets must agree with (一致性).
ENTERPRISE_REGISTRY = "enterprise_registry"
GENERATED_HEADER = "generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit"


_REF_TABLES = {
    "code_tables": "table_name varchar, code varchar, label varchar",
    "fields": "dataset varchar, field varchar, type varchar, required boolean, format varchar, code_table varchar,"
              " range_min double, range_max double, is_event_time boolean",
}


def reference_rows(registry: Registry) -> dict[str, list[tuple]]:
    """{ref table: its rows, sorted} as the registry defines them."""
    codes = [(t, c, label) for t, table in sorted(registry.code_tables.items()) for c, label in table.items()]
    fields = [
        (ds.code, f.name, f.type, f.required, f.format, f.code_table,
         f.range.min if f.range else None, f.range.max if f.range else None, f.name == ds.event_time_field)
        for ds in registry.datasets.values()
        for f in ds.fields
    ]
    return {"code_tables": sorted(codes, key=repr), "fields": sorted(fields, key=repr)}


def _stored_rows(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]] | None:
    """The ref tables' rows (sorted as `reference_rows`), None when one is missing or has other columns."""
    out = {}
    for table, ddl in _REF_TABLES.items():
        try:
            cur = con.execute(f"select * from ref.{table}")
        except duckdb.CatalogException:
            return None
        if [c[0] for c in cur.description] != [d.strip().split()[0] for d in ddl.split(",")]:
            return None
        out[table] = sorted((tuple(r) for r in cur.fetchall()), key=repr)
    return out


def sync_reference_tables(con: duckdb.DuckDBPyConnection, registry: Registry) -> int:
    """Replace `ref.code_tables(table_name, code, label)` and `ref.fields` from the registry; returns code rows written
    (0 when they already held exactly the registry's rows: nothing is written, so closing the connection has no
    checkpoint to make -- the gov dbt step syncs before every build, bench/notes.md 19)."""
    rows = reference_rows(registry)
    if _stored_rows(con) == rows:
        return 0
    con.execute("begin transaction")
    try:
        con.execute("create schema if not exists ref")
        for table, ddl in _REF_TABLES.items():
            con.execute(f"create or replace table ref.{table} ({ddl})")
            if rows[table]:
                con.executemany(f"insert into ref.{table} values ({', '.join('?' * len(rows[table][0]))})",
                                rows[table])
        con.execute("commit")
    except Exception as exc:
        rollback_keeping_cause(con, exc)
        raise
    return len(rows["code_tables"])


@dataclass(frozen=True)
class RuleSpec:
    """One row-level rule applied to one field (or the primary key) of a staging model."""

    rule: str  # argument of the zq_rule generic test
    field: str | None
    dimension: str
    severity: str  # the platform's severity: error rows are excluded from intermediate models
    arguments: dict

    @property
    def rule_id(self) -> str:
        return f"{self.rule}:{self.field or '+'.join(self.arguments.get('columns', []))}"


_STANDARD_KINDS = {"date", "timestamp", "decimal", "integer"}


def field_rules(dataset: Dataset) -> list[RuleSpec]:
    """The rules the registry implies for a dataset (formats, code tables, ranges, required, event time, keys, references)."""
    rules: list[RuleSpec] = []
    for f in dataset.fields:
        name = f.name
        if f.required:
            rules.append(RuleSpec("required", name, "completeness", "error", {}))
        if f.format == "citizen_id":
            rules.append(RuleSpec("citizen_id", name, "accuracy", "error", {}))
        elif f.format == "uscc":
            # early pilot codes are legal yet fail the check char: a warning, not an exclusion
            rules.append(RuleSpec("uscc", name, "accuracy", "warn", {}))
        elif f.format == "mobile":
            rules.append(RuleSpec("mobile", name, "accuracy", "error", {}))
        if f.format == "district_code" or f.code_table == "district":
            rules.append(RuleSpec("district", name, "accuracy", "error", {}))
            if f.format == "district_code" and "区县" in f.cn_name:  # documented as county level (GB/T 2260)
                rules.append(RuleSpec("district_level", name, "accuracy", "error", {}))
        elif f.code_table:
            rules.append(RuleSpec("code_table", name, "understandability", "error", {"code_table": f.code_table}))
        if f.range:
            rules.append(RuleSpec("range", name, "accuracy", "error", {"dataset": dataset.code}))
        kind = _standard_kind(f)
        if kind:
            rules.append(RuleSpec("standard_format", name, "standardization", "warn",
                                  {"dataset": dataset.code, "kind": kind}))
        if name == dataset.event_time_field:
            rules.append(RuleSpec("event_in_day", name, "timeliness", "error", {}))
    # GB 11643 encodes the birth date (digits 7–14) and sex (17th digit) of the dataset's one citizen ID (一致性)
    ids = [f.name for f in dataset.fields if f.format == "citizen_id"]
    if len(ids) == 1:
        for f in dataset.fields:
            if f.type == "date" and "出生日期" in f.cn_name:
                rules.append(RuleSpec("citizen_id_birth_date", f.name, "consistency", "error", {"columns": list(ids)}))
            elif f.code_table == "gender":
                rules.append(RuleSpec("citizen_id_sex", f.name, "consistency", "error", {"columns": list(ids)}))
    if dataset.code != ENTERPRISE_REGISTRY and _references_registry(dataset):
        rules.append(RuleSpec("registry_reference", "credit_code", "consistency", "error", {}))
        if "district_code" in dataset.field_names:
            rules.append(RuleSpec("registry_district", "district_code", "consistency", "warn",
                                  {"credit_column": "credit_code"}))
    rules.append(RuleSpec("duplicate_key", None, "consistency", "error", {"columns": list(dataset.primary_key)}))
    return rules


def _standard_kind(f: DatasetField) -> str | None:
    if f.type in _STANDARD_KINDS:
        return f.type
    return f.format  # citizen_id, uscc, mobile, district_code, year_month (full-width digits etc.)


def _references_registry(dataset: Dataset) -> bool:
    return "credit_code" in dataset.field_names and dataset.field("credit_code").format == "uscc"


def staging_model(registry: Registry, dataset: str) -> str:
    """`stg_<agency>__<dataset>` (jaffle-shop naming)."""
    return f"stg_{registry.datasets[dataset].agency}__{dataset}"


def intermediate_model(dataset: str) -> str:
    """`int_<dataset>`: the staging rows that pass every error-severity rule (what the boundary reads)."""
    return f"int_{dataset}"


def _parse_expression(f: DatasetField) -> str:
    if f.type == "date":
        return f"zq_to_date('{f.name}')"
    if f.type == "timestamp":
        return f"zq_to_timestamp('{f.name}')"
    if f.type == "decimal":
        return f"zq_to_decimal('{f.name}')"
    if f.type == "integer":
        return f"zq_to_integer('{f.name}')"
    if f.format == "year_month":
        return f"zq_to_year_month('{f.name}')"
    if f.format in ("citizen_id", "uscc"):
        return f"zq_clean_upper('{f.name}')"
    return f"zq_clean('{f.name}')"


def render_staging_sql(registry: Registry, dataset: str) -> str:
    """Staging model: one partition of `ods.<dataset>`, trimmed, typed and normalized, every lineage column kept."""
    ds = registry.datasets[dataset]
    width = max(len(f"{{{{ {_parse_expression(f)} }}}}") for f in ds.fields)
    columns = ",\n".join(
        f"        {('{{ ' + _parse_expression(f) + ' }}').ljust(width)} as {f.name}" for f in ds.fields
    )
    return f"""-- {GENERATED_HEADER}
with source as (

    select * from {{{{ source('ods', '{dataset}') }}}}
    where {{{{ zq_in_partition('_partition_date') }}}}

),

final as (

    select
{columns},
        {{{{ zq_lineage_columns() }}}}
    from source

)

select * from final
"""


def render_intermediate_sql(registry: Registry, dataset: str) -> str:
    """Intermediate model: the partition's staging rows minus those failing an error-severity rule."""
    stg = staging_model(registry, dataset)
    deps = [f"-- depends_on: {{{{ ref('{stg}') }}}}", "-- depends_on: {{ source('ref', 'code_tables') }}",
            "-- depends_on: {{ source('ref', 'fields') }}"]
    if dataset != ENTERPRISE_REGISTRY and _references_registry(registry.datasets[dataset]):
        deps.append(f"-- depends_on: {{{{ ref('{intermediate_model(ENTERPRISE_REGISTRY)}') }}}}")
    return f"""-- {GENERATED_HEADER}
{chr(10).join(deps)}
with staged as (

    select * from {{{{ ref('{stg}') }}}}
    where {{{{ zq_in_partition('_partition_date') }}}}

),

rejected as (

    -- the lineage ids failing an error-severity rule of {stg} (its tests are the list)
    {{{{ zq_error_failures('{stg}') }}}}

),

final as (

    select staged.*
    from staged
    anti join rejected on rejected._lineage_id = staged._lineage_id

)

select * from final
"""


def _test_entry(model: str, spec: RuleSpec) -> dict:
    arguments = {"rule": spec.rule, **spec.arguments}
    return {"zq_rule": {
        "name": f"{model}__{spec.rule}__{spec.field or 'key'}",
        "arguments": arguments,
        "config": {
            "severity": "warn",  # row-level: failing rows are recorded and excluded; the quality gate decides
            "meta": {"dimension": spec.dimension, "severity": spec.severity, "rule": spec.rule_id},
        },
    }}


def _column_doc(f: DatasetField) -> str:
    return f"{f.cn_name}：{f.description}"


_LINEAGE_DOCS = {
    "_lineage_id": "溯源标识 <dataset>/<日期>/<文件>#<行号>（逐级溯源，Art. 20）",
    "_agency": "数源机构代码",
    "_dataset": "数据集代码",
    "_delivery_file": "交付文件（落地区对象键）",
    "_row_number": "交付文件中的记录序号（从 1 开始）",
    "_batch_id": "交付批次标识",
    "_ingested_at": "汇聚入库时间",
    "_partition_date": "分区日期（北京时间）",
}


def _dump(doc: dict) -> str:
    return f"# {GENERATED_HEADER}\n" + yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, width=120)


def render_staging_yml(registry: Registry, dataset: str) -> str:
    """Model docs (Chinese) and the row-level quality tests of one staging model."""
    ds = registry.datasets[dataset]
    model = staging_model(registry, dataset)
    agency = registry.agencies[ds.agency]
    rules = field_rules(ds)
    columns = []
    for f in ds.fields:
        col: dict = {"name": f.name, "description": _column_doc(f)}
        tests = [_test_entry(model, r) for r in rules if r.field == f.name]
        if tests:
            col["data_tests"] = tests
        columns.append(col)
    columns += [{"name": k, "description": v} for k, v in _LINEAGE_DOCS.items()]
    return _dump({"version": 2, "models": [{
        "name": model,
        "description": (f"{ds.name}（{agency.name}）规范化层：{ds.description}"
                        f"去除首尾空白、全角数字转半角、日期时间统一为标准类型（北京时间），保留全部溯源列。"),
        "data_tests": [_test_entry(model, r) for r in rules if r.field is None],
        "columns": columns,
    }]})


def render_intermediate_yml(registry: Registry, dataset: str) -> str:
    """Docs and relational tests (primary key, registry relationship) of one intermediate model."""
    ds = registry.datasets[dataset]
    model = intermediate_model(dataset)
    meta_key = {"dimension": "consistency", "severity": "error", "rule": f"primary_key:{'+'.join(ds.primary_key)}"}
    columns: list[dict] = []
    model_tests: list[dict] = []
    # Relational tests judge each partition day on its own (zq_unique, zq_unique_combination, zq_relationship keep
    # `_partition_date` in their failures), so one build over a range of days reports each day (issue 15). The tests
    # keep the names dbt gave the `unique` / `relationships` tests they replace: the names are the asset checks' keys.
    if len(ds.primary_key) == 1:
        key = ds.primary_key[0]
        columns.append({"name": key, "description": _column_doc(ds.field(key)),
                        "data_tests": [
                            {"not_null": {"config": {"severity": "error", "meta": dict(meta_key)}}},
                            {"zq_unique": {"name": f"unique_{model}_{key}",
                                           "config": {"severity": "error", "meta": dict(meta_key)}}}]})
    else:
        model_tests.append({"zq_unique_combination": {
            "arguments": {"columns": list(ds.primary_key)},
            "config": {"severity": "error", "meta": dict(meta_key)}}})
        for k in ds.primary_key:
            columns.append({"name": k, "description": _column_doc(ds.field(k)), "data_tests": [
                {"not_null": {"config": {"severity": "error", "meta": dict(meta_key)}}}]})
    if dataset != ENTERPRISE_REGISTRY and _references_registry(ds):
        columns.append({"name": "credit_code", "description": _column_doc(ds.field("credit_code")), "data_tests": [
            {"zq_relationship": {
                "name": f"relationships_{model}_credit_code__credit_code__ref_{intermediate_model(ENTERPRISE_REGISTRY)}_",
                "arguments": {"to": f"ref('{intermediate_model(ENTERPRISE_REGISTRY)}')", "field": "credit_code"},
                "config": {"severity": "error", "meta": {
                    "dimension": "consistency", "severity": "error", "rule": "relationship:credit_code"}}}}]})
    return _dump({"version": 2, "models": [{
        "name": model,
        "description": (f"{ds.name}（{registry.agencies[ds.agency].name}）整合层：规范化后的记录中排除了未通过"
                        f"错误级质量规则的行（这些行在 quality.findings 中可追溯），供运营平台边界读取。"),
        "data_tests": model_tests,
        "columns": columns,
    }]})


def render_sources_yml(registry: Registry) -> str:
    """The ODS tables (one per registry dataset) and the registry reference tables as dbt sources."""
    return _dump({"version": 2, "sources": [
        {"name": "ods", "schema": "ods", "description": "市政务大数据平台贴源层：按交付原样保存的 VARCHAR 字段与溯源列",
         "tables": [{"name": ds.code, "description": f"{ds.name}（{registry.agencies[ds.agency].name}）"}
                    for ds in registry.datasets.values()]},
        {"name": "ref", "schema": "ref", "description": "由登记目录同步的参考表（zqdata/reference.py）",
         "tables": [{"name": "code_tables", "description": "代码表：table_name, code, label"},
                    {"name": "fields", "description": "字段规则：类型、必填、格式、代码表、取值范围"}]},
    ]})


def render_dbt_models(registry: Registry) -> dict[str, str]:
    """Relative path under `dbt_project/models` → file text, for every generated gov model."""
    files = {"gov/staging/_ods__sources.yml": render_sources_yml(registry)}
    for code in registry.datasets:
        stg = staging_model(registry, code)
        files[f"gov/staging/{stg}.sql"] = render_staging_sql(registry, code)
        files[f"gov/staging/{stg}.yml"] = render_staging_yml(registry, code)
        files[f"gov/intermediate/{intermediate_model(code)}.sql"] = render_intermediate_sql(registry, code)
        files[f"gov/intermediate/{intermediate_model(code)}.yml"] = render_intermediate_yml(registry, code)
    return files


def write_dbt_models(registry: Registry, models_dir: Path | None = None) -> list[Path]:
    """Write the generated gov models (regenerate after changing the registry)."""
    base = models_dir or repo_root() / "dbt_project" / "models"
    written = []
    for rel, text in render_dbt_models(registry).items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    from zqdata.registry import load_registry

    for p in write_dbt_models(load_registry()):
        print(p, file=sys.stderr)
