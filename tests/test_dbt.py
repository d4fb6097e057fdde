"""The dbt project: row-level rules find planted defects with lineage, error rows never reach intermediate models,
partitions rerun cleanly, SQL check digits agree with zqdata.standards, ops products honour authorization and k."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from dbt.cli.main import dbtRunner

from assets.dbt_common import (DBT_PROJECT_DIR, dbt_vars, keep_partial_parse, prune_run_dirs, release_in_process_dbt,
                               seed_partial_parse)
from zqdata import asset_keys, standards
from zqdata.quality.dbt_findings import collect_dbt_findings
from zqdata.reference import intermediate_model, render_dbt_models, staging_model, sync_reference_tables
from zqdata.registry import load_registry

DAY = "2025-05-01"
REG = load_registry()


def _cid(district: str, born: str, seq: str = "123") -> str:
    first17 = district + born + seq
    return first17 + standards.citizen_id_check_char(first17)


def _uscc(district: str, org: str) -> str:
    first17 = "91" + district + org
    return first17 + standards.uscc_check_char(first17)


def _bad_check(value: str) -> str:
    return value[:17] + ("1" if value[17] != "1" else "2")


E1, E2, E3 = _uscc("441202", "MA0000001"), _uscc("441203", "MA0000002"), _uscc("441204", "MA0000003")
E_UNKNOWN = _uscc("441284", "MA0000099")
E_BADCHECK = _bad_check(E3)
GOOD_ID = _cid("441202", "19800101")
TS = "2025-05-01T08:00:00+08:00"

# dataset -> rows (dicts of delivered strings); missing fields default to the good row's value
GOOD: dict[str, dict[str, str]] = {
    "enterprise_registry": {"credit_code": E1, "ent_name": "肇庆端州示例有限公司", "legal_rep_name": "张三",
                            "legal_rep_id": GOOD_ID, "district_code": "441202", "reg_capital_wan": "500.00",
                            "status": "1", "established_date": "2015-03-01", "updated_at": TS},
    "resident_population": {"citizen_id": GOOD_ID, "name": "李四", "gender": "1", "birth_date": "1980-01-01",
                            "phone": "13800138000", "address": "端州区天宁北路1号", "district_code": "441202",
                            "case_flag": "", "updated_at": TS},
    "social_insurance": {"record_id": "SI0001", "credit_code": E1, "district_code": "441202", "period": "2025-04",
                         "insured_headcount": "25", "contribution_yuan": "48000.50", "paid_at": TS},
    "electricity_usage": {"meter_id": "EM0001", "credit_code": E1, "district_code": "441202",
                          "reading_date": DAY, "kwh": "1234.5"},
    "water_usage": {"meter_id": "WM0001", "credit_code": E1, "district_code": "441202",
                    "reading_date": DAY, "cubic_meters": "88.2"},
    "bus_card_swipes": {"swipe_id": "S0001", "card_id": "C0001", "card_type": "01", "route_id": "R1",
                        "stop_id": "ST1", "swipe_time": TS, "fare_yuan": "2.00"},
    "subject_consent": {"consent_id": "CS0001", "subject_type": "enterprise", "subject_id": E1,
                        "scenario_code": "sme_credit_profile", "status": "granted", "effective_at": TS},
}

# (dataset, overrides, rule kind, field, dimension, platform severity); one defect per row
PLANTED: list[tuple[str, dict[str, str], str, str, str, str]] = [
    ("resident_population", {"citizen_id": _bad_check(GOOD_ID)},
     "citizen_id", "citizen_id", "accuracy", "error"),
    ("resident_population", {"citizen_id": _cid("441202", "19810230")}, "citizen_id", "citizen_id", "accuracy", "error"),
    ("resident_population", {"citizen_id": _cid("441203", "19800101"), "phone": "12345678901"},
     "mobile", "phone", "accuracy", "error"),
    ("resident_population", {"citizen_id": _cid("441204", "19800101"), "gender": "0"},
     "code_table", "gender", "understandability", "error"),
    ("resident_population", {"citizen_id": _cid("441223", "19800101"), "district_code": "440103"},
     "district", "district_code", "accuracy", "error"),
    ("resident_population", {"citizen_id": _cid("441224", "19800101"), "birth_date": "1980/01/01"},
     "standard_format", "birth_date", "standardization", "warn"),
    ("resident_population", {"citizen_id": _cid("441225", "19800101"), "updated_at": "2025/05/01 08:00"},
     "standard_format", "updated_at", "standardization", "warn"),
    ("resident_population", {"citizen_id": _cid("441226", "19800101"), "updated_at": "2025-04-30T23:30:00+08:00"},
     "event_in_day", "updated_at", "timeliness", "error"),
    ("resident_population", {"citizen_id": _cid("441284", "19800101"), "name": "   "},
     "required", "name", "completeness", "error"),
    # cross-field rules of the national standards (issue 12): GB 11643 digits 7–14 and 17 against the record's own
    # birth date and GB/T 2261.1 sex code; GB/T 2260 level of a field documented as 区县代码
    ("resident_population", {"citizen_id": _cid("441202", "19900101", "125"), "birth_date": "1990-01-02"},
     "citizen_id_birth_date", "birth_date", "consistency", "error"),
    ("resident_population", {"citizen_id": _cid("441203", "19800101", "124"), "gender": "1"},
     "citizen_id_sex", "gender", "consistency", "error"),
    ("resident_population", {"citizen_id": _cid("441204", "19800101", "125"), "district_code": "441200"},
     "district_level", "district_code", "accuracy", "error"),
    ("electricity_usage", {"meter_id": "EM0005", "district_code": "441200"},
     "district_level", "district_code", "accuracy", "error"),
    ("enterprise_registry", {"credit_code": E2, "district_code": "441203", "status": "9"},
     "code_table", "status", "understandability", "error"),
    ("enterprise_registry", {"credit_code": E_BADCHECK, "district_code": "441204"}, "uscc", "credit_code", "accuracy", "warn"),
    ("enterprise_registry", {"credit_code": _uscc("441223", "MA0000004"), "reg_capital_wan": "-5"},
     "range", "reg_capital_wan", "accuracy", "error"),
    ("enterprise_registry", {"credit_code": _uscc("441224", "MA0000005"), "legal_rep_id": _bad_check(_cid("441202", "19491231", "002"))},
     "citizen_id", "legal_rep_id", "accuracy", "error"),
    ("social_insurance", {"record_id": "SI0002", "credit_code": E_UNKNOWN},
     "registry_reference", "credit_code", "consistency", "error"),
    ("social_insurance", {"record_id": "SI0003", "district_code": "441226"},
     "registry_district", "district_code", "consistency", "warn"),
    ("social_insurance", {"record_id": "SI0004", "insured_headcount": "200000"},
     "range", "insured_headcount", "accuracy", "error"),
    ("social_insurance", {"record_id": "SI0005", "paid_at": "2025-05-02T00:10:00+08:00"},
     "event_in_day", "paid_at", "timeliness", "error"),
    ("electricity_usage", {"meter_id": "EM0002", "kwh": "-1"}, "range", "kwh", "accuracy", "error"),
    ("electricity_usage", {"meter_id": "EM0003", "credit_code": E_UNKNOWN},
     "registry_reference", "credit_code", "consistency", "error"),
    ("electricity_usage", {"meter_id": "EM0004", "reading_date": "20250501"},
     "standard_format", "reading_date", "standardization", "warn"),
    ("water_usage", {"meter_id": "WM0002", "cubic_meters": "2000000"}, "range", "cubic_meters", "accuracy", "error"),
    ("bus_card_swipes", {"swipe_id": "S0002", "card_type": "99"}, "code_table", "card_type", "understandability", "error"),
    ("bus_card_swipes", {"swipe_id": "S0003", "fare_yuan": "25"}, "range", "fare_yuan", "accuracy", "error"),
    ("bus_card_swipes", {"swipe_id": "S0004", "swipe_time": "2025-05-01 08:00:00"},
     "standard_format", "swipe_time", "standardization", "warn"),
    ("subject_consent", {"consent_id": "CS0002", "status": "maybe"}, "code_table", "status", "understandability", "error"),
]
# rows sharing a primary key (both occurrences are consistency findings and both are excluded)
DUPLICATES = [("bus_card_swipes", {"swipe_id": "S0100"}), ("bus_card_swipes", {"swipe_id": "S0100"})]
EXTRA_GOOD = [("enterprise_registry", {"credit_code": E2, "district_code": "441203"}),
              ("enterprise_registry", {"credit_code": E3, "district_code": "441204"})]

LINEAGE_DDL = ("_lineage_id varchar, _agency varchar, _dataset varchar, _delivery_file varchar, _row_number integer,"
               " _batch_id varchar, _ingested_at timestamptz, _partition_date date")


def _write_ods(con: duckdb.DuckDBPyConnection, day: str, rows: list[tuple[str, dict[str, str]]]) -> dict[int, str]:
    """Insert rows into ods.<dataset> as delivered (VARCHAR) with lineage; returns {index in rows: lineage id}."""
    con.execute("create schema if not exists ods")
    lineage: dict[int, str] = {}
    counters: dict[str, int] = {}
    for code, ds in REG.datasets.items():
        cols = ", ".join(f"{f} varchar" for f in ds.field_names)
        con.execute(f"create table if not exists ods.{code} ({cols}, {LINEAGE_DDL})")
    for i, (code, overrides) in enumerate(rows):
        ds = REG.datasets[code]
        n = counters[code] = counters.get(code, 0) + 1
        values = {**GOOD[code], **overrides}
        key = f"{ds.agency}/{code}/{day}/part-0001.csv"
        lid = f"{code}/{day}/part-0001.csv#{n}"
        lineage[i] = lid
        con.execute(
            f"insert into ods.{code} values ({', '.join('?' * (len(ds.field_names) + 8))})",
            [values[f] for f in ds.field_names] + [lid, ds.agency, code, key, n, "b" * 16, dt.datetime.now(dt.UTC), day],
        )
    return lineage


def _dbt(args: list[str], tmp: Path) -> object:
    res = dbtRunner().invoke([*args, "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
                              "--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs")])
    release_in_process_dbt()  # the profile opens DuckDB locked: close it before the test opens the file
    return res


def _build_gov(tmp: Path, day: str = DAY) -> object:
    vars_ = json.dumps(dbt_vars(REG, day))
    return _dbt(["build", "--target", "gov", "--select", "path:models/gov", "--vars", vars_], tmp)



def test_the_reference_tables_are_rewritten_only_when_the_registry_changed_them(tmp_path: Path) -> None:
    """The gov dbt step syncs ref.* before every build (bench/notes.md 19): unchanged, nothing is written (the same
    tables, no checkpoint at closing); a row changed or removed in the database, or a code the registry adds, and the
    tables hold the registry's rows again."""
    def state(con: duckdb.DuckDBPyConnection) -> tuple[dict, list]:
        oids = dict(con.execute("select table_name, table_oid from duckdb_tables() where schema_name = 'ref'").fetchall())
        return oids, con.execute("select * from ref.code_tables order by all").fetchall()

    with duckdb.connect(str(tmp_path / "gov.duckdb")) as con:
        assert sync_reference_tables(con, REG) > 0
        first = state(con)
        assert sync_reference_tables(con, REG) == 0 and state(con) == first
        con.execute("update ref.fields set required = not required where field = 'credit_code'")
        assert sync_reference_tables(con, REG) > 0 and state(con)[1] == first[1]
        assert con.execute("select count(*) from ref.fields where field = 'credit_code' and not required").fetchone() \
            == (sum(1 for ds in REG.datasets.values() for f in ds.fields if f.name == "credit_code" and not f.required),)
        con.execute("delete from ref.code_tables where true")
        assert sync_reference_tables(con, REG) > 0 and state(con)[1] == first[1]
        table = next(iter(REG.code_tables))
        more = REG.model_copy(update={"code_tables": {**REG.code_tables, table: {**REG.code_tables[table], "ZZ": "新"}}})
        assert sync_reference_tables(con, more) > 0
        assert (table, "ZZ", "新") in state(con)[1] and sync_reference_tables(con, more) == 0

