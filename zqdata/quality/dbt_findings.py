"""dbt test failures → `quality.findings` (tool 'dbt'): one row per (rule, record) with its lineage and Art. 20 dimension."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import duckdb

LINEAGE_COLUMNS = ("_lineage_id", "_agency", "_dataset", "_delivery_file", "_row_number", "_partition_date")

# Chinese wording of each rule kind (the part of the rule id before ':'), used in the finding's detail.
RULE_TEXT = {
    "required": "必填字段为空（去除空白后）",
    "citizen_id": "公民身份号码不符合 GB 11643（校验位或出生日期错误）",
    "uscc": "统一社会信用代码校验位不符合 GB 32100（早期试点代码可能合法，需核实）",
    "mobile": "手机号码格式错误",
    "district": "行政区划代码不在肇庆市 GB/T 2260 代码表内",
    "code_table": "代码值不在登记的代码表内",
    "range": "数值超出登记的取值范围",
    "standard_format": "未使用标准书写格式（已规范化）",
    "event_in_day": "业务时间不在所属分区日内（北京时间）",
    "registry_reference": "统一社会信用代码不在当日企业登记信息中",
    "registry_district": "区县代码与企业登记信息不一致",
    "duplicate_key": "分区内主键重复",
    "citizen_id_birth_date": "出生日期与公民身份号码编码的出生日期不一致",
    "citizen_id_sex": "性别与公民身份号码第17位（奇男偶女）不一致",
    "district_level": "区县代码字段不是区县级行政区划代码（如市级 441200）",
}


def dbt_test_meta(node: Mapping[str, Any]) -> dict[str, Any]:
    """The `meta` of a dbt test node (config.meta in dbt ≥ 1.10, top-level meta before)."""
    return dict((node.get("config") or {}).get("meta") or node.get("meta") or {})


def _drop_rows_no_longer_delivered(con: duckdb.DuckDBPyConnection, day: dt.date) -> None:
    """Keep only dbt findings of rows the partition's ODS holds now. A test that did not run in the latest build (its
    model failed, or only `dbt run` was used) keeps its stored failures table from an earlier build of the same
    partition; after a redelivery those rows may no longer exist, and their findings must not (issue 12, finding 5)."""
    from zqdata.warehouse import table_exists

    datasets = [d for (d,) in con.execute(
        "select distinct dataset from quality.findings where tool = 'dbt' and partition_date = ? and dataset is not null",
        [day]).fetchall()]
    for dataset in datasets:
        if not table_exists(con, "ods", dataset):
            continue  # no ODS to compare with (not a gov DB of the ingestion layout)
        ods = '"ods"."' + dataset.replace('"', '""') + '"'
        con.execute(
            f"""delete from quality.findings f
                where f.tool = 'dbt' and f.partition_date = ? and f.dataset = ? and f.lineage_id is not null
                  and not exists (select 1 from {ods} o where o._partition_date = ? and o._lineage_id = f.lineage_id)""",
            [day, dataset, day])


def collected_with_build(single_day: bool) -> bool:
    """Whether a day's dbt findings are collected right after its build, in the gov dbt step, instead of in the
    findings step. dbt's store-failures tables (dq_audit.<test>) hold the LAST build's failing rows, whichever day:
    when builds of other days can come between a day's build and its findings step — the days of a range run, the days
    of a backfill side by side on the lakes — the findings step would read another day's rows (found by
    test_range_backfill, then by the distributed equality test: a day-3 range finding lost)."""
    from zqdata.lakes import warehouse_mode

    return not single_day or warehouse_mode() == "ducklake"


def collect_dbt_findings(con: duckdb.DuckDBPyConnection, manifest: Mapping[str, Any], partition_date: str | dt.date) -> int:
    """Replace the partition's dbt findings with the stored failures of every tagged test; returns the rows written.

    Every earlier dbt finding of the partition goes (a redelivery with fewer rows, or none, leaves no finding of a row
    that no longer exists), and a stored failure of a row the partition's ODS no longer holds is not recorded."""
    day = dt.date.fromisoformat(str(partition_date))
    from zqdata.quality.scores import ensure_quality_tables
    from zqdata.warehouse import table_columns

    ensure_quality_tables(con)  # quality.findings' one definition (scores._DDL)

    stored = table_columns(con)  # one catalog query (one per test took 0.25 s a day)
    selects: list[str] = []
    params: list[Any] = []
    for node in manifest.get("nodes", {}).values():
        if node.get("resource_type") != "test":
            continue
        meta = dbt_test_meta(node)
        if not {"rule", "dimension", "severity"} <= meta.keys():
            continue
        table = (node.get("schema"), node.get("alias") or node.get("name"))
        if table not in stored:
            continue
        columns = set(stored[table])
        if not set(LINEAGE_COLUMNS) <= columns:
            # relational tests on intermediate models fail the dbt build (blocking checks); no row lineage to record
            continue
        kind = str(meta["rule"]).split(":", 1)[0]
        text = RULE_TEXT.get(kind, kind)
        # The detail is "<rule text>：<field> = <value>": the raw value stays in the gov DB, and every display of the
        # finding masks it by the field's classification (zqdata.display.mask_text parses exactly this shape).
        field_sql = "field" if "field" in columns else "null"
        value_sql = "value" if "value" in columns else "null"
        selects.append(
            f"""select cast(_partition_date as date), _agency, _dataset, 'dbt', ?, ?, ?, _delivery_file,
                       cast(_row_number as integer), _lineage_id, {field_sql},
                       ? || coalesce('：' || {field_sql} || ' = ' || {value_sql}, '')
                from "{table[0]}"."{table[1]}" where cast(_partition_date as date) = ?"""
        )
        params += [meta["rule"], meta["dimension"], meta["severity"], text, day]
    con.execute("begin transaction")
    try:
        con.execute("delete from quality.findings where tool = 'dbt' and partition_date = ?", [day])
        written = 0
        if selects:
            before = con.execute("select count(*) from quality.findings").fetchone()[0]
            con.execute(
                "insert into quality.findings (partition_date, agency, dataset, tool, rule, dimension, severity,"
                " delivery_file, row_number, lineage_id, field, detail) " + " union all ".join(selects),
                params,
            )
            _drop_rows_no_longer_delivered(con, day)
            written = con.execute("select count(*) from quality.findings").fetchone()[0] - before
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return written


