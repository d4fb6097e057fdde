"""The gov → ops crossing: released fields only, scenario authorization and consent, Art. 2 exclusions, the leak gate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pytest

from zqdata import asset_keys
from zqdata.authorization import AuthorizationError
from zqdata.boundary import check_exclusions, cross_boundary, find_leaks
from zqdata.desensitize import PseudonymKey, domain_secret, pseudonymize, released_fields
from zqdata.registry import Registry, load_registry

D1 = dt.date(2025, 5, 1)
D2 = dt.date(2025, 5, 2)
SECRET = "test-key-boundary-7f3a-0123456789abcdef"
SQL_TYPES = {"string": "VARCHAR", "integer": "INTEGER", "decimal": "DECIMAL(18,2)", "date": "DATE",
             "timestamp": "TIMESTAMP"}


def citizen_id(prefix17: str) -> str:
    """A GB 11643 ID with a correct check character (DOMAIN.md)."""
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    s = sum(int(c) * w for c, w in zip(prefix17, weights))
    return prefix17 + "10X98765432"[s % 11]


ID_A = citizen_id("44120219900101123")
ID_B = citizen_id("44120319851231456")
REP_ID = citizen_id("44120419700615789")
ENT_A, ENT_B, ENT_C = "91441200MA00000001", "91441200MA00000002", "91441200MA00000003"


def _rows(ds_code: str, d: dt.date) -> list[dict]:
    ts = dt.datetime.combine(d, dt.time(9, 0))
    if ds_code == "resident_population":
        return [
            dict(citizen_id=ID_A, name="张三丰", gender="1", birth_date=dt.date(1990, 1, 1), phone="13800138000",
                 address="端州区天宁北路1号", district_code="441202", case_flag="X1", updated_at=ts),
            dict(citizen_id=ID_B, name="李四", gender="2", birth_date=dt.date(1985, 12, 31), phone="13912345678",
                 address="鼎湖区坑口街2号", district_code="441203", case_flag=None, updated_at=ts),
        ]
    if ds_code == "enterprise_registry":
        return [
            dict(credit_code=c, ent_name=f"肇庆测试企业{i}有限公司", legal_rep_name="王五", legal_rep_id=REP_ID,
                 district_code="441202", reg_capital_wan=100 + i, status="1", established_date=dt.date(2020, 1, 1),
                 updated_at=ts)
            for i, c in enumerate([ENT_A, ENT_B, ENT_C])
        ]
    if ds_code == "social_insurance":
        return [dict(record_id=f"SI{i}", credit_code=c, district_code="441202", period="2025-04", insured_headcount=10,
                     contribution_yuan=5000, paid_at=ts) for i, c in enumerate([ENT_A, ENT_B, ENT_C])]
    if ds_code in ("electricity_usage", "water_usage"):
        amount = "kwh" if ds_code == "electricity_usage" else "cubic_meters"
        return [dict(meter_id=f"M{i}", credit_code=c, district_code="441202", reading_date=d, **{amount: 12.5})
                for i, c in enumerate([ENT_A, ENT_B, ENT_C])]
    if ds_code == "bus_card_swipes":
        return [dict(swipe_id=f"S{d:%m%d}{i}", card_id=f"CARD{i % 3}", card_type="01", route_id="R1", stop_id="ST1",
                     swipe_time=ts, fare_yuan=2) for i in range(6)]
    if ds_code == "subject_consent":
        if d == D1:
            return [dict(consent_id="C1", subject_type="enterprise", subject_id=ENT_A, scenario_code="sme_credit_profile",
                         status="granted", effective_at=ts),
                    dict(consent_id="C2", subject_type="enterprise", subject_id=ENT_B, scenario_code="sme_credit_profile",
                         status="granted", effective_at=ts),
                    # consent for another scenario does not count
                    dict(consent_id="C3", subject_type="enterprise", subject_id=ENT_C, scenario_code="transit_ridership",
                         status="granted", effective_at=ts),
                    # residents who authorized a use on the operations platform (Art. 2)
                    dict(consent_id="C4", subject_type="person", subject_id=ID_A, scenario_code="transit_ridership",
                         status="granted", effective_at=ts),
                    dict(consent_id="C5", subject_type="person", subject_id=ID_B, scenario_code="sme_credit_profile",
                         status="granted", effective_at=ts),
                    # consents to the test scenarios of `personal_uses` (scenarios that read personal fields)
                    dict(consent_id="C6", subject_type="person", subject_id=ID_A, scenario_code="resident_statistics",
                         status="granted", effective_at=ts),
                    dict(consent_id="C7", subject_type="person", subject_id=ID_B, scenario_code="resident_statistics",
                         status="granted", effective_at=ts),
                    dict(consent_id="C10", subject_type="enterprise", subject_id=ENT_A, scenario_code="legal_rep_check",
                         status="granted", effective_at=ts)]
        return []
    raise KeyError(ds_code)


def build_gov(path: Path, registry: Registry, days: list[dt.date]) -> None:
    """A hand-made gov DB: ``intermediate.int_<dataset>`` (typed, with lineage) and ``ods.<dataset>`` (VARCHAR)."""
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA intermediate; CREATE SCHEMA ods")
    for ds in registry.datasets.values():
        typed = ", ".join(f"{f.name} {SQL_TYPES[f.type]}" for f in ds.fields)
        con.execute(f"CREATE TABLE intermediate.int_{ds.code} ({typed}, _lineage_id VARCHAR, _partition_date DATE)")
        raw = ", ".join(f"{f.name} VARCHAR" for f in ds.fields)
        con.execute(f"CREATE TABLE ods.{ds.code} ({raw}, _lineage_id VARCHAR, _partition_date DATE)")
        for d in days:
            for i, row in enumerate(_rows(ds.code, d), start=1):
                values = [row.get(f.name) for f in ds.fields] + [f"{ds.code}/{d}/part-0001#{i}", d]
                marks = ", ".join("?" * len(values))
                con.execute(f"INSERT INTO intermediate.int_{ds.code} VALUES ({marks})", values)
                con.execute(f"INSERT INTO ods.{ds.code} VALUES ({marks})",
                            [None if v is None else str(v) for v in values[:-1]] + [d])
    con.close()


@pytest.fixture
def registry() -> Registry:
    return load_registry()


def personal_uses(registry: Registry) -> Registry:
    """The registry plus two scenarios reading personal fields: every released field of the residents (with their
    consent) and the legal representative's ID (with the enterprise's). The demo registry has no such scenario, so
    (data minimisation, issue 11) residents and legal representatives would not cross at all."""
    sme = registry.scenarios["sme_credit_profile"]
    residents = sme.model_copy(update={
        "code": "resident_statistics", "product": "ops_resident_statistics", "consent_required": "person",
        "authorized_fields": {"resident_population": released_fields(registry.datasets["resident_population"])}})
    reps = sme.model_copy(update={"code": "legal_rep_check", "product": "ops_legal_rep_check",
                                  "authorized_fields": {"enterprise_registry": ["credit_code", "legal_rep_id"]}})
    return registry.model_copy(update={"scenarios": {**registry.scenarios, residents.code: residents,
                                                     reps.code: reps}})


@pytest.fixture
def dbs(tmp_path: Path, registry: Registry, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    gov_path, ops_path = tmp_path / "warehouse" / "gov.duckdb", tmp_path / "warehouse" / "ops.duckdb"
    gov_path.parent.mkdir(parents=True)
    build_gov(gov_path, registry, [D1, D2])
    gov, ops = duckdb.connect(str(gov_path)), duckdb.connect(str(ops_path))
    yield gov, ops
    gov.close()
    ops.close()


def _key(secret: str = SECRET) -> PseudonymKey:
    return PseudonymKey.from_secret(secret)


def _pseudo(value: str, field: str, scope: str = "desensitized") -> str:
    """The pseudonym the boundary releases for ``value`` in ``field`` (``<dataset>.<field>``) of ops schema ``scope``."""
    return pseudonymize(value, SECRET, role=field, scope=scope)


def test_desensitized_tables_hold_only_released_fields_masked(dbs, registry):
    gov, ops = dbs
    registry = personal_uses(registry)
    report = cross_boundary(gov, ops, registry, D1, _key())
    rp = registry.datasets["resident_population"]
    cols = [r[0] for r in ops.execute("DESCRIBE desensitized.resident_population").fetchall()]
    assert cols == released_fields(rp) + ["_lineage_id", "_partition_date"]
    assert not {"name", "address", "case_flag"} & set(cols)
    row = ops.execute("SELECT citizen_id, phone, birth_date FROM desensitized.resident_population "
                      "WHERE phone LIKE '138%'").fetchone()
    assert row == (_pseudo(ID_A, "resident_population.citizen_id"), "138****8000", "30-39")
    assert report.released["resident_population"] == 2
    assert "subject_consent" not in report.released  # release: false never crosses
    assert ops.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'subject_consent'").fetchone()[0] == 0
    for ds in registry.datasets:
        assert check_exclusions(ops, registry, ds, D1) == []


def test_subjects_without_any_authorization_never_reach_the_operations_platform(dbs, registry):
    """Art. 2: personal information of a resident who authorized nothing stays in the gov domain, even desensitized."""
    gov, ops = dbs
    registry = personal_uses(registry)
    unconsented = citizen_id("44122419800202135")
    gov.execute("INSERT INTO intermediate.int_resident_population BY NAME SELECT * REPLACE (? AS citizen_id, "
                "'x#99' AS _lineage_id) FROM intermediate.int_resident_population WHERE citizen_id = ? "
                "AND _partition_date = ?", [unconsented, ID_A, D1])
    report = cross_boundary(gov, ops, registry, D1, _key())
    released = {r[0] for r in ops.execute("SELECT citizen_id FROM desensitized.resident_population").fetchall()}
    assert report.released["resident_population"] == 2
    assert _pseudo(unconsented, "resident_population.citizen_id") not in released
    assert released == {_pseudo(ID_A, "resident_population.citizen_id"), _pseudo(ID_B, "resident_population.citizen_id")}


def test_scenario_tables_hold_only_authorized_fields_of_consenting_subjects(dbs, registry):
    gov, ops = dbs
    report = cross_boundary(gov, ops, registry, D1, _key())
    sme = registry.scenarios["sme_credit_profile"]
    for ds_code, fields in sme.authorized_fields.items():
        cols = [r[0] for r in ops.execute(f"DESCRIBE scenario_sme_credit_profile.{ds_code}").fetchall()]
        assert cols == fields + ["_lineage_id", "_partition_date"]
        subjects = {r[0] for r in ops.execute(f"SELECT credit_code FROM scenario_sme_credit_profile.{ds_code}").fetchall()}
        assert subjects == {ENT_A, ENT_B}  # ENT_C consented only to another scenario
    assert report.consent_excluded["sme_credit_profile"]["enterprise_registry"] == 1
    # the transit scenario needs no consent; its card ids are pseudonyms
    cards = {r[0] for r in ops.execute("SELECT card_id FROM scenario_transit_ridership.bus_card_swipes").fetchall()}
    assert cards == {_pseudo(f"CARD{i}", "bus_card_swipes.card_id", "scenario_transit_ridership") for i in range(3)}


def test_revoking_consent_removes_the_subject_from_the_next_product(dbs, registry):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    gov.execute("INSERT INTO intermediate.int_subject_consent VALUES ('C9', 'enterprise', ?, 'sme_credit_profile', "
                "'revoked', ?, 'subject_consent/2025-05-02/part-0001#1', ?)",
                [ENT_B, dt.datetime(2025, 5, 2, 10, 0), D2])
    cross_boundary(gov, ops, registry, D2, _key())
    day2 = {r[0] for r in ops.execute("SELECT credit_code FROM scenario_sme_credit_profile.enterprise_registry "
                                      "WHERE _partition_date = ?", [D2]).fetchall()}
    day1 = {r[0] for r in ops.execute("SELECT credit_code FROM scenario_sme_credit_profile.enterprise_registry "
                                      "WHERE _partition_date = ?", [D1]).fetchall()}
    assert day2 == {ENT_A}
    assert day1 == {ENT_A}  # retroactive (issue 11): the revocation removes ENT_B from every earlier partition too


def test_consent_effective_after_the_day_does_not_count_yet(dbs, registry):
    gov, ops = dbs
    gov.execute("INSERT INTO intermediate.int_subject_consent VALUES ('C8', 'enterprise', ?, 'sme_credit_profile', "
                "'granted', ?, 'x#1', ?)", [ENT_C, dt.datetime(2025, 5, 2, 0, 0), D1])
    cross_boundary(gov, ops, registry, D1, _key())
    got = {r[0] for r in ops.execute("SELECT credit_code FROM scenario_sme_credit_profile.water_usage").fetchall()}
    assert ENT_C not in got


def test_expired_authorization_blocks_its_scenario_and_writes_nothing_for_it(dbs, registry):
    gov, ops = dbs
    sme = registry.scenarios["sme_credit_profile"]
    expired = sme.model_copy(update={"valid_to": D1})  # expires at the end of 2025-05-01
    reg = registry.model_copy(update={"scenarios": {**registry.scenarios, sme.code: expired}})
    cross_boundary(gov, ops, reg, D1, _key())
    with pytest.raises(AuthorizationError, match="sme_credit_profile.*2025-05-02.*expired"):
        cross_boundary(gov, ops, reg, D2, _key())
    count = ops.execute("SELECT count(*) FROM scenario_sme_credit_profile.enterprise_registry WHERE _partition_date = ?",
                        [D2]).fetchone()[0]
    assert count == 0
    # the rest of the crossing for that day went through
    assert ops.execute("SELECT count(*) FROM scenario_transit_ridership.bus_card_swipes WHERE _partition_date = ?",
                       [D2]).fetchone()[0] == 6
    # no scenario in force on D2 uses the enterprise registry (data minimisation), and the expired scenario's
    # data left every partition (retroactive expiry, issue 11)
    assert ops.execute("SELECT count(*) FROM desensitized.enterprise_registry").fetchone()[0] == 0
    assert ops.execute("SELECT count(*) FROM scenario_sme_credit_profile.enterprise_registry").fetchone()[0] == 0


def test_revoked_scenario_is_blocked(dbs, registry):
    gov, ops = dbs
    transit = registry.scenarios["transit_ridership"]
    reg = registry.model_copy(update={"scenarios": {**registry.scenarios,
                                                    transit.code: transit.model_copy(update={"status": "revoked"})}})
    report = cross_boundary(gov, ops, reg, D1, _key(), strict=False)
    assert "撤销" in report.blocked["transit_ridership"] and "revoked" in report.blocked["transit_ridership"]
    assert ops.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'scenario_transit_ridership'"
                       ).fetchone()[0] == 0


def test_rerun_replaces_the_partition_and_a_failure_keeps_the_previous_state(dbs, registry):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    cross_boundary(gov, ops, registry, D1, _key())
    assert ops.execute("SELECT count(*) FROM desensitized.bus_card_swipes").fetchone()[0] == 6
    # fail half-way: the released tables are rewritten first, then the consent model is missing
    gov.execute("DELETE FROM intermediate.int_bus_card_swipes")
    gov.execute("DROP TABLE intermediate.int_subject_consent")
    with pytest.raises(Exception, match="subject_consent"):
        cross_boundary(gov, ops, registry, D1, _key())
    assert ops.execute("SELECT count(*) FROM desensitized.bus_card_swipes").fetchone()[0] == 6


def test_pseudonyms_are_stable_across_days_and_change_with_the_key(dbs, registry):
    gov, ops = dbs
    registry = personal_uses(registry)
    cross_boundary(gov, ops, registry, D1, _key())
    cross_boundary(gov, ops, registry, D2, _key())
    by_day = {d: {r[0] for r in ops.execute("SELECT citizen_id FROM desensitized.resident_population "
                                            "WHERE _partition_date = ?", [d]).fetchall()} for d in (D1, D2)}
    assert by_day[D1] == by_day[D2] and len(by_day[D1]) == 2
    cross_boundary(gov, ops, registry, D1, _key("another-key-for-the-rotation-test-0123456789"))
    rotated = {r[0] for r in ops.execute("SELECT citizen_id FROM desensitized.resident_population "
                                         "WHERE _partition_date = ?", [D1]).fetchall()}
    assert rotated.isdisjoint(by_day[D1])


def test_key_is_written_to_no_file_under_the_data_dir(dbs, registry, tmp_path):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    cross_boundary(gov, ops, registry, D2, _key())
    gov.execute("CHECKPOINT")
    ops.execute("CHECKPOINT")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "ops.duckdb" for p in files)
    # nor any derived domain key, raw or hex (they are bound as parameters like the master key's pads)
    domain_keys = [domain_secret(SECRET, role, scope) for role in ("resident_population.citizen_id",
                                                                   "bus_card_swipes.card_id")
                   for scope in ("desensitized", "scenario_transit_ridership")]
    secrets = [SECRET.encode()] + domain_keys + [k.hex().encode() for k in domain_keys]
    for p in files:
        data = p.read_bytes()
        assert not any(s in data for s in secrets), p


def test_leak_gate_passes_after_the_crossing_and_fails_on_one_planted_id(dbs, registry):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    assert find_leaks(gov, ops, D1, registry) == []
    ops.execute("UPDATE desensitized.bus_card_swipes SET route_id = ? WHERE _lineage_id = "
                "(SELECT min(_lineage_id) FROM desensitized.bus_card_swipes)", [f"note {ID_B} x"])
    leaks = find_leaks(gov, ops, D1, registry)
    assert [(l.table, l.column, l.kind, l.rows) for l in leaks] == [("desensitized.bus_card_swipes", "route_id",
                                                                       "citizen_id", 1)]
    assert ID_B not in leaks[0].sample


@pytest.mark.parametrize("value,kind", [("13912345678", "mobile"), ("王五", "name"), (REP_ID, "citizen_id")])
def test_leak_gate_finds_phones_names_and_legal_rep_ids_in_any_table(dbs, registry, value, kind):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    ops.execute("CREATE SCHEMA products; CREATE TABLE products.p (note VARCHAR)")
    ops.execute("INSERT INTO products.p VALUES (?)", [value])
    leaks = find_leaks(gov, ops, D1, registry)
    assert [(l.table, l.kind) for l in leaks] == [("products.p", kind)]


def test_leak_gates_share_the_gov_value_set_until_the_gov_db_changes(tmp_path, registry):
    """The boundary's gate and the product gates reuse one all-history value set per gov file version; a new
    resident written to gov afterwards is still caught (the set is rebuilt). A name, since only names depend on the
    gov value set alone (an ID or mobile is caught by its shape whether gov holds it or not)."""
    from zqdata import leakgate as boundary

    gov_path, ops_path = tmp_path / "gov.duckdb", tmp_path / "ops.duckdb"
    build_gov(gov_path, registry, [D1])
    with duckdb.connect(str(ops_path)) as ops:
        ops.execute("CREATE SCHEMA products; CREATE TABLE products.p (note VARCHAR)")
        ops.execute("INSERT INTO products.p VALUES ('联系人欧阳振华')")
        with duckdb.connect(str(gov_path), read_only=True) as gov:
            assert find_leaks(gov, ops, D1, registry) == []
            first = boundary._VALUE_SET_CACHE.copy()
            assert len(first) == 1
        with duckdb.connect(str(gov_path), read_only=True) as gov:  # the next gate, a new connection, same data
            assert find_leaks(gov, ops, D1, registry) == []
            assert boundary._VALUE_SET_CACHE.keys() == first.keys()
        with duckdb.connect(str(gov_path)) as gov:  # gov changes: a resident of that name is delivered
            gov.execute("INSERT INTO ods.resident_population (name, _lineage_id, _partition_date) VALUES (?, ?, ?)",
                        ["欧阳振华", f"resident_population/{D1}/part-0002#1", D1])
        with duckdb.connect(str(gov_path), read_only=True) as gov:
            leaks = find_leaks(gov, ops, D1, registry)
    assert [(l.table, l.kind) for l in leaks] == [("products.p", "name")]


def test_a_held_back_dataset_does_not_cross_and_its_partition_leaves_ops(dbs, registry):
    """Issue 12 (7): the quality gate held water back for D1: its D1 partition leaves every ops table (desensitized and
    scenario), the other datasets cross as usual, other days of water stay, and ops records what was held back."""
    from zqdata.boundary import held_back_on_ops

    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    cross_boundary(gov, ops, registry, D2, _key())
    water = "SELECT count(*) FROM {} WHERE _partition_date = ?"
    assert ops.execute(water.format("scenario_sme_credit_profile.water_usage"), [D1]).fetchone()[0] == 2
    reason = "delivery.record_count_mismatch（完整性）"
    report = cross_boundary(gov, ops, registry, D1, _key(), held_back={"water_usage": reason})
    assert report.held_back == {"water_usage": reason} and report.released["water_usage"] == 0
    assert report.scenario_rows["sme_credit_profile"]["water_usage"] == 0
    assert report.consent_excluded["sme_credit_profile"]["water_usage"] == 0  # held back, not excluded for consent
    for table in ("desensitized.water_usage", "scenario_sme_credit_profile.water_usage"):
        assert ops.execute(water.format(table), [D1]).fetchone()[0] == 0, table
        assert ops.execute(water.format(table), [D2]).fetchone()[0] > 0, table  # other days are not touched
    # the datasets that passed crossed, the held-back dataset's scenario included
    assert report.released["bus_card_swipes"] == 6
    assert ops.execute(water.format("scenario_transit_ridership.bus_card_swipes"), [D1]).fetchone()[0] == 6
    assert ops.execute(water.format("scenario_sme_credit_profile.enterprise_registry"), [D1]).fetchone()[0] == 2
    assert held_back_on_ops(ops, D1) == {"water_usage": reason} and held_back_on_ops(ops, D2) == {}
    for ds in registry.datasets:
        assert check_exclusions(ops, registry, ds, D1) == []
    # the agency redelivers and the gate passes: the partition crosses again and is no longer recorded as held back
    cross_boundary(gov, ops, registry, D1, _key())
    assert ops.execute(water.format("scenario_sme_credit_profile.water_usage"), [D1]).fetchone()[0] == 2
    assert held_back_on_ops(ops, D1) == {}


def test_held_back_on_ops_is_empty_before_any_crossing_held_anything_back(dbs, registry):
    from zqdata.boundary import held_back_on_ops
    from zqdata.publish import products_reading

    gov, ops = dbs
    assert held_back_on_ops(ops, D1) == {}
    cross_boundary(gov, ops, registry, D1, _key())
    assert held_back_on_ops(ops, D1) == {}
    assert products_reading(registry, {"water_usage"}) == ["ops_sme_credit_profile"]
    assert products_reading(registry, {"bus_card_swipes"}) == ["ops_transit_ridership"]
    assert products_reading(registry, set()) == []


# -- Dagster wiring ----------------------------------------------------------------------------------------------


def _resources(tmp_path: Path) -> dict:
    import dagster as dg

    from assets.ops_platform.boundary import PseudonymKeyResource
    from orchestration.resources import WarehouseResource

    return {"warehouse": WarehouseResource(gov_db=str(tmp_path / "warehouse" / "gov.duckdb"),
                                           ops_db=str(tmp_path / "warehouse" / "ops.duckdb")),
            "pseudonym": PseudonymKeyResource(key=dg.EnvVar("ZQ_PSEUDONYM_KEY"))}


def test_boundary_asset_materializes_with_passing_blocking_checks(tmp_path, registry, monkeypatch):
    import dagster as dg

    from assets.ops_platform.boundary import boundary_defs, build_boundary_crossing

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", SECRET)
    (tmp_path / "warehouse").mkdir()
    build_gov(tmp_path / "warehouse" / "gov.duckdb", registry, [D1])
    boundary = build_boundary_crossing(registry)
    assert boundary.op.name == "boundary_crossing"
    released = {ds.code for ds in registry.datasets.values() if ds.release}
    assert {asset_keys.parse(k.path)[1] for k in boundary.keys} == released
    assert all(spec.blocking for spec in boundary.check_specs)
    assert dg.AssetKey(["gov", "quality", "gate_water_usage"]) in boundary.asset_deps[
        dg.AssetKey(asset_keys.desensitized("water_usage"))]
    result = dg.materialize([boundary], resources=_resources(tmp_path), partition_key=str(D1))
    assert result.success
    evals = result.get_asset_check_evaluations()
    assert len(evals) == 2 * len(released) and all(e.passed for e in evals)
    card = duckdb.connect(str(tmp_path / "warehouse" / "ops.duckdb"), read_only=True).execute(
        "SELECT card_id FROM desensitized.bus_card_swipes WHERE _lineage_id = ?",
        [f"bus_card_swipes/{D1}/part-0001#1"]).fetchone()  # swipe S05010 of CARD0 (swipe_id no longer crosses)
    assert card == (_pseudo("CARD0", "bus_card_swipes.card_id"),)  # the key reached the op from the environment
    from zqdata.desensitize import PseudonymKey

    key_ids = {m.materialization.metadata["pseudonym_key_id"].value for m in result.get_asset_materialization_events()}
    assert key_ids == {PseudonymKey.from_secret(SECRET).key_id()}  # which key made these pseudonyms, for rotations
    for f in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert SECRET.encode() not in f.read_bytes(), f
    defs = dg.Definitions.merge(boundary_defs(), dg.Definitions(resources={"warehouse": _resources(tmp_path)["warehouse"]}))
    dg.Definitions.validate_loadable(defs)


def test_boundary_asset_enforces_the_quality_gate_per_dataset(tmp_path, registry, monkeypatch):
    """The crossing evaluates the quality gate itself from the gov findings (enforce, don't trust): the dataset it holds
    back does not cross (materialized with 0 rows and the reason), the others do, and the Art. 2 checks pass."""
    import dagster as dg

    from assets.ops_platform.boundary import build_boundary_crossing
    from zqdata.quality.scores import ensure_quality_tables
    from zqdata.quality.timeliness import write_findings

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", SECRET)
    monkeypatch.delenv("ZQ_QUALITY_MAX_ERROR_RATE", raising=False)
    (tmp_path / "warehouse").mkdir()
    build_gov(tmp_path / "warehouse" / "gov.duckdb", registry, [D1])
    with duckdb.connect(str(tmp_path / "warehouse" / "gov.duckdb")) as gov:
        ensure_quality_tables(gov)
        write_findings(gov, [{"partition_date": D1, "agency": "water", "dataset": "water_usage", "tool": "delivery",
                              "rule": "delivery.record_count_mismatch", "dimension": "completeness", "severity": "error",
                              "delivery_file": f"water/water_usage/{D1}/part-0001.csv", "row_number": None,
                              "lineage_id": None, "field": None, "detail": "清单记录数 5 与实际记录数 3 不一致"}])
    result = dg.materialize([build_boundary_crossing(registry)], resources=_resources(tmp_path), partition_key=str(D1))
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    meta = {asset_keys.parse(m.asset_key.path)[1]: m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert "delivery.record_count_mismatch" in meta["water_usage"]["held_back"].value
    assert meta["water_usage"]["dagster/row_count"].value == 0
    assert meta["bus_card_swipes"]["held_back"].value == "" and meta["bus_card_swipes"]["dagster/row_count"].value == 6
    with duckdb.connect(str(tmp_path / "warehouse" / "ops.duckdb"), read_only=True) as ops:
        # nothing of water reached this ops DB; its tables exist, empty (the products that read them still compile)
        assert ops.execute("SELECT count(*) FROM desensitized.water_usage").fetchone()[0] == 0
        assert ops.execute("SELECT count(*) FROM scenario_sme_credit_profile.water_usage").fetchone()[0] == 0
        assert ops.execute("SELECT count(*) FROM scenario_sme_credit_profile.enterprise_registry").fetchone()[0] == 2
        assert ops.execute("SELECT count(*) FROM scenario_transit_ridership.bus_card_swipes").fetchone()[0] == 6
        assert ops.execute("SELECT dataset FROM boundary.held_back").fetchall() == [("water_usage",)]


def test_product_leak_gate_blocks_a_product_holding_a_raw_id(tmp_path, registry, monkeypatch):
    import dagster as dg
    import duckdb as ddb

    from assets.ops_platform.boundary import product_gate_checks

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", SECRET)
    (tmp_path / "warehouse").mkdir()
    build_gov(tmp_path / "warehouse" / "gov.duckdb", registry, [D1])
    key = dg.AssetKey(["ops", "products", "ops_sme_credit_profile"])
    from orchestration.partitions import daily_partitions

    @dg.asset(key=key, partitions_def=daily_partitions)
    def product() -> None:
        con = ddb.connect(str(tmp_path / "warehouse" / "ops.duckdb"))
        con.execute("CREATE SCHEMA IF NOT EXISTS products; CREATE OR REPLACE TABLE products.ops_sme_credit_profile "
                    "(note VARCHAR, _partition_date DATE)")
        con.execute("INSERT INTO products.ops_sme_credit_profile VALUES (?, ?)", [ID_A, D1])
        con.close()

    @dg.asset(deps=[key], partitions_def=daily_partitions)
    def downstream() -> None:
        """Must not run after a failed blocking check."""

    result = dg.materialize([product, downstream, *product_gate_checks([key])], resources=_resources(tmp_path),
                            partition_key=str(D1), raise_on_error=False)
    by_name = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not by_name["no_personal_data_leak"].passed
    assert by_name["authorization_in_force"].passed
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert key in materialized and dg.AssetKey("downstream") not in materialized


def test_a_partition_larger_than_a_row_group_crosses_whole(dbs, registry):
    gov, ops = dbs
    n = 125_000  # > DuckDB's row group (122 880): the size at which a silent-loss bug in CTAS+INSERT showed
    gov.execute("INSERT INTO intermediate.int_bus_card_swipes SELECT 'B' || i, 'CARD' || (i % 1000), '01', 'R2', 'ST1', "
                "TIMESTAMP '2025-05-01 08:00:00', 2, 'bus/' || i, DATE '2025-05-01' FROM range(?) t(i)", [n])
    report = cross_boundary(gov, ops, registry, D1, _key())
    assert report.released["bus_card_swipes"] == n + 6
    assert ops.execute("SELECT count(*) FROM scenario_transit_ridership.bus_card_swipes").fetchone()[0] == n + 6


# -- pseudonym domains (issue 11, finding 6): one key per (identifier role, ops schema) -----------------------------


def _column(ops: duckdb.DuckDBPyConnection, table: str, column: str, d: dt.date = D1) -> set[str]:
    return {r[0] for r in ops.execute(f"SELECT {column} FROM {table} WHERE _partition_date = ?", [d]).fetchall()}


def _legal_rep_is_resident_a(gov: duckdb.DuckDBPyConnection) -> None:
    """The legal representative of every enterprise is resident ID_A (who authorized a use, so both cross)."""
    gov.execute("UPDATE intermediate.int_enterprise_registry SET legal_rep_id = ?", [ID_A])


def test_a_resident_and_the_same_person_as_legal_rep_get_unlinkable_pseudonyms(dbs, registry):
    """The same raw ID as resident_population.citizen_id and enterprise_registry.legal_rep_id: different pseudonyms,
    so the ops platform cannot join residents to the enterprises they represent (no scenario authorizes it)."""
    gov, ops = dbs
    _legal_rep_is_resident_a(gov)
    cross_boundary(gov, ops, personal_uses(registry), D1, _key())  # scenarios that read both fields
    residents = _column(ops, "desensitized.resident_population", "citizen_id")
    reps = _column(ops, "desensitized.enterprise_registry", "legal_rep_id")
    assert len(residents) == 2 and len(reps) == 1
    assert residents.isdisjoint(reps)
    assert reps == {pseudonymize(ID_A, SECRET, role="enterprise_registry.legal_rep_id", scope="desensitized")}
    assert pseudonymize(ID_A, SECRET, role="resident_population.citizen_id", scope="desensitized") in residents


def test_the_same_card_gets_a_different_pseudonym_in_each_scenario(dbs, registry):
    """Two scenarios authorized on bus_card_swipes.card_id, and desensitized: three unlinkable pseudonyms per card."""
    gov, ops = dbs
    transit = registry.scenarios["transit_ridership"]
    other = transit.model_copy(update={"code": "transit_survey", "product": "ops_transit_survey"})
    reg = registry.model_copy(update={"scenarios": {**registry.scenarios, other.code: other}})
    cross_boundary(gov, ops, reg, D1, _key())
    tables = ["desensitized.bus_card_swipes", "scenario_transit_ridership.bus_card_swipes",
              "scenario_transit_survey.bus_card_swipes"]
    cards = {t: _column(ops, t, "card_id") for t in tables}
    assert all(len(v) == 3 for v in cards.values())
    assert cards[tables[0]].isdisjoint(cards[tables[1]])
    assert cards[tables[0]].isdisjoint(cards[tables[2]])
    assert cards[tables[1]].isdisjoint(cards[tables[2]])
    assert cards[tables[2]] == {pseudonymize(f"CARD{i}", SECRET, role="bus_card_swipes.card_id",
                                             scope="scenario_transit_survey") for i in range(3)}
    # within one scenario the pseudonym stays stable across days (the transit product counts distinct riders)
    cross_boundary(gov, ops, reg, D2, _key())
    assert _column(ops, tables[2], "card_id", D2) == cards[tables[2]]


def test_a_link_role_declared_in_the_registry_links_two_fields_and_only_within_one_schema(tmp_path, monkeypatch):
    """`link_role: person` on citizen_id and legal_rep_id is the registry's explicit decision: equal pseudonyms in
    desensitized, still different from every scenario's."""
    import shutil

    import yaml

    from zqdata.settings import repo_root

    reg_dir = tmp_path / "registry"
    shutil.copytree(repo_root() / "registry", reg_dir)
    for ds_code, name in [("resident_population", "citizen_id"), ("enterprise_registry", "legal_rep_id")]:
        path = reg_dir / "datasets" / f"{ds_code}.yaml"
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        next(f for f in doc["fields"] if f["name"] == name)["link_role"] = "person"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    reg = personal_uses(load_registry(reg_dir))  # scenarios that read both fields
    assert reg.datasets["enterprise_registry"].field("legal_rep_id").link_role == "person"
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    (tmp_path / "warehouse").mkdir()
    build_gov(tmp_path / "warehouse" / "gov.duckdb", reg, [D1])
    with duckdb.connect(str(tmp_path / "warehouse" / "gov.duckdb")) as gov, \
            duckdb.connect(str(tmp_path / "warehouse" / "ops.duckdb")) as ops:
        _legal_rep_is_resident_a(gov)
        cross_boundary(gov, ops, reg, D1, _key())
        reps = _column(ops, "desensitized.enterprise_registry", "legal_rep_id")
        residents = _column(ops, "desensitized.resident_population", "citizen_id")
    linked = pseudonymize(ID_A, SECRET, role="person", scope="desensitized")
    assert reps == {linked} and linked in residents
    assert linked != pseudonymize(ID_A, SECRET, role="person", scope="scenario_sme_credit_profile")


class _RecordingGov:
    """The gov connection, keeping (statement, parameters) of what it is given to execute."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con, self.executed = con, []

    def execute(self, sql, params=None):
        self.executed.append((sql, repr(sorted(params.items())) if isinstance(params, dict) else repr(params)))
        return self._con.execute(sql, params) if params is not None else self._con.execute(sql)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_crossing_evaluates_each_consent_subject_set_once(dbs, registry):
    """The release of each consent dataset and each scenario table filter by the same subjects: the latest consent of
    every subject over all the consent history, ranked. A crossing ranks each distinct set once (it was once per table:
    eight times a day, each growing with history; issue 15), and filters as before: only consenting enterprises."""
    gov, ops = dbs
    rec = _RecordingGov(gov)
    cross_boundary(rec, ops, registry, D2, _key(), pending_consent=(D2, D2))
    ranked = [e for e in rec.executed if "row_number() OVER (PARTITION BY trim(c.subject_id)" in e[0]
              or "WITH known AS" in e[0]]
    assert ranked, "the crossing filters by consent"
    assert len(set(ranked)) == len(ranked)
    sme = registry.scenarios["sme_credit_profile"]
    for ds_code in sme.authorized_fields:
        subjects = {r[0] for r in ops.execute(f"SELECT credit_code FROM scenario_sme_credit_profile.{ds_code}").fetchall()}
        assert subjects == {ENT_A, ENT_B}