@pytest.fixture(scope="module")
def gov(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dbt_gov")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZQ_GOV_DB", str(tmp / "gov.duckdb"))
    mp.setenv("ZQ_OPS_DB", str(tmp / "ops.duckdb"))
    rows = [(code, {}) for code in GOOD] + EXTRA_GOOD + [(p[0], p[1]) for p in PLANTED] + DUPLICATES
    with duckdb.connect(str(tmp / "gov.duckdb")) as con:
        lineage = _write_ods(con, DAY, rows)
        sync_reference_tables(con, REG)
    res = _build_gov(tmp)
    manifest = json.loads((tmp / "target" / "manifest.json").read_text())
    with duckdb.connect(str(tmp / "gov.duckdb")) as con:
        collect_dbt_findings(con, manifest, DAY)
    offset = len(GOOD) + len(EXTRA_GOOD)
    yield {"tmp": tmp, "db": tmp / "gov.duckdb", "res": res, "manifest": manifest,
           "planted": {i: lineage[offset + i] for i in range(len(PLANTED))},
           "duplicates": [lineage[offset + len(PLANTED) + j] for j in range(len(DUPLICATES))]}
    mp.undo()


def test_gov_build_succeeds(gov: dict) -> None:
    assert gov["res"].success, gov["res"].exception


