"""逐级溯源: traces from ops products / findings back to agency, delivery file and rows, with personal data masked.

`build_gov_db` / `build_ops_db` make small hand-built platform DBs; test_issues.py and test_alerting.py reuse them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from zqdata import lineage
from zqdata.registry import load_registry

DAY = "2025-05-01"
LINEAGE_COLS = "_lineage_id varchar, _agency varchar, _dataset varchar, _delivery_file varchar, _row_number integer, _batch_id varchar, _ingested_at timestamptz, _partition_date date"

# Values: a valid citizen id (DOMAIN.md example), a bad one, a mobile number, a person's name.
RESIDENTS = [
    # row, citizen_id, name, phone, birth_date
    (1, "11010519491231002X", "张三", "13812345678", "1949-12-31"),
    (2, "110105194912310021", "李四", "13987654321", "1990-06-15"),
    (3, "441202199002301234", "王五", "13700001111", "1990-02-30"),
]
ENTERPRISES = [
    (1, "91350100M000100Y43", "肇庆甲公司", "赵六", "441202"),
    (2, "91350100M000100Y44", "肇庆乙公司", "钱七", "441203"),
    (3, "91441200MA5ABCDE1X", "肇庆丙公司", "孙八", "441204"),
]


def lid(dataset: str, file: str, row: int, day: str = DAY) -> str:
    return f"{dataset}/{day}/{file}#{row}"


def build_gov_db(path: Path, findings: list[tuple] | None = None, day: str = DAY) -> duckdb.DuckDBPyConnection:
    """A gov DB with ODS rows for two agencies (psb, samr), one quarantined row, meta.deliveries and quality.findings."""
    con = duckdb.connect(str(path))
    con.execute("create schema if not exists ods; create schema if not exists quarantine; create schema if not exists meta; create schema if not exists quality")
    con.execute(
        f"create table if not exists ods.resident_population (citizen_id varchar, name varchar, gender varchar, birth_date varchar, phone varchar, address varchar, district_code varchar, case_flag varchar, updated_at varchar, {LINEAGE_COLS})"
    )
    con.execute(
        f"create table if not exists ods.enterprise_registry (credit_code varchar, ent_name varchar, legal_rep_name varchar, legal_rep_id varchar, district_code varchar, reg_capital_wan varchar, status varchar, established_date varchar, updated_at varchar, {LINEAGE_COLS})"
    )
    con.execute(
        f"create table if not exists ods.bus_card_swipes (swipe_id varchar, card_id varchar, card_type varchar, route_id varchar, stop_id varchar, swipe_time varchar, fare_yuan varchar, {LINEAGE_COLS})"
    )
    con.execute(f"create table if not exists quarantine.rows ({LINEAGE_COLS}, raw_record varchar, reason varchar, rule varchar, dimension varchar, field varchar)")
    con.execute(
        "create table if not exists meta.deliveries (agency varchar, dataset varchar, partition_date date, delivery_file varchar, status varchar, manifest_record_count integer, rows_delivered integer, rows_accepted integer, rows_quarantined integer, sha256 varchar, delivered_at timestamptz, error varchar)"
    )
    con.execute(
        "create table if not exists quality.findings (partition_date date, agency varchar, dataset varchar, tool varchar, rule varchar, dimension varchar, severity varchar, delivery_file varchar, row_number integer, lineage_id varchar, field varchar, detail varchar)"
    )
    rp_file = f"psb/resident_population/{day}/part-0001.jsonl"
    for rn, cid, name, phone, birth in RESIDENTS:
        con.execute(
            "insert into ods.resident_population values (?, ?, '1', ?, ?, '端州区某路1号', '441202', 'X', ?, ?, 'psb', 'resident_population', ?, ?, 'b1', now(), ?)",
            [cid, name, birth, phone, f"{day} 08:00:00", lid("resident_population", "part-0001.jsonl", rn, day), rp_file, rn, day],
        )
    er_file = f"samr/enterprise_registry/{day}/part-0001.csv"
    for rn, code, ent, rep, district in ENTERPRISES:
        con.execute(
            "insert into ods.enterprise_registry values (?, ?, ?, '11010519491231002X', ?, '100', '1', '2020-01-01', ?, ?, 'samr', 'enterprise_registry', ?, ?, 'b2', now(), ?)",
            [code, ent, rep, district, f"{day} 09:00:00", lid("enterprise_registry", "part-0001.csv", rn, day), er_file, rn, day],
        )
    raw = json.dumps({"credit_code": "9144", "ent_name": "肇庆丁公司", "legal_rep_name": "周九", "legal_rep_id": "11010519491231002X"}, ensure_ascii=False)
    con.execute(
        "insert into quarantine.rows values (?, 'samr', 'enterprise_registry', ?, 4, 'b2', now(), ?, ?, '必填字段 established_date 为空', 'completeness.required', 'completeness', 'established_date')",
        [lid("enterprise_registry", "part-0001.csv", 4, day), er_file, day, raw],
    )
    con.execute(
        "insert into meta.deliveries values ('samr', 'enterprise_registry', ?, ?, 'accepted', 4, 4, 3, 1, 'abc123', now(), null), ('psb', 'resident_population', ?, ?, 'accepted', 3, 3, 3, 0, 'def456', now(), null)",
        [day, er_file, day, rp_file],
    )
    for i in range(1, 9):  # transit swipes on route 11, hour 8
        con.execute(
            "insert into ods.bus_card_swipes values (?, ?, '01', '11', 'S1', ?, '2.00', ?, 'transport', 'bus_card_swipes', ?, ?, 'b3', now(), ?)",
            [f"SW{i}", f"CARD{i}", f"{day} 08:{i:02d}:00", lid("bus_card_swipes", "part-0001.parquet", i, day), f"transport/bus_card_swipes/{day}/part-0001.parquet", i, day],
        )
    set_findings(con, day, findings if findings is not None else default_findings(day))
    return con


def default_findings(day: str = DAY) -> list[tuple]:
    """Two agencies: psb (citizen id check char on rows 2 and 3, error) and samr (USCC check char on row 2, warn)."""
    rp = f"psb/resident_population/{day}/part-0001.jsonl"
    er = f"samr/enterprise_registry/{day}/part-0001.csv"
    return [
        ("psb", "resident_population", "dbt", "accuracy.citizen_id_check", "accuracy", "error", rp, 2, lid("resident_population", "part-0001.jsonl", 2, day), "citizen_id", "校验码错误 110105194912310021"),
        ("psb", "resident_population", "dbt", "accuracy.citizen_id_check", "accuracy", "error", rp, 3, lid("resident_population", "part-0001.jsonl", 3, day), "citizen_id", "出生日期不存在"),
        ("samr", "enterprise_registry", "dbt", "accuracy.uscc_check", "accuracy", "warn", er, 2, lid("enterprise_registry", "part-0001.csv", 2, day), "credit_code", "统一社会信用代码校验码不符"),
    ]


def set_findings(con: duckdb.DuckDBPyConnection, day: str, findings: list[tuple]) -> None:
    """Replace the partition's findings (what a rerun of the quality checks does)."""
    con.execute("delete from quality.findings where partition_date = ?", [day])
    for f in findings:
        con.execute("insert into quality.findings values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [day, *f])


def build_ops_db(path: Path, day: str = DAY) -> duckdb.DuckDBPyConnection:
    """An ops DB with a record-level product (_source_lineage_ids) and an aggregate product (route + hour)."""
    con = duckdb.connect(str(path))
    con.execute("create schema products; create schema scenario_transit_ridership; create schema scenario_sme_credit_profile")
    con.execute("create table scenario_sme_credit_profile.enterprise_registry (credit_code varchar, ent_name varchar, _lineage_id varchar, _partition_date date)")
    con.execute(
        "create table products.ops_sme_credit_profile (credit_code varchar, ent_name varchar, kwh double, _partition_date date, _source_lineage_ids varchar[])"
    )
    con.execute(
        "insert into products.ops_sme_credit_profile values ('91350100M000100Y44', '肇庆乙公司', 12.5, ?, [?, ?])",
        [day, lid("enterprise_registry", "part-0001.csv", 2, day), lid("enterprise_registry", "part-0001.csv", 4, day)],
    )
    con.execute("create table scenario_transit_ridership.bus_card_swipes (card_id varchar, card_type varchar, route_id varchar, swipe_time timestamp, fare_yuan decimal(8,2), _lineage_id varchar, _partition_date date)")
    for i in range(1, 9):
        con.execute(
            "insert into scenario_transit_ridership.bus_card_swipes values (?, '01', '11', ?, 2.0, ?, ?)",
            [f"h{i:02d}", f"{day} 08:{i:02d}:00", lid("bus_card_swipes", "part-0001.parquet", i, day), day],
        )
    con.execute("create table products.ops_transit_ridership (route_id varchar, hour integer, swipes integer, riders integer, _partition_date date)")
    con.execute("insert into products.ops_transit_ridership values ('11', 8, 8, 8, ?)", [day])
    return con


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture
def dbs(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    gov = build_gov_db(tmp_path / "gov.duckdb")
    ops = build_ops_db(tmp_path / "ops.duckdb")
    yield gov, ops
    gov.close()
    ops.close()


def test_trace_from_product_row_names_agency_file_and_rows(dbs, registry):
    gov, ops = dbs
    t = lineage.trace(gov, ops, registry, "products.ops_sme_credit_profile", row_filter={"credit_code": "91350100M000100Y44"}, manifest={})
    kinds = [lv.kind for lv in t.levels]
    assert kinds == ["product", "ops_dataset", "intermediate", "staging", "ods", "delivery", "agency"]
    assert t.levels[1].table == "scenario_sme_credit_profile.enterprise_registry"
    assert t.levels[3].asset_key == "gov/staging/stg_samr__enterprise_registry"
    assert t.agencies == ["samr"]
    (src,) = t.sources
    assert src.agency_name == registry.agencies["samr"].name
    assert src.contact_email == registry.agencies["samr"].contact.email
    assert src.delivery_file == f"samr/enterprise_registry/{DAY}/part-0001.csv"
    assert src.row_numbers == [2, 4]
    assert src.manifest and src.manifest[0]["rows_quarantined"] == 1
    assert src.redeliver_to == f"landing/samr/enterprise_registry/{DAY}/"
    status = {r.row_number: r.status for r in t.rows}
    assert status == {2: "ods", 4: "quarantined"}
    text = t.to_text()
    for expected in (registry.agencies["samr"].name, "part-0001.csv", "2, 4", "逐级溯源"):
        assert expected in text
    assert json.loads(t.to_json())["sources"][0]["row_numbers"] == [2, 4]


def test_trace_masks_personal_fields_with_registry_rules(dbs, registry):
    gov, ops = dbs
    ids = [lid("resident_population", "part-0001.jsonl", 1), lid("enterprise_registry", "part-0001.csv", 4)]
    t = lineage.trace(gov, None, registry, "gov/quality/findings", lineage_ids=ids, manifest={})
    rendered = t.to_text() + t.to_json() + t.to_markdown()
    for raw in ("11010519491231002X", "张三", "13812345678", "端州区某路1号", "周九"):
        assert raw not in rendered
    person = next(r for r in t.rows if r.dataset == "resident_population")
    assert person.values["phone"] == "138****5678"  # mask keep_first 3 / keep_last 4
    assert person.values["birth_date"] == "70-79"  # age band at the partition date
    assert person.values["district_code"] == "441202"  # open field kept
    assert person.values["name"] == lineage.HIDDEN["suppress"]
    assert person.values["citizen_id"] == lineage.HIDDEN["pseudonymize"]
    quarantined = next(r for r in t.rows if r.status == "quarantined")
    assert quarantined.values["legal_rep_name"] == "周*"  # from the raw record, masked keep_first 1
    assert sorted(t.agencies) == ["psb", "samr"]


def test_trace_from_aggregate_product_uses_route_and_hour(dbs, registry):
    gov, ops = dbs
    t = lineage.trace(gov, ops, registry, "ops/products/ops_transit_ridership", row_filter={"route_id": "11", "hour": 8}, manifest={})
    assert t.agencies == ["transport"]
    assert t.sources[0].row_numbers == list(range(1, 9))
    assert t.levels[1].table == "scenario_transit_ridership.bus_card_swipes"


def test_trace_levels_follow_dbt_manifest(dbs, registry):
    gov, _ = dbs
    manifest = {
        "sources": {"source.zq.ods.enterprise_registry": {"source_name": "ods", "name": "enterprise_registry"}},
        "nodes": {
            "model.zq.stg_x": {"resource_type": "model", "name": "stg_x", "fqn": ["zq", "gov", "staging", "stg_x"], "depends_on": {"nodes": ["source.zq.ods.enterprise_registry"]}},
            "model.zq.int_y": {"resource_type": "model", "name": "int_y", "fqn": ["zq", "gov", "intermediate", "int_y"], "depends_on": {"nodes": ["model.zq.stg_x"]}},
            # joins int_y in for a consistency rule: another dataset's path, not this one's
            "model.zq.int_z": {"resource_type": "model", "name": "int_z", "fqn": ["zq", "gov", "intermediate", "int_z"], "depends_on": {"nodes": ["model.zq.stg_other", "model.zq.int_y"]}},
        },
    }
    t = lineage.trace(gov, None, registry, "gov/intermediate/int_y", lineage_ids=[lid("enterprise_registry", "part-0001.csv", 1)], manifest=manifest)
    assert [lv.asset_key for lv in t.levels][:3] == ["gov/intermediate/int_y", "gov/staging/stg_x", "gov/ods/ods_enterprise_registry"]
    assert "gov/intermediate/int_z" not in [lv.asset_key for lv in t.levels]


def test_trace_of_finding_keeps_delivery_level_findings_and_scrubs_details(dbs, registry):
    gov, _ = dbs
    f = {"partition_date": DAY, "agency": "psb", "dataset": "resident_population", "tool": "dbt", "rule": "r", "dimension": "accuracy",
         "severity": "error", "delivery_file": f"psb/resident_population/{DAY}/part-0001.jsonl", "row_number": None, "lineage_id": None,
         "field": None, "detail": "号码 11010519491231002X 与 13812345678 不符"}
    t = lineage.trace(gov, None, registry, "gov/quality/findings", finding=f, manifest={})
    assert t.sources[0].delivery_file.endswith("part-0001.jsonl") and t.sources[0].row_numbers == []
    assert "11010519491231002X" not in t.to_json() and "13812345678" not in t.to_json()
    assert lineage.Trace.from_dict(t.to_dict()).to_text() == t.to_text()


@pytest.mark.parametrize(
    "bad",
    ["not-a-lineage-id", "enterprise_registry/2025-05-01/part-0001.csv", "unknown_ds/2025-05-01/f.csv#1"],
)
def test_bad_lineage_ids_are_clear_errors(dbs, registry, bad):
    gov, _ = dbs
    with pytest.raises(lineage.TraceError):
        lineage.trace(gov, None, registry, "gov/quality/findings", lineage_ids=[bad], manifest={})


def test_row_filter_rejects_unknown_columns(dbs, registry):
    gov, ops = dbs
    with pytest.raises(lineage.TraceError):
        lineage.trace(gov, ops, registry, "products.ops_sme_credit_profile", row_filter={"x; drop table y": "1"}, manifest={})
    with pytest.raises(lineage.TraceError):
        lineage.trace(gov, ops, registry, "products.ops_sme_credit_profile", row_filter={"nope": "1"}, manifest={})


@pytest.mark.parametrize(("nums", "text"), [([1, 2, 3, 7], "1-3, 7"), ([5], "5"), ([], ""), ([2, 4, 5], "2, 4-5")])
def test_row_ranges(nums, text):
    assert lineage.row_ranges(nums) == text


def test_now_is_shanghai_time(dbs, registry):
    gov, _ = dbs
    t = lineage.trace(gov, None, registry, "gov/ods/ods_resident_population", lineage_ids=[lid("resident_population", "part-0001.jsonl", 1)], manifest={})
    assert dt.datetime.fromisoformat(t.generated_at).utcoffset() == dt.timedelta(hours=8)


class _CountingConnection:
    """A DuckDB connection that counts the statements it is given."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con, self.statements = con, 0

    def execute(self, *args, **kwargs):
        self.statements += 1
        return self.con.execute(*args, **kwargs)

    def sql(self, *args, **kwargs):
        self.statements += 1
        return self.con.sql(*args, **kwargs)


def test_a_frozen_catalog_is_read_once_and_answers_as_the_live_catalog(tmp_path):
    """The issues step traces ~45 issues a day, each asking which tables exist, and the crossing asks for gov models'
    columns: inside `frozen_catalog` the catalog is read once, and the answers are the live catalog's; after the block
    a new table is seen again."""
    from zqdata import warehouse
    from zqdata.warehouse import relation_columns

    raw = duckdb.connect(str(tmp_path / "gov.duckdb"))
    raw.execute("create schema ods; create table ods.enterprise_registry(x int); create schema quarantine; "
                "create table quarantine.rows(y int); create schema meta; create view meta.deliveries as select 1 as z")
    con = _CountingConnection(raw)
    asked = [("ods", "enterprise_registry"), ("meta", "deliveries"), ("ods", "missing"), ("quarantine", "rows")]
    def answers():
        return ([warehouse.table_exists(con, s, t) for s, t in asked], warehouse.existing_tables(con, ["ods", "meta"]),
                warehouse.existing_tables(con, []), [relation_columns(con, s, t) for s, t in asked])

    live = answers()
    assert live[0] == [True, True, False, True]
    assert live[3][1] == {"z": "INTEGER"} and live[3][2] == {}
    before = con.statements
    with warehouse.frozen_catalog(con):
        frozen = answers()
        for _ in range(10):
            lineage.table_exists(con, "ods", "enterprise_registry")
            relation_columns(con, "quarantine", "rows")
    assert frozen == live
    assert con.statements == before + 2  # the tables once, the columns once
    raw.execute("create table ods.later(x int)")
    assert warehouse.table_exists(con, "ods", "later")


def test_relation_columns_answer_as_duckdbs_catalog_without_listing_it(tmp_path):
    """`relation_columns` (asked a few times per dataset and day) gives what DuckDB's catalog holds, in order, for
    tables and views, quoted names, a table created in the open transaction and a missing one, without listing every
    column of the database; a view over a dropped table (it does not bind) is still answered from the catalog."""
    from zqdata.warehouse import relation_columns

    raw = duckdb.connect(str(tmp_path / "gov.duckdb"))
    raw.execute('create schema s; create table s."odd ""name"" x" (b varchar, a decimal(18,2), "c d" date); '
                "create table s.base (k bigint); create view s.v as select k, k * 2 as k2 from s.base")
    asked: list[str] = []

    class Recording(_CountingConnection):  # the statements given, to see what was read
        def execute(self, query, *args, **kwargs):
            asked.append(query)
            return super().execute(query, *args, **kwargs)

        def sql(self, query, *args, **kwargs):
            asked.append(query)
            return super().sql(query, *args, **kwargs)

    con = Recording(raw)

    def catalog(schema, table):
        return dict(raw.execute("select column_name, data_type from duckdb_columns() where schema_name = ? and "
                                "table_name = ? order by column_index", [schema, table]).fetchall())

    for schema, table in [("s", 'odd "name" x'), ("s", "v"), ("s", "missing"), ("nope", "v")]:
        assert relation_columns(con, schema, table) == catalog(schema, table)
    assert not [q for q in asked[:2] if "duckdb_columns" in q or "information_schema" in q]  # existing: bound only
    assert list(relation_columns(con, "s", 'odd "name" x')) == ["b", "a", "c d"]
    assert relation_columns(con, "s", 'odd "name" x')["a"] == "DECIMAL(18,2)"
    raw.execute("begin")
    raw.execute("create table s.fresh (z integer)")
    assert relation_columns(con, "s", "fresh") == {"z": "INTEGER"}
    raw.execute("rollback")
    assert relation_columns(con, "s", "fresh") == {}
    raw.execute("drop table s.base")  # the view no longer binds: DuckDB's catalog still lists its columns
    assert relation_columns(con, "s", "v") == catalog("s", "v") == {"k": "BIGINT", "k2": "BIGINT"}


def test_traces_in_a_frozen_block_read_rows_and_deliveries_once_and_trace_as_outside(dbs, registry):
    """The issues step traces each issue of the day (~45): inside `frozen_catalog`, after `prefetch_source_rows`, the
    traces read no ODS, quarantine or delivery row themselves (one read per dataset and table, and one of the day's
    deliveries), and each trace is the one made outside the block: the ODS row, the quarantined row (with its masked
    reason), the delivery manifests, an id found nowhere."""
    from zqdata import warehouse

    gov, _ = dbs
    ids = [lid("enterprise_registry", "part-0001.csv", 2), lid("enterprise_registry", "part-0001.csv", 4),
           lid("resident_population", "part-0001.jsonl", 1), lid("resident_population", "part-0001.jsonl", 9)]
    asks = [[ids[0], ids[1]], [ids[2]], [ids[1], ids[3]], ids]

    def traces(con):
        out = []
        for lids in asks:
            t = json.loads(lineage.trace(con, None, registry, "gov/quality/findings", lineage_ids=lids,
                                         manifest={}).to_json())
            t.pop("generated_at")
            out.append(t)
        return out

    outside = traces(gov)
    assert [r["status"] for r in outside[3]["rows"]] == ["ods", "quarantined", "ods", "not_found"]
    assert any(s["manifest"] for s in outside[0]["sources"])  # the deliveries are part of what is compared
    con = _SqlRecordingConnection(gov)
    with warehouse.frozen_catalog(con):
        lineage.prefetch_source_rows(con, registry, [i for lids in asks for i in lids])
        prefetched = list(con.sql)
        inside = traces(con)
    assert inside == outside
    row_reads = [s for s in con.sql if 'ods."' in s or 'quarantine."rows"' in s]
    assert len(row_reads) == 4 and all(s in prefetched for s in row_reads)  # 2 datasets × (ODS, quarantine), at once
    assert sum("meta.deliveries" in s for s in con.sql) == 1  # the day's deliveries, once for every trace


class _SqlRecordingConnection(_CountingConnection):
    """A DuckDB connection that keeps the SQL it is given."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        super().__init__(con)
        self.sql: list[str] = []

    def execute(self, *args, **kwargs):
        self.sql.append(str(args[0]))
        return super().execute(*args, **kwargs)


def test_a_prefetch_starts_the_memo_afresh_and_serves_the_traces_of_failed_checks(dbs, registry):
    """A range run traces every day in one frozen block: each day's prefetch replaces the memo (a year of traced rows
    is not kept), and `prefetch_finding_rows` reads the rows that the traces of the day's failed checks show."""
    from orchestration.sensors import prefetch_finding_rows, trace_metadata
    from zqdata import warehouse

    gov, _ = dbs
    con = _SqlRecordingConnection(gov)
    first = [lid("enterprise_registry", "part-0001.csv", 2)]
    with warehouse.frozen_catalog(con):
        lineage.prefetch_source_rows(con, registry, first)
        prefetch_finding_rows(con, registry, DAY)  # the next day's working set
        before = len(con.sql)
        for ds, rule in [("resident_population", "accuracy.citizen_id_check"),
                         ("enterprise_registry", "accuracy.uscc_check")]:
            meta = trace_metadata(con, None, registry, partition_date=DAY, dataset=ds, rules=[rule])
            assert meta["source_agencies"].value == registry.agencies[registry.datasets[ds].agency].name
        assert not [s for s in con.sql[before:] if 'ods."' in s or 'quarantine."rows"' in s]
        memo = warehouse.frozen_rows(con)
        lineage.prefetch_source_rows(con, registry, [lid("bus_card_swipes", "part-0001.parquet", 1)])
        assert set(k[1] for k in memo if k[0].startswith(("ods", "quarantine"))) == {
            lid("bus_card_swipes", "part-0001.parquet", 1)}
