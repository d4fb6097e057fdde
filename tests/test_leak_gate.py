"""The leak gate (zqdata.leakgate): raw ID numbers, mobiles and names in ANY ops column, in any written form, whether
or not gov holds them — and nothing flagged in what ops legitimately holds (pseudonyms, credit codes, amounts...)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import duckdb
import pytest

from zqdata import standards
from zqdata.leakgate import find_leaks
from zqdata.registry import Registry, load_registry

D1 = dt.date(2025, 5, 1)


def with_check(first17: str) -> str:
    return first17 + standards.citizen_id_check_char(first17)


GOV_ID = with_check("44120219900101123")  # a resident on the gov platform
GOV_ID_X = next(with_check(f"441203198512{i:05d}") for i in range(1000)
                if with_check(f"441203198512{i:05d}").endswith("X"))
OTHER_ID = with_check("11010519491231002")  # valid, held by no gov table
GOV_MOBILE, OTHER_MOBILE = "13800138000", "15912345678"
GOV_NAME, GOV_NAME_2 = "张伟强", "王五"  # a resident; a legal representative (two characters)
FULL = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def gov(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "gov.duckdb"))
    con.execute("CREATE SCHEMA ods")
    con.execute("CREATE TABLE ods.resident_population (citizen_id VARCHAR, name VARCHAR, phone VARCHAR, "
                "_partition_date DATE)")
    con.execute("INSERT INTO ods.resident_population VALUES (?, ?, ?, ?), (?, '李四', NULL, ?)",
                [GOV_ID, GOV_NAME, GOV_MOBILE, D1, GOV_ID_X, D1])
    con.execute("CREATE TABLE ods.enterprise_registry (ent_name VARCHAR, legal_rep_name VARCHAR, "
                "legal_rep_id VARCHAR, _partition_date DATE)")
    con.execute("INSERT INTO ods.enterprise_registry VALUES ('肇庆市端州华嘉科技有限公司', ?, NULL, ?)",
                [GOV_NAME_2, D1])
    yield con
    con.close()


@pytest.fixture
def ops(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "ops.duckdb"))
    con.execute("CREATE SCHEMA products")
    yield con
    con.close()


def _plant(ops, column_type: str, *values: str, column: str = "note") -> None:
    """One ops table with ``column`` of ``column_type`` holding ``values`` (SQL expressions)."""
    ops.execute(f"CREATE TABLE products.p ({column} {column_type}, _partition_date DATE)")
    for v in values:
        ops.execute(f"INSERT INTO products.p SELECT {v}, DATE '{D1}'")


def _found(gov, ops, registry) -> list[tuple[str, str, int]]:
    leaks = find_leaks(gov, ops, D1, registry)
    return [(lk.column, lk.kind, lk.rows) for lk in leaks]


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- every type of column -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column_type,value,kind", [
    ("VARCHAR[]", f"['x', {_q(GOV_ID)}]", "citizen_id"),
    ("STRUCT(contact VARCHAR, tel VARCHAR)", f"{{'contact': 'n/a', 'tel': {_q(GOV_MOBILE)}}}", "mobile"),
    ("STRUCT(contact VARCHAR)", f"{{'contact': {_q(GOV_NAME_2)}}}", "name"),
    ("MAP(VARCHAR, VARCHAR)", f"MAP {{'id': {_q(GOV_ID_X)}}}", "citizen_id"),
    ("JSON", _q(json.dumps({"note": f"id {GOV_ID}"})), "citizen_id"),
    ("JSON", _q(json.dumps({"contact": GOV_NAME})), "name"),  # ensure_ascii: \u5f20\u4f1f\u5f3a
    ("HUGEINT", GOV_ID, "citizen_id"),
    ("BIGINT", GOV_MOBILE, "mobile"),
    ("DECIMAL(20,0)", GOV_ID, "citizen_id"),
    ("DOUBLE", GOV_MOBILE, "mobile"),  # a measure type: flagged when gov holds the number
    ("BLOB", f"{_q(GOV_ID)}::BLOB", "citizen_id"),
    ("VARCHAR[][]", f"[['a'], ['联系人{GOV_NAME}']]", "name"),
])
def test_a_column_of_any_type_is_read_as_text(gov, ops, registry, column_type, value, kind):
    _plant(ops, column_type, value)
    assert _found(gov, ops, registry) == [("note", kind, 1)]


# -- values gov never saw -------------------------------------------------------------------------------------------

def test_a_valid_id_number_gov_does_not_hold_is_found_by_its_check_digit(gov, ops, registry):
    wrong_check = OTHER_ID[:17] + ("0" if OTHER_ID[17] != "0" else "1")
    _plant(ops, "VARCHAR", _q(f"申请人身份证{OTHER_ID}"), _q(wrong_check))
    assert _found(gov, ops, registry) == [("note", "citizen_id:not_in_gov", 1)]  # the wrong check digit is not
    leak = find_leaks(gov, ops, D1, registry)[0]
    assert leak.found == "citizen_id" and not leak.held_by_gov


def test_a_mobile_gov_never_saw_is_found_by_its_pattern(gov, ops, registry):
    _plant(ops, "VARCHAR", _q(OTHER_MOBILE), _q(f"tel:{OTHER_MOBILE}"))
    assert _found(gov, ops, registry) == [("note", "mobile:not_in_gov", 2)]


def test_held_and_unheld_values_are_reported_apart(gov, ops, registry):
    _plant(ops, "VARCHAR", _q(f"{GOV_MOBILE}; {OTHER_MOBILE}"))
    got = find_leaks(gov, ops, D1, registry)
    assert [(lk.kind, lk.held_by_gov) for lk in got] == [("mobile", True), ("mobile:not_in_gov", False)]


# -- written forms --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind", [
    (f"ID{GOV_ID}", "citizen_id"),  # glued to letters
    (f"sfz{GOV_ID_X.lower()}abc", "citizen_id"),
    (f"tel{GOV_MOBILE}ext", "mobile"),
    (f"{GOV_ID[:4]} {GOV_ID[4:8]} {GOV_ID[8:12]} {GOV_ID[12:16]} {GOV_ID[16:]}", "citizen_id"),  # spaced
    (f"{GOV_ID[:6]}-{GOV_ID[6:14]}-{GOV_ID[14:]}", "citizen_id"),
    (f"{GOV_MOBILE[:3]} {GOV_MOBILE[3:7]} {GOV_MOBILE[7:]}", "mobile"),
    (f"+86 {GOV_MOBILE}", "mobile"),
    (f"+86{GOV_MOBILE}", "mobile"),
    (f"0086-{GOV_MOBILE[:3]}-{GOV_MOBILE[3:7]}-{GOV_MOBILE[7:]}", "mobile"),
    (f"电话：（+86）{GOV_MOBILE}", "mobile"),
    (GOV_ID.translate(FULL), "citizen_id"),  # full-width digits
    (f"手机{GOV_MOBILE.translate(FULL)}", "mobile"),
    (f"{GOV_ID} {GOV_MOBILE}", None),  # two numbers, one space apart: both found
])
def test_numbers_are_found_in_any_written_form(gov, ops, registry, text, kind):
    _plant(ops, "VARCHAR", _q(text))
    got = {k for _, k, _ in _found(gov, ops, registry)}
    assert got == ({kind} if kind else {"citizen_id", "mobile"}), text


def test_a_gov_name_inside_free_text_is_found_and_masked(gov, ops, registry):
    _plant(ops, "VARCHAR", _q(f"联系人{GOV_NAME}电话见附件"), _q(f"经办：{GOV_NAME_2}，已核实"))
    leaks = find_leaks(gov, ops, D1, registry)
    assert [(lk.kind, lk.rows) for lk in leaks] == [("name", 2)]
    assert GOV_NAME not in leaks[0].sample and GOV_NAME_2 not in leaks[0].sample


def test_samples_are_masked(gov, ops, registry):
    _plant(ops, "VARCHAR[]", f"[{_q('ID' + OTHER_ID)}]")
    (leak,) = find_leaks(gov, ops, D1, registry)
    assert OTHER_ID not in leak.sample and leak.sample.startswith(OTHER_ID[0]) and leak.sample.endswith(OTHER_ID[-1])


# -- what ops legitimately holds is not flagged ---------------------------------------------------------------------

def _pseudonyms_with_number_runs(n: int) -> list[str]:
    """64-hex HMAC-like digests that contain an 11-digit run starting with 1[3-9] or an 18-digit valid ID number."""
    digit_id = next(x for x in (with_check(f"4412241980020{i:04d}") for i in range(100)) if x[-1] != "X")
    out, i = [], 0
    while len(out) < n:
        h = hashlib.sha256(f"p{i}".encode()).hexdigest()
        i += 1
        out.append(h[:20] + GOV_MOBILE + h[31:] if len(out) % 3 == 0 else
                   h[:10] + digit_id + h[28:] if len(out) % 3 == 1 else h)
    return out


def test_pseudonyms_credit_codes_amounts_and_platform_values_are_not_flagged(gov, ops, registry):
    digit_usccs = [c for c in (f"91441900{i:09d}" for i in range(200)) if standards.uscc_check_char(c).isdigit()]
    digit_usccs = [c + standards.uscc_check_char(c) for c in digit_usccs]
    agency_usccs = [c + standards.uscc_check_char(c) for c in (f"11441900{i:09d}" for i in range(200))]
    # all-digit credit codes whose last character happens to be a GB 11643 check digit too
    assert any(standards.citizen_id_check_char(c[:17]) == c[17] for c in digit_usccs + agency_usccs)
    texts = (_pseudonyms_with_number_runs(30) + digit_usccs + agency_usccs
             + ["91441200MA00000001", "91441284MAQ488GHRY",
                "resident_population/2025-06-01/part-0001.jsonl#227", "2025-06-01 08:00:00",
                "2025-06-01T08:00:00+08:00",
                "138****8000", "王**", "30-39", "R201", "K1", "441202", "2025-05",
                OTHER_ID[:17] + ("0" if OTHER_ID[17] != "0" else "1"),  # wrong check digit
                with_check("44120230000101123"),  # born in the future
                with_check("44120218000101123"),  # born before 1900
                "12345678901", "23800138000", "1380013800", "138001380001",  # not mobile-shaped
                "订单号 202506011380013800123"])
    ops.execute("CREATE TABLE products.p (note VARCHAR, lineage VARCHAR[], amount DECIMAL(18,2), "
                "total DOUBLE, n BIGINT, j JSON, _partition_date DATE)")
    ops.executemany("INSERT INTO products.p VALUES (?, [?, ?], 13912345678.00, 15012345678.0, 12345678901, ?, ?)",
                    [[t, t, "water_usage/2025-06-01/part-0001.csv#25848", json.dumps({"k": t}), D1] for t in texts])
    assert find_leaks(gov, ops, D1, registry) == []


def test_enterprise_names_may_contain_a_persons_name(gov, ops, registry):
    """ent_name is public (registry pi: none) and names firms after people: matched whole only. A two-character name
    inside a longer word (王五金店) is not a name either; standing alone it is."""
    ops.execute("CREATE TABLE products.p (ent_name VARCHAR, note VARCHAR, _partition_date DATE)")
    ops.execute("INSERT INTO products.p VALUES (?, '王五金店', ?)", [f"肇庆市{GOV_NAME}贸易有限公司", D1])
    assert find_leaks(gov, ops, D1, registry) == []
    ops.execute("INSERT INTO products.p VALUES (?, ?, ?)", [GOV_NAME, f"肇庆市{GOV_NAME}贸易有限公司", D1])
    assert _found(gov, ops, registry) == [("ent_name", "name", 1), ("note", "name", 1)]


def test_only_the_partition_is_scanned_and_columns_that_cannot_hold_a_value_are_skipped(gov, ops, registry):
    ops.execute("CREATE TABLE products.p (note VARCHAR, small INTEGER, ok BOOLEAN, day DATE, _partition_date DATE)")
    ops.execute("INSERT INTO products.p VALUES (?, 2138001380, TRUE, DATE '2025-05-01', ?)",
                [GOV_ID, D1 - dt.timedelta(days=1)])
    assert find_leaks(gov, ops, D1, registry) == []
    assert [lk.kind for lk in find_leaks(gov, ops, D1, registry, all_partitions=True)] == ["citizen_id"]


def test_the_sql_id_rule_agrees_with_the_python_reference():
    """One rule, two implementations: `citizen_id_sql` is generated from zqdata.standards' GB 11643 constants and must
    agree with `is_plausible_citizen_id` (standards.is_valid_citizen_id plus province and birth-year plausibility)."""
    from zqdata.leakgate import citizen_id_sql, is_plausible_citizen_id

    samples = standards.sample_values("citizen_id", 400, seed=11) + [
        GOV_ID, GOV_ID_X, OTHER_ID, with_check("91441900123456789"), with_check("44120218990101123"),
        with_check("44120219000101123"), with_check("99120219900101123")]
    samples = [s.upper() for s in samples if s]
    con = duckdb.connect()
    got = dict(con.execute(f"SELECT s, coalesce({citizen_id_sql('s')}, FALSE) FROM unnest(?) t(s)",
                           [samples]).fetchall())
    assert {s: is_plausible_citizen_id(s) for s in samples} == got
    assert sum(got.values()) > 100



def test_lineage_ids_are_scanned_once_per_delivered_file(gov, ops, registry):
    """`_lineage_id` is `<dataset>/<date>/<file>#<row>`: the supplier names the file (scanned), the row number (≤ 10
    digits) cannot be an ID or a mobile, so the scan reads one value per file; anything else there is scanned whole."""
    ops.execute("CREATE TABLE products.p (_lineage_id VARCHAR, _partition_date DATE)")
    ops.executemany("INSERT INTO products.p VALUES (?, ?)",
                    [[f"resident_population/{D1}/part-0001.jsonl#{i}", D1] for i in range(1, 2001)])
    assert find_leaks(gov, ops, D1, registry) == []
    ops.executemany("INSERT INTO products.p VALUES (?, ?)",
                    [[f"resident_population/{D1}/{GOV_MOBILE}.csv#{i}", D1] for i in range(1, 4)]
                    + [[f"resident_population/{D1}/part-0002.csv#{OTHER_MOBILE}", D1]])
    assert _found(gov, ops, registry) == [("_lineage_id", "mobile", 1), ("_lineage_id", "mobile:not_in_gov", 1)]


# ---------------------------------------------------------------- the maintained index of gov identifiers (issue 15)


def _values(table) -> set[tuple[str, str]]:
    return set(zip(table.column("kind").to_pylist(), table.column("value").to_pylist(), strict=True))


def test_the_index_gives_the_value_set_of_the_full_scan_and_grows_by_the_night(gov, registry):
    from zqdata.leakgate import gov_personal_values, update_identifier_index

    d2 = D1 + dt.timedelta(days=1)
    scanned_d1 = _values(gov_personal_values(gov, registry, D1))  # no index yet: every relation scanned
    assert ("citizen_id", GOV_ID) in scanned_d1 and ("name", GOV_NAME_2) in scanned_d1
    assert update_identifier_index(gov, registry, D1) == len(scanned_d1)  # the first call builds from all history
    assert _values(gov_personal_values(gov, registry, D1)) == scanned_d1
    # the next night adds its own partition only, and a day's set never holds a later day's values
    gov.execute("INSERT INTO ods.resident_population VALUES ('110101199003078515', '赵六六', '13912345678', ?)", [d2])
    assert update_identifier_index(gov, registry, d2) == 3
    with_d2 = _values(gov_personal_values(gov, registry, d2))
    assert with_d2 - scanned_d1 == {("citizen_id", "110101199003078515"), ("name", "赵六六"), ("mobile", "13912345678")}
    assert _values(gov_personal_values(gov, registry, D1)) == scanned_d1
    # the index answers what a scan answers, without the scan
    gov.execute("DROP SCHEMA leakgate CASCADE")
    assert _values(gov_personal_values(gov, registry, d2)) == with_d2


def test_a_value_a_redelivery_removed_is_still_looked_for(gov, ops, registry):
    from zqdata.leakgate import update_identifier_index

    update_identifier_index(gov, registry, D1)
    gov.execute("DELETE FROM ods.resident_population")  # the agency redelivered without these people
    _plant(ops, "VARCHAR", f"'备注 {GOV_NAME} 来电'")
    assert [kind for _, kind, _ in _found(gov, ops, registry)] == ["name"]


def _pi_none(registry: Registry, dataset: str, field: str) -> Registry:
    """``registry`` with ``dataset.field`` not personal (as before a registry change classified it personal)."""
    ds = registry.datasets[dataset]
    fields = [f.model_copy(update={"class_": f.class_.model_copy(update={"pi": "none"})}) if f.name == field else f
              for f in ds.fields]
    return registry.model_copy(update={"datasets": {**registry.datasets,
                                                    dataset: ds.model_copy(update={"fields": fields})}})


def test_a_field_classified_personal_later_is_indexed_from_its_whole_history(gov, ops, registry):
    """Nights indexed while resident_population.name was not personal; the registry then classifies it personal. The
    gate must see every name gov ever held in it (the full scan's answer), not only the names of later nights."""
    from zqdata.leakgate import gov_personal_values, personal_value_fields, update_identifier_index

    before = _pi_none(registry, "resident_population", "name")
    assert "name" not in personal_value_fields(before)["resident_population"]
    update_identifier_index(gov, before, D1)
    assert ("name", GOV_NAME) not in _values(gov_personal_values(gov, before, D1))
    d2 = D1 + dt.timedelta(days=1)
    _plant(ops, "VARCHAR", f"'联系人{GOV_NAME}已回访'")
    # the gate under the new registry, before any night indexed for it: the index is not used
    assert [kind for _, kind, _ in _found(gov, ops, registry)] == ["name"]
    update_identifier_index(gov, registry, d2)  # the next night (nothing new delivered) builds the index again
    indexed = _values(gov_personal_values(gov, registry, d2))
    gov.execute("DROP SCHEMA leakgate CASCADE")
    assert indexed == _values(gov_personal_values(gov, registry, d2))  # the full scan's set
    assert ("name", GOV_NAME) in indexed


def test_an_index_whose_first_build_failed_is_not_used_and_is_built_again(gov, ops, registry, monkeypatch):
    """The first build scans the whole history (the costliest moment: memory, a cancelled step). When it fails, the
    gate must not read an empty or partial index as complete, and the next update builds it from the whole history."""
    from zqdata import leakgate
    from zqdata.leakgate import gov_personal_values, update_identifier_index

    scanned = _values(gov_personal_values(gov, registry, D1))
    real = leakgate.run_in_transaction

    def fails_before_commit(con, work, **kw):
        con.execute("BEGIN")
        work(con, 1)
        con.execute("ROLLBACK")
        raise duckdb.OutOfMemoryException("simulated: the first build ran out of memory")

    monkeypatch.setattr(leakgate, "run_in_transaction", fails_before_commit)
    with pytest.raises(duckdb.OutOfMemoryException):
        update_identifier_index(gov, registry, D1)
    monkeypatch.setattr(leakgate, "run_in_transaction", real)
    gov.execute("CREATE SCHEMA IF NOT EXISTS leakgate")  # as an older build left it: the table, no state row
    gov.execute("CREATE TABLE IF NOT EXISTS leakgate.gov_identifiers (kind VARCHAR, value VARCHAR, first_day DATE)")
    assert _values(gov_personal_values(gov, registry, D1)) == scanned  # the full scan, not the empty table
    _plant(ops, "VARCHAR", f"'联系人{GOV_NAME}已回访'")
    assert [kind for _, kind, _ in _found(gov, ops, registry)] == ["name"]
    d2 = D1 + dt.timedelta(days=1)
    assert update_identifier_index(gov, registry, d2) == len(scanned)  # the whole history, not day 2 alone
    assert _values(gov_personal_values(gov, registry, d2)) == scanned