@pytest.mark.parametrize("i", range(len(PLANTED)), ids=[f"{p[0]}-{p[2]}-{p[3]}" for p in PLANTED])
def test_planted_defect_found_with_lineage(gov: dict, i: int) -> None:
    dataset, _, kind, field, dimension, severity = PLANTED[i]
    with duckdb.connect(str(gov["db"])) as con:
        found = con.execute(
            "select rule, dimension, severity, field, agency, delivery_file, row_number from quality.findings"
            " where tool = 'dbt' and lineage_id = ?", [gov["planted"][i]]).fetchall()
    assert (f"{kind}:{field}", dimension, severity, field) in [r[:4] for r in found], found
    assert all(r[4] == REG.datasets[dataset].agency and r[5].endswith("part-0001.csv") and r[6] for r in found)


def test_duplicate_keys_found(gov: dict) -> None:
    with duckdb.connect(str(gov["db"])) as con:
        ids = {r[0] for r in con.execute(
            "select lineage_id from quality.findings where rule = 'duplicate_key:swipe_id' and dimension = 'consistency'"
        ).fetchall()}
    assert set(gov["duplicates"]) <= ids


def test_good_rows_have_no_findings(gov: dict) -> None:
    with duckdb.connect(str(gov["db"])) as con:
        good = [f"{code}/{DAY}/part-0001.csv#1" for code in GOOD]
        flagged = con.execute("select lineage_id, rule from quality.findings where list_contains(?, lineage_id)",
                              [good]).fetchall()
    assert flagged == []


def test_error_rows_absent_from_intermediate_warn_rows_kept(gov: dict) -> None:
    with duckdb.connect(str(gov["db"])) as con:
        for i, (dataset, _, kind, field, _, severity) in enumerate(PLANTED):
            present = con.execute(f"select count(*) from intermediate.{intermediate_model(dataset)} where _lineage_id = ?",
                                  [gov["planted"][i]]).fetchone()[0]
            assert present == (0 if severity == "error" else 1), (dataset, kind, field)
        for lid in gov["duplicates"]:
            assert con.execute("select count(*) from intermediate.int_bus_card_swipes where _lineage_id = ?",
                               [lid]).fetchone()[0] == 0
        for code in GOOD:
            assert con.execute(f"select count(*) from intermediate.{intermediate_model(code)} where _lineage_id = ?",
                               [f"{code}/{DAY}/part-0001.csv#1"]).fetchone()[0] == 1


def test_staging_normalizes_formats(gov: dict) -> None:
    i = next(k for k, p in enumerate(PLANTED) if p[3] == "updated_at" and p[2] == "standard_format")
    with duckdb.connect(str(gov["db"])) as con:
        value = con.execute(f"select updated_at from staging.{staging_model(REG, 'resident_population')}"
                            " where _lineage_id = ?", [gov["planted"][i]]).fetchone()[0]
        good = con.execute("select swipe_time from staging.stg_transport__bus_card_swipes where _lineage_id = ?",
                           [f"bus_card_swipes/{DAY}/part-0001.csv#1"]).fetchone()[0]
    assert value == dt.datetime(2025, 5, 1, 8, 0) and good == dt.datetime(2025, 5, 1, 8, 0)


def test_rerun_partition_leaves_no_duplicates(gov: dict) -> None:
    def counts() -> tuple:
        with duckdb.connect(str(gov["db"])) as con:
            models = [f"staging.{staging_model(REG, c)}" for c in REG.datasets] + \
                     [f"intermediate.{intermediate_model(c)}" for c in REG.datasets]
            rows = tuple(con.execute(f"select count(*), count(distinct _lineage_id) from {m}").fetchone() for m in models)
            findings = con.execute("select count(*) from quality.findings where tool = 'dbt'").fetchone()
        return rows + (findings,)

    before = counts()
    assert all(n == d for n, d in before[:-1])
    res = _build_gov(gov["tmp"])
    assert res.success
    with duckdb.connect(str(gov["db"])) as con:
        collect_dbt_findings(con, gov["manifest"], DAY)
    assert counts() == before


def _inline_sql(tmp: Path, sql: str) -> str:
    res = _dbt(["compile", "--target", "gov", "--inline", sql, "--vars", json.dumps(dbt_vars(REG, DAY))], tmp)
    assert res.success, res.exception
    return res.result.results[0].node.compiled_code


def test_the_partition_comes_from_the_environment_and_a_bad_one_stops_dbt(gov: dict, monkeypatch) -> None:
    """Dagster passes the partition as ZQ_PARTITION_DATE (not --vars, so dbt keeps its partial parse from night to
    night); it wins over the var, and a value that is not a date never reaches the SQL."""
    sql = "select date '{{ zq_partition_date() }}' as d"
    monkeypatch.delenv("ZQ_PARTITION_DATE", raising=False)
    assert f"date '{DAY}'" in _inline_sql(gov["tmp"], sql)  # the --vars value
    monkeypatch.setenv("ZQ_PARTITION_DATE", "2025-07-09")
    assert "date '2025-07-09'" in _inline_sql(gov["tmp"], sql)
    monkeypatch.setenv("ZQ_PARTITION_DATE", "2025-07-09' or true --")
    res = _dbt(["compile", "--target", "gov", "--inline", sql, "--vars", json.dumps(dbt_vars(REG, DAY))], gov["tmp"])
    assert not res.success and "partition_date must be YYYY-MM-DD" in str(res.exception or res.result)


def test_partial_parse_state_is_kept_per_profile_environment_not_per_night(tmp_path: Path) -> None:
    """Another warehouse on the same checkout (bench, a second data folder, a parallel test worker) keeps its own
    state: dbt would parse everything again for the other's values. The partition and secrets are not part of it."""
    from assets.dbt_common import partial_parse_cache
    from zqdata.dbt_guard import profile_env

    night1 = partial_parse_cache(tmp_path, "gov", profile_env("gov", "/a/gov.duckdb", "4GB", "2025-06-01"))
    night2 = partial_parse_cache(tmp_path, "gov", profile_env("gov", "/a/gov.duckdb", "4GB", "2025-06-02"))
    ranged = partial_parse_cache(tmp_path, "gov", profile_env("gov", "/a/gov.duckdb", "4GB", None,
                                                               ("2025-06-01", "2025-06-05")))
    other_db = partial_parse_cache(tmp_path, "gov", profile_env("gov", "/b/gov.duckdb", "4GB", "2025-06-01"))
    other_limit = partial_parse_cache(tmp_path, "gov", profile_env("gov", "/a/gov.duckdb", "8GB", "2025-06-01"))
    ops = partial_parse_cache(tmp_path, "ops", profile_env("ops", "/a/gov.duckdb", "4GB", "2025-06-01"))
    assert night1 == night2 == ranged and night1.parent == tmp_path / "partial_parse"
    assert len({night1, other_db, other_limit, ops}) == 4
    secret = {"ZQ_LAKE_CATALOG": "dbname=c", "ZQ_LAKE_CATALOG_PASSWORD": "pw-1", "ZQ_LAKE_S3_SECRET": "s-1"}
    rotated = {**secret, "ZQ_LAKE_CATALOG_PASSWORD": "pw-2", "ZQ_LAKE_S3_SECRET": "s-2"}
    assert partial_parse_cache(tmp_path, "gov_lake", secret) == partial_parse_cache(tmp_path, "gov_lake", rotated)
    # the states of warehouses no longer built are pruned, the newest kept
    import os

    from assets.dbt_common import prune_partial_parse_caches

    night1.parent.mkdir()
    for i, state in enumerate([night1, other_db, other_limit, ops]):
        state.write_bytes(b"state")
        os.utime(state, (1_000_000 + i, 1_000_000 + i))
    assert prune_partial_parse_caches(night1.parent, keep=2) == [other_db, night1]
    assert sorted(night1.parent.iterdir()) == sorted([other_limit, ops])


def test_partial_parse_state_is_kept_per_target_and_old_run_folders_pruned(tmp_path: Path) -> None:
    import os

    cache, run1, run2 = tmp_path / "partial_parse" / "gov.msgpack", tmp_path / "op-a", tmp_path / "op-b"
    assert not seed_partial_parse(cache, run1) and not keep_partial_parse(run1, cache)  # nothing yet: dbt parses
    run1.mkdir()
    (run1 / "partial_parse.msgpack").write_bytes(b"state-1")
    assert keep_partial_parse(run1, cache) and cache.read_bytes() == b"state-1"
    assert seed_partial_parse(cache, run2) and (run2 / "partial_parse.msgpack").read_bytes() == b"state-1"
    for i in range(5):
        d = tmp_path / f"op-old{i}"
        d.mkdir()
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "other-run").mkdir()
    removed = prune_run_dirs(tmp_path, "op", keep=3)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in removed) == ["op-old0", "op-old1", "op-old2", "op-old3"]
    assert left == ["op-a", "op-b", "op-old4", "other-run", "partial_parse"]
    # Folders of concurrent runs, however many: beyond the newest `keep` but younger than the grace period, kept.
    for i in range(4):
        (tmp_path / f"op-busy{i}").mkdir()
    assert prune_run_dirs(tmp_path, "op", keep=1) == [tmp_path / "op-old4"]
    assert sorted(p.name for p in tmp_path.glob("op-*")) == ["op-a", "op-b", *(f"op-busy{i}" for i in range(4))]
    assert len(prune_run_dirs(tmp_path, "op", keep=1, grace_seconds=0)) == 5


@pytest.mark.parametrize("kind,macro,reference", [
    ("citizen_id", "zq_is_valid_citizen_id", standards.is_valid_citizen_id),
    ("uscc", "zq_is_valid_uscc", standards.is_valid_uscc),
    ("mobile", "zq_is_valid_mobile", standards.is_valid_mobile),
])
def test_sql_check_macros_agree_with_standards(gov: dict, kind: str, macro: str, reference) -> None:
    values = standards.sample_values(kind, 300, seed=7, registry=REG) + ["11010519491231002X", "91350100M000100Y43"]
    sql = _inline_sql(gov["tmp"], f"select v, {{{{ {macro}('v') }}}} as ok from samples")
    with duckdb.connect() as con:
        con.execute("create table samples (v varchar)")
        con.executemany("insert into samples values (?)", [[v] for v in values])
        got = dict(con.execute(sql).fetchall())
    wrong = [v for v in values if v != "" and got[v] != reference(v)]
    assert not wrong, wrong[:10]
    assert sum(got.values()) not in (0, len(got))  # the mix holds valid and invalid values


def test_sql_cross_field_macros_agree_with_standards(gov: dict) -> None:
    """The ID/birth-date, ID/sex and district-level macros judge like zqdata.standards: a mismatch fails, and a value
    another rule already rejects (malformed ID, non-existent encoded date, sex code 0/9, code outside the table) is
    not judged a second time."""
    ids = standards.sample_values("citizen_id", 200, seed=5, registry=REG) + [_cid("441202", "19810230")]
    rows = []
    for i, v in enumerate(ids):
        born = standards.citizen_id_birth_date(v) or dt.date(1980, 1, 1)
        rows.append((v, born + dt.timedelta(days=(i % 3) - 1), ["1", "2", "0"][i % 3]))
    sql = _inline_sql(gov["tmp"], "select v, b, g, {{ zq_is_id_birth_date_consistent('b', 'v') }} as born_ok,"
                                  " {{ zq_is_id_sex_consistent('g', 'v') }} as sex_ok from samples")
    with duckdb.connect() as con:
        con.execute("create table samples (v varchar, b date, g varchar)")
        con.executemany("insert into samples values (?, ?, ?)", rows)
        got = {(v, b, g): (born_ok, sex_ok) for v, b, g, born_ok, sex_ok in con.execute(sql).fetchall()}
    shaped = lambda v: re.fullmatch(r"[0-9]{17}[0-9X]", v) is not None  # noqa: E731  (ASCII, like the SQL)
    for v, b, g in rows:
        encoded = standards.citizen_id_birth_date(v) if shaped(v) else None
        born_ok = encoded is None or encoded == b
        sex_ok = not shaped(v) or g not in ("1", "2") or g == standards.citizen_id_sex(v)
        assert got[(v, b, g)] == (born_ok, sex_ok), (v, b, g)
    assert {ok for ok, _ in got.values()} == {True, False} and {ok for _, ok in got.values()} == {True, False}

    codes = [*standards.zhaoqing_districts(REG), "440100", "440103", "441201", "4412", None]
    sql = _inline_sql(gov["tmp"], "select c, {{ zq_is_county_level_district('c') }} as ok from codes")
    with duckdb.connect(str(gov["db"]), read_only=True) as con:  # ref.code_tables of the gov DB
        con.register("codes", pa.table({"c": pa.array(codes, pa.string())}))
        got_level = dict(con.execute(sql).fetchall())
    table = standards.zhaoqing_districts(REG)
    for c in codes:
        assert got_level[c] == (c is None or c not in table or standards.is_county_level_district(c)), c
    assert got_level["441200"] is False and got_level["441202"] is True


def test_generated_models_are_current() -> None:
    models = DBT_PROJECT_DIR / "models"
    stale = [rel for rel, text in render_dbt_models(REG).items()
             if not (models / rel).exists() or (models / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"run python -m zqdata.reference: {stale}"


# ---------------------------------------------------------------- ops products

def _ops_db(path: Path, riders_by_group: dict[tuple[str, int], int]) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute("create schema scenario_transit_ridership")
        con.execute("create table scenario_transit_ridership.bus_card_swipes (card_id varchar, card_type varchar,"
                    " route_id varchar, swipe_time timestamp, fare_yuan decimal(18, 2), _lineage_id varchar,"
                    " _partition_date date)")
        n = 0
        for (route, hour), riders in riders_by_group.items():
            for r in range(riders):
                for _ in range(2):  # each rider swipes twice
                    n += 1
                    con.execute("insert into scenario_transit_ridership.bus_card_swipes values (?, '01', ?, ?, 2, ?, ?)",
                                [f"{r:064x}", route, dt.datetime(2025, 5, 1, hour, 5), f"bus_card_swipes/{DAY}/p#{n}", DAY])


def test_k_anonymity_suppresses_small_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "ops.duckdb"))
    k = REG.scenarios["transit_ridership"].k_anonymity
    _ops_db(tmp_path / "ops.duckdb", {("R1", 8): k + 1, ("R2", 9): k - 1})
    vars_ = dbt_vars(REG, DAY, scenarios=True)
    res = _dbt(["build", "--target", "ops", "--select", "ops_transit_ridership", "--vars", json.dumps(vars_)], tmp_path)
    assert res.success, res.exception
    with duckdb.connect(str(tmp_path / "ops.duckdb")) as con:
        rows = con.execute("select route_id, hour_of_day, swipes, distinct_riders from products.ops_transit_ridership"
                           ).fetchall()
    assert rows == [("R1", 8, 2 * (k + 1), k + 1)]


def test_unauthorized_field_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "ops.duckdb"))
    vars_ = dbt_vars(REG, DAY, scenarios=True)
    vars_["authorized_fields"]["sme_credit_profile"]["enterprise_registry"].remove("district_code")
    res = _dbt(["compile", "--target", "ops", "--select", "ops_sme_credit_profile", "--vars", json.dumps(vars_)],
               tmp_path)
    assert not res.success
    text = str(res.exception) + "".join(str(getattr(r, "message", "")) for r in (res.result or []))
    assert "场景 sme_credit_profile 未授权字段 enterprise_registry.district_code (unauthorized field)" in text


# ---------------------------------------------------------------- Dagster wiring

def test_dagster_dbt_definitions_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from assets.gov_platform.dbt_models import gov_dbt_defs
    from assets.ops_platform.products import ops_dbt_defs
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    defs = dg.Definitions.merge(gov_dbt_defs(), ops_dbt_defs(),
                                dg.Definitions(resources={"warehouse": WarehouseResource()}))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for code in REG.datasets:
        node = graph.get(dg.AssetKey(["gov", "intermediate", intermediate_model(code)]))
        assert node.group_name == "gov_platform" and node.description
        assert dg.AssetKey(["gov", "staging", staging_model(REG, code)]) in node.parent_keys
        assert dg.AssetKey(asset_keys.ods(code)) in graph.get(
            dg.AssetKey(["gov", "staging", staging_model(REG, code)])).parent_keys
    product = graph.get(dg.AssetKey(["ops", "products", "ops_transit_ridership"]))
    assert product.group_name == "ops_platform"
    assert product.parent_keys == {dg.AssetKey(asset_keys.desensitized("bus_card_swipes"))}
    checks = [c for a in defs.assets for c in a.check_specs]
    # relational rules (dbt severity error) block downstream; row-level rules only warn
    assert {c.blocking for c in checks if c.name.startswith("unique_int_")} == {True}
    assert {c.blocking for c in checks if "__citizen_id__" in c.name} == {False}


def test_dbt_resource_knows_the_dbt_version_without_asking_the_cli() -> None:
    """The resource reads the venv's dbt-core version instead of running `dbt --version` before every step; it must
    be the version the executable reports (dagster-dbt picks its event parsing by it)."""
    import re
    import subprocess

    from assets.dbt_common import ZhaoqingDbtCliResource, dbt_executable

    res = ZhaoqingDbtCliResource(project_dir=str(DBT_PROJECT_DIR), dbt_executable=dbt_executable())
    reported = re.search(r"(\d+\.\d+\.\d+)", subprocess.check_output([dbt_executable(), "--version"], text=True))
    assert str(res._cli_version) == reported.group(1)
    assert res._initialize_dbt_core_adapter(["build"]) is None  # no in-process adapter on the DuckDB files


# ---------------------------------------------------------------- redelivery replaces the partition (issue 12, finding 5)

DAY2 = "2025-05-02"


def _partition_counts(db: Path, tables: list[str]) -> dict[tuple[str, str], int]:
    with duckdb.connect(str(db)) as con:
        return {(t, str(d)): n for t in tables
                for d, n in con.execute(f"select _partition_date, count(*) from {t} group by 1").fetchall()}


def test_empty_redelivery_empties_the_partition_of_staging_and_intermediate(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model replaces exactly its run's partition (project-wide incremental strategy `zq_replace_partition`):
    a redelivery with fewer rows, or none, leaves exactly the new rows downstream and no dbt finding of a row that no
    longer exists; other days untouched."""
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "ops.duckdb"))
    monkeypatch.delenv("ZQ_PARTITION_DATE", raising=False)
    db = tmp_path / "gov.duckdb"
    bad = {"card_type": "99"}  # code_table, error: a finding, and the row is kept out of intermediate
    day1 = [("bus_card_swipes", {"swipe_id": "S0"}), ("bus_card_swipes", {"swipe_id": "S1"}),
            ("bus_card_swipes", {"swipe_id": "S2", **bad})]
    day2 = [("bus_card_swipes", {"swipe_id": "S0", "swipe_time": f"{DAY2}T08:00:00+08:00"}),
            ("bus_card_swipes", {"swipe_id": "S1", "swipe_time": f"{DAY2}T08:00:00+08:00", **bad})]
    with duckdb.connect(str(db)) as con:
        _write_ods(con, DAY, day1)
        _write_ods(con, DAY2, day2)
        sync_reference_tables(con, REG)
    models = ["staging.stg_transport__bus_card_swipes", "intermediate.int_bus_card_swipes"]
    select = ["--select", "stg_transport__bus_card_swipes", "int_bus_card_swipes"]

    def dbt(command: str, day: str) -> None:
        res = _dbt([command, "--target", "gov", *select, "--vars", json.dumps(dbt_vars(REG, day))], tmp_path)
        assert res.success, res.exception  # row-level rules warn in dbt: the planted row does not fail the build
        if command == "build":
            manifest = json.loads((tmp_path / "target" / "manifest.json").read_text())
            with duckdb.connect(str(db)) as con:
                collect_dbt_findings(con, manifest, day)

    def findings() -> dict[str, list[str]]:
        with duckdb.connect(str(db)) as con:
            rows = con.execute("select partition_date, lineage_id from quality.findings where tool = 'dbt'"
                               " order by all").fetchall()
        return {d: [lid for p, lid in rows if str(p) == d] for d in (DAY, DAY2)}

    for day in (DAY2, DAY):  # DAY last: the tests' stored failures hold DAY's failing rows
        dbt("build", day)
    assert _partition_counts(db, models) == {
        (models[0], DAY): 3, (models[1], DAY): 2, (models[0], DAY2): 2, (models[1], DAY2): 1}
    assert findings() == {DAY: [f"bus_card_swipes/{DAY}/part-0001.csv#3"],
                          DAY2: [f"bus_card_swipes/{DAY2}/part-0001.csv#2"]}
    with duckdb.connect(str(db)) as con:  # the agency redelivers DAY with no rows: ingestion empties the ODS partition
        con.execute("delete from ods.bus_card_swipes where _partition_date = ?", [DAY])
    dbt("run", DAY)  # models only: the tests' stored failures still hold the earlier rows of DAY
    with duckdb.connect(str(db)) as con:
        collect_dbt_findings(con, json.loads((tmp_path / "target" / "manifest.json").read_text()), DAY)
    assert _partition_counts(db, models) == {(models[0], DAY2): 2, (models[1], DAY2): 1}
    assert findings() == {DAY: [], DAY2: [f"bus_card_swipes/{DAY2}/part-0001.csv#2"]}
    with duckdb.connect(str(db)) as con:  # a smaller redelivery: exactly its rows, none of the earlier ones
        _write_ods(con, DAY, day1[:1])
    dbt("build", DAY)
    assert _partition_counts(db, models) == {
        (models[0], DAY): 1, (models[1], DAY): 1, (models[0], DAY2): 2, (models[1], DAY2): 1}
    assert findings() == {DAY: [], DAY2: [f"bus_card_swipes/{DAY2}/part-0001.csv#2"]}


def test_a_later_day_is_inserted_from_the_models_query_without_a_temporary_copy(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: on a DuckDB file a model's later day goes straight from its query into the table (materialization
    `zq_partition`). dbt-duckdb's incremental wrote the whole batch to a temp table and copied it in: every row written
    twice, +1.3 to 2 s on three models at 1 M rows/day. The rows are those a temp-table build gave."""
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "ops.duckdb"))
    monkeypatch.delenv("ZQ_PARTITION_DATE", raising=False)
    db = tmp_path / "gov.duckdb"
    with duckdb.connect(str(db)) as con:
        _write_ods(con, DAY, [("bus_card_swipes", {"swipe_id": "S0"}), ("bus_card_swipes", {"swipe_id": "S1"})])
        _write_ods(con, DAY2, [("bus_card_swipes", {"swipe_id": "S2", "swipe_time": f"{DAY2}T08:00:00+08:00"})])
        sync_reference_tables(con, REG)
    models = ["staging.stg_transport__bus_card_swipes", "intermediate.int_bus_card_swipes"]
    for day in (DAY, DAY2):  # DAY creates the tables, DAY2 is the incremental build
        res = _dbt(["run", "--target", "gov", "--select", "stg_transport__bus_card_swipes", "int_bus_card_swipes",
                    "--vars", json.dumps(dbt_vars(REG, day))], tmp_path)
        assert res.success, res.exception
    assert _partition_counts(db, models) == {
        (models[0], DAY): 2, (models[1], DAY): 2, (models[0], DAY2): 1, (models[1], DAY2): 1}
    for model in ("staging/stg_transport__bus_card_swipes", "intermediate/int_bus_card_swipes"):
        main = (tmp_path / "target" / "run" / "zhaoqing" / "models" / "gov" / f"{model}.sql").read_text()
        assert "insert into" in main and "__dbt_tmp" not in main and "create temporary table" not in main.lower()
        assert re.search(r"\) as zq_new\s+where case when", main)  # the model's own query, inserted in place


def _probe_project(tmp_path: Path, model: str) -> Path:
    """A dbt project on a DuckDB file with the repo's macros and the repo's model configs (dbt_project.yml)."""
    import shutil

    import yaml

    project = tmp_path / "probe"
    (project / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(DBT_PROJECT_DIR / "macros", project / "macros", dirs_exist_ok=True)
    config = yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text(encoding="utf-8"))["models"]["zhaoqing"]
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "probe", "version": "1.0.0", "profile": "probe", "model-paths": ["models"], "macro-paths": ["macros"],
        "flags": {"send_anonymous_usage_stats": False}, "vars": {"partition_date": DAY},
        "models": {"probe": {k: v for k, v in config.items() if k.startswith("+")}}}, allow_unicode=True))
    (project / "profiles.yml").write_text(yaml.safe_dump({"probe": {"target": "gov", "outputs": {"gov": {
        "type": "duckdb", "path": str(tmp_path / "probe.duckdb"), "threads": 1}}}}))
    (project / "models" / "probe_model.sql").write_text(model)
    return project


def _probe_run(project: Path, day: str) -> object:
    res = dbtRunner().invoke(["run", "--project-dir", str(project), "--profiles-dir", str(project), "--target-path",
                              str(project / "target"), "--log-path", str(project / "logs"), "--vars",
                              json.dumps({"partition_date": day})])
    release_in_process_dbt()
    return res


def test_a_row_outside_the_partition_fails_the_build_and_changes_nothing_and_new_columns_are_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition contract of every model on a DuckDB file (dbt_project.yml's configs): a build whose rows include
    another day fails with the reason, and the table keeps its rows (the delete is rolled back with the insert); a
    column the model gains is added to the table (on_schema_change: append_new_columns), earlier rows null."""
    monkeypatch.delenv("ZQ_PARTITION_DATE", raising=False)
    day_sql = "select date '{{ zq_partition_date() }}' as _partition_date, 1 as a"
    project = _probe_project(tmp_path, day_sql)
    for day in (DAY, DAY2):
        assert _probe_run(project, day).success

    def rows() -> list[tuple]:
        with duckdb.connect(str(tmp_path / "probe.duckdb")) as con:
            return con.execute("select * from main.probe_model order by all").fetchall()

    before = rows()
    assert [str(r[0]) for r in before] == [DAY, DAY2]
    (project / "models" / "probe_model.sql").write_text(day_sql + "\nunion all select date '2025-01-01', 2")
    res = _probe_run(project, DAY2)
    messages = " ".join(str(r.message) for r in res.result.results) if res.result else str(res.exception)
    assert not res.success and "以外的行" in messages and "2025-05-02" in messages
    assert rows() == before
    (project / "models" / "probe_model.sql").write_text(
        "select date '{{ zq_partition_date() }}' as _partition_date, 1 as a, 'new' as b")
    assert _probe_run(project, DAY2).success
    assert rows() == [(dt.date.fromisoformat(DAY), 1, None), (dt.date.fromisoformat(DAY2), 1, "new")]


def test_a_data_test_stores_only_failing_rows_with_one_statement_and_a_passing_test_leaves_no_table(
        tmp_path: Path) -> None:
    """Issue 15: every data test's result is dbt's (the count of its failing rows), and its dq_audit table (read back
    by the quality findings) holds the failing rows of its last build -- with fewer statements than dbt's lookup, drop,
    BEGIN, create, COMMIT, count (macros/store_failures.sql; the per-test machinery and catalog writes were most of a
    small night's gov build, bench/notes.md 17-19):
    - a test that finds rows: a probe that stops at the first row, then ONE `create or replace table` (its query
      evaluated in full once) and dbt's count over the stored rows; an object of another type under its name (a view)
      is replaced;
    - a test that finds none afterwards: its count, and the earlier build's table (stale rows) is dropped;
    - a test that finds none with no table left: its count alone, no DDL at all (no empty table per passing test);
    - `store_failures_as: view`: the view replaces the table and the count reads it;
    - never a transaction of its own."""
    import yaml

    project = _probe_project(tmp_path, "{{ config(materialized='table') }}\n"
                                       "select * from (values (1, 'a'), (2, null), (3, null)) t(id, v)")
    (project / "models" / "probe.yml").write_text(yaml.safe_dump({"version": 2, "models": [{
        "name": "probe_model", "columns": [{"name": "v", "data_tests": [
            {"not_null": {"config": {"store_failures": True, "schema": "dq_audit", "severity": "warn"}}}]}]}]}))
    db = tmp_path / "probe.duckdb"

    def build() -> tuple[list, list, str]:
        res = dbtRunner().invoke(["build", "--project-dir", str(project), "--profiles-dir", str(project),
                                  "--target-path", str(project / "target"), "--log-path", str(project / "logs")])
        release_in_process_dbt()
        assert res.success, res.exception
        tests = [r for r in res.result.results if r.node.resource_type == "test"]
        with duckdb.connect(str(db)) as con:
            stored = con.execute("select table_name, table_type from information_schema.tables "
                                 "where table_schema = 'dq_audit'").fetchall()
            if stored:
                stored += con.execute("select * from dq_audit.not_null_probe_model_v order by all").fetchall()
        log = (project / "logs" / "dbt.log").read_text(encoding="utf-8")
        test_sql = re.findall(r"On test\.[^:\n]+: (.*?)(?=\n\S+ \[)", log[log.rindex("Running with dbt"):], re.S)
        assert test_sql, "the log names each test's statements (the checks below hold)"
        assert not [q for q in test_sql if q.strip().upper() in ("BEGIN", "ROLLBACK", "COMMIT")], test_sql
        return [(t.status, t.failures) for t in tests], stored, "\n".join(test_sql)

    with duckdb.connect(str(db)) as con:  # a view under the test's name, as a store_failures_as: view build leaves
        con.execute("create schema dq_audit")
        con.execute("create view dq_audit.not_null_probe_model_v as select 1 as id, 'x' as v")
    results, stored, sql = build()
    assert (results, stored) == ([("warn", 2)], [("not_null_probe_model_v", "BASE TABLE"), (2, None), (3, None)])
    # whether it finds any row (LIMIT 1), then the rows stored once and counted over the stored table
    assert sql.count("create or replace table") == 1 and sql.count(" as failures") == 2
    assert re.search(r"as zq_probe limit 1", sql) and re.search(r'from "[^"]+"\."dq_audit"\."not_null_probe_model_v"', sql)

    (project / "models" / "probe_model.sql").write_text("{{ config(materialized='table') }}\nselect 1 as id, 'a' as v")
    results, stored, sql = build()
    assert (results, stored) == ([("pass", 0)], [])  # the first build's failing rows are gone with its table
    assert "create or replace" not in sql and re.search(r'drop table if exists "[^"]+"\."dq_audit"', sql)

    results, stored, sql = build()
    assert (results, stored) == ([("pass", 0)], [])
    assert "create " not in sql and "drop " not in sql and sql.count(" as failures") == 1

    (project / "models" / "probe.yml").write_text(yaml.safe_dump({"version": 2, "models": [{  # stored as a view
        "name": "probe_model", "columns": [{"name": "v", "data_tests": [{"not_null": {"config": {
            "store_failures": True, "store_failures_as": "view", "schema": "dq_audit", "severity": "warn"}}}]}]}]}))
    (project / "models" / "probe_model.sql").write_text("{{ config(materialized='table') }}\n"
                                                       "select * from (values (1, null), (2, 'b')) t(id, v)")
    results, stored, sql = build()
    assert (results, stored) == ([("warn", 1)], [("not_null_probe_model_v", "VIEW"), (1, None)])
    assert sql.count("create or replace view") == 1 and "create or replace table" not in sql


def test_empty_redelivery_empties_the_product_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ops products use the same strategy (no hook, no compile-time query: the materialization calls it)."""
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "ops.duckdb"))
    monkeypatch.delenv("ZQ_PARTITION_DATE", raising=False)
    k = REG.scenarios["transit_ridership"].k_anonymity
    _ops_db(tmp_path / "ops.duckdb", {("R1", 8): k + 1})
    with duckdb.connect(str(tmp_path / "ops.duckdb")) as con:  # the same riders on the next day
        con.execute("insert into scenario_transit_ridership.bus_card_swipes select card_id, card_type, route_id,"
                    " swipe_time + interval 1 day, fare_yuan, _lineage_id || '-2', _partition_date + 1"
                    " from scenario_transit_ridership.bus_card_swipes")
    product = ["products.ops_transit_ridership"]
    for day in (DAY, DAY2):
        vars_ = json.dumps(dbt_vars(REG, day, scenarios=True))
        res = _dbt(["run", "--target", "ops", "--select", "ops_transit_ridership", "--vars", vars_], tmp_path)
        assert res.success, res.exception
    assert _partition_counts(tmp_path / "ops.duckdb", product) == {(product[0], DAY): 1, (product[0], DAY2): 1}
    with duckdb.connect(str(tmp_path / "ops.duckdb")) as con:
        con.execute("delete from scenario_transit_ridership.bus_card_swipes where _partition_date = ?", [DAY])
    vars_ = json.dumps(dbt_vars(REG, DAY, scenarios=True))
    res = _dbt(["run", "--target", "ops", "--select", "ops_transit_ridership", "--vars", vars_], tmp_path)
    assert res.success, res.exception
    assert _partition_counts(tmp_path / "ops.duckdb", product) == {(product[0], DAY2): 1}


def test_every_dbt_rule_kind_has_its_chinese_wording():
    """A finding's detail names its rule in Chinese (zqdata.quality.dbt_findings.RULE_TEXT): every rule kind the
    zq_rule macro knows has one, so a new rule never reaches an agency as a bare identifier."""
    import re

    from zqdata.quality.dbt_findings import RULE_TEXT

    macro = (DBT_PROJECT_DIR / "macros" / "rule_failures.sql").read_text(encoding="utf-8")
    kinds = set(re.findall(r"rule == '([a-z_]+)'", macro))
    assert kinds and kinds <= set(RULE_TEXT), sorted(kinds - set(RULE_TEXT))
