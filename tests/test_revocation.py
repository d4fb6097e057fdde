"""Issue 11 (7, 8, 2): consent revocation and scenario expiry are retroactive, only what a scenario in force uses
crosses (data minimisation), and the crossing's gates run before its COMMIT (write–audit–publish)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from test_boundary import D1, D2, ENT_A, ENT_B, ENT_C, ID_A, ID_B, SECRET, _key, build_gov
from zqdata import asset_keys, publish, revocation
from zqdata.authorization import AccessDenied, deliver_product
from zqdata.boundary import BoundaryGateFailed, check_exclusions, cross_boundary
from zqdata.desensitize import pseudonymize
from zqdata.registry import Registry, load_registry
from zqdata.revocation import apply_purge_to_published
from zqdata.settings import TZ
from zqdata.storage import LocalObjectStore

D3 = dt.date(2025, 5, 3)
PRODUCT = "ops_sme_credit_profile"
GATES = {"no_personal_data_leak": True, "authorization_in_force": True}


@pytest.fixture
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def dbs(tmp_path: Path, registry: Registry, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    gov_path, ops_path = tmp_path / "warehouse" / "gov.duckdb", tmp_path / "warehouse" / "ops.duckdb"
    gov_path.parent.mkdir(parents=True)
    build_gov(gov_path, registry, [D1, D2, D3])
    gov, ops = duckdb.connect(str(gov_path)), duckdb.connect(str(ops_path))
    yield gov, ops
    gov.close()
    ops.close()


@pytest.fixture
def snapshots(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "snapshots")


def with_scenarios(registry: Registry, **changes) -> Registry:
    """The registry with some scenarios changed (``code={field: value}``) or added (``code=Scenario``)."""
    scenarios = dict(registry.scenarios)
    for code, change in changes.items():
        scenarios[code] = change if not isinstance(change, dict) else scenarios[code].model_copy(update=change)
    return registry.model_copy(update={"scenarios": scenarios})


def resident_survey(registry: Registry) -> Registry:
    """A scenario that reads residents (pseudonymized ID, gender, age band) with their consent."""
    sme = registry.scenarios["sme_credit_profile"]
    survey = sme.model_copy(update={"code": "resident_survey", "product": "ops_resident_survey",
                                    "consent_required": "person",
                                    "authorized_fields": {"resident_population": ["citizen_id", "gender", "birth_date"]}})
    return with_scenarios(registry, resident_survey=survey)


def consent(gov, consent_id: str, subject_type: str, subject: str, scenario: str, status: str, day: dt.date) -> None:
    gov.execute("INSERT INTO intermediate.int_subject_consent VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [consent_id, subject_type, subject, scenario, status, dt.datetime.combine(day, dt.time(10, 0)),
                 f"subject_consent/{day}/part-0002#{consent_id}", day])


def build_product(ops, day: dt.date) -> None:
    """A stand-in for the dbt product: one row per consenting enterprise and day, with its input rows' lineage."""
    ops.execute("CREATE SCHEMA IF NOT EXISTS products")
    ops.execute(f"CREATE TABLE IF NOT EXISTS products.{PRODUCT} (credit_code VARCHAR, kwh DOUBLE, "
                "_source_lineage_ids VARCHAR[], _partition_date DATE)")
    ops.execute(f"DELETE FROM products.{PRODUCT} WHERE _partition_date = ?", [day])
    ops.execute(f"""INSERT INTO products.{PRODUCT}
        SELECT e.credit_code, sum(el.kwh), list_concat([e._lineage_id], list(el._lineage_id)), e._partition_date
        FROM scenario_sme_credit_profile.enterprise_registry e
        LEFT JOIN scenario_sme_credit_profile.electricity_usage el
          ON el.credit_code = e.credit_code AND el._partition_date = e._partition_date
        WHERE e._partition_date = ? GROUP BY e.credit_code, e._lineage_id, e._partition_date""", [day])


def night(gov, ops, reg, day, store, publish_product=True):
    """One night: the crossing, the product of the day, its publication; then the purge reaches the snapshots."""
    report = cross_boundary(gov, ops, reg, day, _key(), strict=False)
    apply_purge_to_published(store, reg, report, run_id=f"run-{day}")
    if publish_product and "sme_credit_profile" not in report.blocked:
        build_product(ops, day)
        publish.publish_partition(ops, store, reg, PRODUCT, day, GATES, run_id=f"run-{day}")
    return report


def codes(ops, table: str, day: dt.date | None = None) -> set[str]:
    where, params = ("WHERE _partition_date = ?", [day]) if day else ("", [])
    return {r[0] for r in ops.execute(f"SELECT credit_code FROM {table} {where}", params).fetchall()}


def snapshot_codes(store, day: dt.date) -> set[str] | None:
    snap = publish.current_snapshot(store, PRODUCT, day)
    if snap is None:
        return None
    return {r[0] for r in duckdb.sql(f"SELECT credit_code FROM read_parquet('{store.root / snap.key}')").fetchall()}


# -- (7) revocation is retroactive ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opdb", ["sqlite"], indirect=True)
def test_a_revocation_removes_the_subject_from_every_partition_product_and_snapshot(dbs, registry, snapshots, opdb,
                                                                                    tmp_path):
    gov, ops = dbs
    night(gov, ops, registry, D1, snapshots)
    night(gov, ops, registry, D2, snapshots)
    assert snapshot_codes(snapshots, D1) == snapshot_codes(snapshots, D2) == {ENT_A, ENT_B}
    consent(gov, "C9", "enterprise", ENT_B, "sme_credit_profile", "revoked", D3)

    report = night(gov, ops, registry, D3, snapshots)

    for ds in ("enterprise_registry", "social_insurance", "electricity_usage", "water_usage"):
        assert codes(ops, f"scenario_sme_credit_profile.{ds}") == {ENT_A}, ds
        assert codes(ops, f"desensitized.{ds}") == {ENT_A}, ds  # ENT_B consents to no scenario in force any more
    assert codes(ops, f"products.{PRODUCT}") == {ENT_A}
    assert report.purged["scenario_sme_credit_profile.enterprise_registry"] == 2  # D1 and D2
    assert report.purged[f"products.{PRODUCT}"] == 2
    for day in (D1, D2, D3):
        assert snapshot_codes(snapshots, day) == {ENT_A}
    snap = publish.current_snapshot(snapshots, PRODUCT, D1)
    manifest = json.loads(snapshots.get_bytes(snap.key.rsplit("/", 1)[0] + "/manifest.json"))
    assert manifest["reason"] == "consent revoked" and manifest["removed_rows"] == 1 and manifest["derived_from"]
    assert manifest["gate_results"] == GATES and manifest["run_id"] == f"run-{D3}"

    from test_publish import credential

    receipt = deliver_product(opdb, snapshots, registry, "zq_rural_bank", credential("zq_rural_bank"), PRODUCT, D1,
                              tmp_path / "out", now=dt.datetime(2025, 5, 4, 9, 0, tzinfo=TZ))
    delivered = {r[0] for r in duckdb.sql(f"SELECT credit_code FROM read_parquet('{receipt.path}')").fetchall()}
    assert delivered == {ENT_A} and receipt.row_count == 1

    # a backfill of an earlier day does not bring the subject back
    night(gov, ops, registry, D1, snapshots)
    assert codes(ops, "scenario_sme_credit_profile.enterprise_registry") == {ENT_A}
    assert snapshot_codes(snapshots, D1) == {ENT_A}


def test_a_range_applies_its_days_purges_to_the_snapshots_once(dbs, registry, snapshots):
    """Issue 15: a range run's boundary step follows the purges of all its days with ONE derivation per published
    snapshot (revocation.merge_purges), not one per day; the snapshots end as night-by-night application leaves them."""
    gov, ops = dbs
    night(gov, ops, registry, D1, snapshots)
    published = publish.current_snapshot(snapshots, PRODUCT, D1).key
    reports = []
    for day, subject in ((D2, ENT_B), (D3, ENT_A)):  # each day of the range, a revocation delivered that day
        consent(gov, f"R{day:%d}", "enterprise", subject, "sme_credit_profile", "revoked", day)
        reports.append(cross_boundary(gov, ops, registry, day, _key(), strict=False))
    assert all(D1 in r.product_days.get(PRODUCT, []) for r in reports)  # each day purged a subject of D1's product

    done = apply_purge_to_published(snapshots, registry, revocation.merge_purges(reports), run_id="range")
    assert done == {"withdrawn": [], "republished": [f"{PRODUCT}/{D1}"]}
    assert snapshot_codes(snapshots, D1) == set()  # both subjects gone
    snap = publish.current_snapshot(snapshots, PRODUCT, D1)
    manifest = json.loads(snapshots.get_bytes(snap.key.rsplit("/", 1)[0] + "/manifest.json"))
    assert manifest["derived_from"] == published and manifest["removed_rows"] == 2  # one derivation of the original


def test_a_person_revoking_is_purged_by_pseudonym_from_every_partition(dbs, registry, snapshots):
    gov, ops = dbs
    reg = resident_survey(registry)
    consent(gov, "C20", "person", ID_A, "resident_survey", "granted", D1)
    consent(gov, "C21", "person", ID_B, "resident_survey", "granted", D1)
    for day in (D1, D2):
        cross_boundary(gov, ops, reg, day, _key())
    ids = lambda t: {r[0] for r in ops.execute(f"SELECT citizen_id FROM {t}").fetchall()}  # noqa: E731
    a_survey = pseudonymize(ID_A, SECRET, role="resident_population.citizen_id", scope="scenario_resident_survey")
    assert a_survey in ids("scenario_resident_survey.resident_population")
    assert len(ids("desensitized.resident_population")) == 2
    consent(gov, "C22", "person", ID_A, "resident_survey", "revoked", D3)
    report = cross_boundary(gov, ops, reg, D3, _key())
    assert ids("scenario_resident_survey.resident_population") == {
        pseudonymize(ID_B, SECRET, role="resident_population.citizen_id", scope="scenario_resident_survey")}
    assert ids("desensitized.resident_population") == {
        pseudonymize(ID_B, SECRET, role="resident_population.citizen_id", scope="desensitized")}
    assert report.purged["scenario_resident_survey.resident_population"] == 2
    assert report.purged["desensitized.resident_population"] == 2


@pytest.mark.parametrize("opdb", ["sqlite"], indirect=True)
def test_an_expired_scenario_loses_its_tables_products_and_snapshots_and_delivery_is_refused(dbs, registry, snapshots,
                                                                                          opdb, tmp_path):
    gov, ops = dbs
    reg = with_scenarios(registry, sme_credit_profile={"valid_to": D2})  # in force on D1 and D2 only
    night(gov, ops, reg, D1, snapshots)
    night(gov, ops, reg, D2, snapshots)
    assert snapshot_codes(snapshots, D1) == {ENT_A, ENT_B}

    report = night(gov, ops, reg, D3, snapshots)

    assert "sme_credit_profile" in report.ended
    for ds in ("enterprise_registry", "social_insurance", "electricity_usage", "water_usage"):
        assert ops.execute(f"SELECT count(*) FROM scenario_sme_credit_profile.{ds}").fetchone()[0] == 0
        assert ops.execute(f"SELECT count(*) FROM desensitized.{ds}").fetchone()[0] == 0  # no scenario uses it
    assert ops.execute(f"SELECT count(*) FROM products.{PRODUCT}").fetchone()[0] == 0
    assert snapshot_codes(snapshots, D1) is None and snapshot_codes(snapshots, D2) is None

    from test_publish import credential

    with pytest.raises(AccessDenied):
        deliver_product(opdb, snapshots, reg, "zq_rural_bank", credential("zq_rural_bank"), PRODUCT, D1,
                        tmp_path / "out", now=dt.datetime(2025, 5, 4, 9, 0, tzinfo=TZ))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_a_revoked_scenario_loses_its_tables_and_snapshots(dbs, registry, snapshots):
    gov, ops = dbs
    night(gov, ops, registry, D1, snapshots)
    reg = with_scenarios(registry, sme_credit_profile={"status": "revoked"})
    night(gov, ops, reg, D2, snapshots)
    assert ops.execute("SELECT count(*) FROM scenario_sme_credit_profile.enterprise_registry").fetchone()[0] == 0
    assert snapshot_codes(snapshots, D1) is None


# -- (8) data minimisation --------------------------------------------------------------------------------------------

def _columns(ops, table: str) -> list[str]:
    schema, name = table.split(".")
    return [c for (c,) in ops.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = ? "
                                      "AND table_name = ? ORDER BY ordinal_position", [schema, name]).fetchall()]


def test_a_dataset_no_scenario_in_force_uses_does_not_cross(dbs, registry):
    gov, ops = dbs
    reg = with_scenarios(registry, transit_ridership={"valid_from": D2})  # not yet in force on D1
    report = cross_boundary(gov, ops, reg, D1, _key(), strict=False)
    assert report.released["bus_card_swipes"] == 0
    assert ops.execute("SELECT count(*) FROM desensitized.bus_card_swipes").fetchone()[0] == 0
    assert _columns(ops, "desensitized.bus_card_swipes") == ["_lineage_id", "_partition_date"]
    cross_boundary(gov, ops, reg, D2, _key())  # in force from D2: its fields cross from that day on
    assert ops.execute("SELECT count(*) FROM desensitized.bus_card_swipes").fetchone()[0] == 6
    assert set(_columns(ops, "desensitized.bus_card_swipes")) == {
        *registry.scenarios["transit_ridership"].authorized_fields["bus_card_swipes"], "_lineage_id", "_partition_date"}


def test_residents_do_not_cross_when_no_scenario_in_force_reads_them(dbs, registry):
    gov, ops = dbs
    report = cross_boundary(gov, ops, registry, D1, _key())  # ID_A and ID_B consented, but to scenarios not reading them
    assert report.released["resident_population"] == 0
    assert _columns(ops, "desensitized.resident_population") == ["_lineage_id", "_partition_date"]
    for ds in registry.datasets:
        assert check_exclusions(ops, registry, ds, D1) == []


def test_only_the_fields_and_subjects_of_scenarios_in_force_cross(dbs, registry):
    gov, ops = dbs
    reg = resident_survey(registry)
    consent(gov, "C20", "person", ID_A, "resident_survey", "granted", D1)
    cross_boundary(gov, ops, reg, D1, _key())
    assert _columns(ops, "desensitized.resident_population") == ["citizen_id", "gender", "birth_date",
                                                                   "_lineage_id", "_partition_date"]
    assert ops.execute("SELECT count(*) FROM desensitized.resident_population").fetchone()[0] == 1  # ID_A only
    sme = registry.scenarios["sme_credit_profile"].authorized_fields["enterprise_registry"]
    assert set(_columns(ops, "desensitized.enterprise_registry")) == {*sme, "_lineage_id", "_partition_date"}
    assert codes(ops, "desensitized.enterprise_registry") == {ENT_A, ENT_B}  # ENT_C consented only to transit
    for ds in reg.datasets:
        assert check_exclusions(ops, reg, ds, D1) == []
    # a field no scenario in force uses is an Art. 2 problem, even empty
    ops.execute("ALTER TABLE desensitized.resident_population ADD COLUMN phone VARCHAR")
    assert any("phone" in p for p in check_exclusions(ops, reg, "resident_population", D1))


# -- (2) write–audit–publish for the crossing -----------------------------------------------------------------------

def test_a_leak_rolls_the_crossing_back_and_the_previous_partition_stays(dbs, registry):
    gov, ops = dbs
    cross_boundary(gov, ops, registry, D1, _key())
    before = ops.execute("SELECT * FROM desensitized.bus_card_swipes ORDER BY ALL").fetchall()
    scenario_before = ops.execute("SELECT * FROM scenario_transit_ridership.bus_card_swipes ORDER BY ALL").fetchall()
    gov.execute("UPDATE intermediate.int_bus_card_swipes SET route_id = ? WHERE _partition_date = ?",
                [f"note {ID_B}", D1])
    with pytest.raises(BoundaryGateFailed, match="leak") as info:
        cross_boundary(gov, ops, registry, D1, _key())
    assert info.value.report.gate.leaks and not info.value.report.gate.passed
    assert ops.execute("SELECT * FROM desensitized.bus_card_swipes ORDER BY ALL").fetchall() == before
    assert ops.execute("SELECT * FROM scenario_transit_ridership.bus_card_swipes ORDER BY ALL").fetchall() == scenario_before


def test_the_boundary_op_fails_with_its_failed_checks_and_materializes_nothing(tmp_path, registry, monkeypatch):
    import dagster as dg

    from assets.ops_platform.boundary import build_boundary_crossing
    from test_boundary import _resources

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", SECRET)
    (tmp_path / "warehouse").mkdir()
    gov_path, ops_path = tmp_path / "warehouse" / "gov.duckdb", tmp_path / "warehouse" / "ops.duckdb"
    build_gov(gov_path, registry, [D1])
    boundary = build_boundary_crossing(registry)
    assert dg.materialize([boundary], resources=_resources(tmp_path), partition_key=str(D1)).success
    with duckdb.connect(str(ops_path), read_only=True) as ops:
        before = ops.execute("SELECT * FROM desensitized.bus_card_swipes ORDER BY ALL").fetchall()
    with duckdb.connect(str(gov_path)) as gov:
        gov.execute("UPDATE intermediate.int_bus_card_swipes SET route_id = ?", [f"note {ID_B}"])

    result = dg.materialize([boundary], resources=_resources(tmp_path), partition_key=str(D1), raise_on_error=False)

    assert not result.success
    assert result.get_asset_materialization_events() == []
    failed = {(asset_keys.parse(e.asset_key.path)[1], e.check_name) for e in result.get_asset_check_evaluations() if not e.passed}
    assert ("bus_card_swipes", "no_personal_data_leak") in failed
    with duckdb.connect(str(ops_path), read_only=True) as ops:
        assert ops.execute("SELECT * FROM desensitized.bus_card_swipes ORDER BY ALL").fetchall() == before


def test_the_nightly_purge_looks_only_for_subjects_who_lost_consent(tmp_path):
    """Issue 15: the purge must not cost what the table's history costs every night. With the keep set of the last
    purge recorded, a night with no lost consent deletes nothing outside tonight's partition and a lost consent
    removes that subject from every partition — the same rows the full anti-join removes."""
    import pyarrow as pa

    def table(con):
        con.execute("CREATE SCHEMA IF NOT EXISTS desensitized")
        con.execute("CREATE OR REPLACE TABLE desensitized.people AS SELECT 'L' || range AS _lineage_id, "
                    "DATE '2025-06-01' + (range % 30)::INTEGER AS _partition_date, 'p' || (range % 10) AS subject "
                    "FROM range(300)")

    def keep(*gone):
        return pa.table({"subject": [f"p{i}" for i in range(10) if i not in gone]})

    day = dt.date(2025, 6, 30)
    con, full = duckdb.connect(str(tmp_path / "ops.duckdb")), duckdb.connect(str(tmp_path / "full.duckdb"))
    table(con)
    table(full)
    stats: dict = {}
    assert revocation.purge_subjects(con, "desensitized", "people", "subject", keep(), day, stats).num_rows == 0
    assert stats["mode"] == "full"  # nothing recorded yet: the whole table once
    assert revocation.purge_subjects(con, "desensitized", "people", "subject", keep(), day, stats).num_rows == 0
    assert stats == {"mode": "incremental", "lost_subjects": 0}

    deleted = revocation.purge_subjects(con, "desensitized", "people", "subject", keep(3), day, stats)
    assert stats == {"mode": "incremental", "lost_subjects": 1}
    expected = revocation.purge_subjects(full, "desensitized", "people", "subject", keep(3))  # no day: anti-join
    assert sorted(deleted.column("_lineage_id").to_pylist()) == sorted(expected.column("_lineage_id").to_pylist())
    # from every partition holding p3, none of them tonight's
    assert set(deleted.column("_partition_date").to_pylist()) == {dt.date(2025, 6, d) for d in (4, 14, 24)}
    assert con.execute("SELECT count(*) FROM desensitized.people WHERE subject = 'p3'").fetchone() == (0,)

    # tonight's partition was written under tonight's consent and is checked against the whole keep set
    con.execute("INSERT INTO desensitized.people VALUES ('T1', DATE '2025-06-30', 'p3'), ('T2', DATE '2025-06-30', 'x')")
    deleted = revocation.purge_subjects(con, "desensitized", "people", "subject", keep(3), day, stats)
    assert sorted(deleted.column("_lineage_id").to_pylist()) == ["T1", "T2"] and stats["lost_subjects"] == 0
    assert con.execute("SELECT subject FROM revocation.kept_subjects ORDER BY 1").fetchall() == [
        (f"p{i}",) for i in range(10) if i != 3]

    # a night that wrote the table without a purge by subject: the next purge looks at the whole table again
    revocation.forget_kept(con, "desensitized", "people")
    con.execute("INSERT INTO desensitized.people VALUES ('O1', DATE '2025-06-02', 'y')")
    deleted = revocation.purge_subjects(con, "desensitized", "people", "subject", keep(3), day, stats)
    assert deleted.column("_lineage_id").to_pylist() == ["O1"] and stats["mode"] == "full"


def test_a_crossing_with_an_older_consent_state_keeps_the_newer_one(tmp_path):
    """Concurrent days (lakes) or a range re-run: a crossing whose reference day is older than the state already
    applied must not purge with its older keep set (it would delete later grantees from later partitions); its own
    partition is checked against the newer state. Found by the distributed equality test."""
    import pyarrow as pa

    con = duckdb.connect(str(tmp_path / "ops.duckdb"))
    con.execute("CREATE SCHEMA desensitized")
    con.execute("CREATE TABLE desensitized.people (_lineage_id VARCHAR, _partition_date DATE, subject VARCHAR)")
    con.execute("INSERT INTO desensitized.people VALUES ('A3', DATE '2025-06-03', 'a'), ('N3', DATE '2025-06-03', 'n')")
    d1, d3 = dt.date(2025, 6, 1), dt.date(2025, 6, 3)
    stats: dict = {}
    # day 3 crossed first with the consent of day 3: n granted on day 2
    revocation.purge_subjects(con, "desensitized", "people", "subject", pa.table({"subject": ["a", "n"]}), d3, stats,
                              reference_day=d3)
    # day 1 crosses after it, with consent as of day 1 (n not yet granted; r granted then, revoked by day 3)
    con.execute("INSERT INTO desensitized.people VALUES ('A1', DATE '2025-06-01', 'a'), ('R1', DATE '2025-06-01', 'r')")
    deleted = revocation.purge_subjects(con, "desensitized", "people", "subject", pa.table({"subject": ["a", "r"]}), d1,
                                        stats, reference_day=d1)
    assert stats["mode"] == "newer state kept"
    assert deleted.column("_lineage_id").to_pylist() == ["R1"]  # r revoked by day 3: not kept in day 1 either
    assert sorted(r[0] for r in con.execute("SELECT _lineage_id FROM desensitized.people").fetchall()) == [
        "A1", "A3", "N3"]  # n's day-3 row stays: the older state does not take a later grant back


def _scenario_state(ops) -> dict[str, set[tuple[str, str]]]:
    tables = [f"{s}.{t}" for s, t in ops.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN "
        "('desensitized', 'scenario_sme_credit_profile') AND table_name <> 'subject_consent'").fetchall()]
    state = {}
    for t in sorted(tables):
        cols = {c[0] for c in ops.execute(f"DESCRIBE {t}").fetchall()}
        if "credit_code" in cols:
            state[t] = {(r[0], str(r[1])) for r in ops.execute(f"SELECT credit_code, _partition_date FROM {t}").fetchall()}
    return state


@pytest.mark.parametrize("order", [(D1, D2, D3), (D3, D1, D2), (D2, D3, D1)])
def test_a_subject_revoked_then_granted_again_keeps_no_rows_of_the_days_between_in_any_order(tmp_path, registry,
                                                                                          monkeypatch, order):
    """ENT_B granted on day 1, revoked on day 2, granted again on day 3. Night by night, day 2's crossing purges its
    rows of days 1–2 and day 3 crosses it again: rows of day 3 only. Days crossed in another order (concurrent days on
    the lakes, where every day's consent is already on gov) must end the same: a day's rows cross only for subjects
    whose consent held at the end of EVERY day from theirs to the reference day, not only at both ends (found by the
    distributed equality test)."""
    later = {D2: ("C8", "revoked"), D3: ("C9", "granted")}

    def run(sub: str, days, nightly: bool) -> dict:
        monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / sub))
        gov_path, ops_path = tmp_path / sub / "gov.duckdb", tmp_path / sub / "ops.duckdb"
        gov_path.parent.mkdir(parents=True)
        build_gov(gov_path, registry, [D1, D2, D3])
        gov, ops = duckdb.connect(str(gov_path)), duckdb.connect(str(ops_path))
        for day in days:
            # night by night each day's consent arrives with it; otherwise every day's is on gov before any crossing
            for d, (cid, status) in later.items():
                if (d == day) if nightly else (day == days[0]):
                    consent(gov, cid, "enterprise", ENT_B, "sme_credit_profile", status, d)
            cross_boundary(gov, ops, registry, day, _key(), strict=False)
        state = _scenario_state(ops)
        gov.close()
        ops.close()
        return state

    sequential = run("nightly", (D1, D2, D3), nightly=True)
    expected_b = {(ENT_B, str(D3))}
    assert {r for r in sequential["scenario_sme_credit_profile.enterprise_registry"] if r[0] == ENT_B} == expected_b
    assert run("concurrent", order, nightly=False) == sequential


def test_a_range_crossed_again_keeps_a_subject_revoked_between_out_of_its_earlier_days(tmp_path, registry,
                                                                                       monkeypatch):
    """ENT_B granted on day 1, revoked on day 2, granted again on day 3, every day's consent on gov. A range run
    crosses its days in order, each leaving the later days' consent pending (as the nights would have): ENT_B ends
    with rows of day 3 only. The same range crossed again (a second `make history`, a re-run backfill) must end the
    same: the ops platform already applied day 3's consent, so nothing of it is pending any more, and ENT_B's day-1
    rows must not come back (found in review: they did, and reached the published snapshot)."""
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    gov_path, ops_path = tmp_path / "gov.duckdb", tmp_path / "ops.duckdb"
    build_gov(gov_path, registry, [D1, D2, D3])
    gov, ops = duckdb.connect(str(gov_path)), duckdb.connect(str(ops_path))
    consent(gov, "C8", "enterprise", ENT_B, "sme_credit_profile", "revoked", D2)
    consent(gov, "C9", "enterprise", ENT_B, "sme_credit_profile", "granted", D3)
    states = []
    for _ in range(2):
        for day in (D1, D2, D3):
            cross_boundary(gov, ops, registry, day, _key(), strict=False,
                           pending_consent=None if day == D3 else (day + dt.timedelta(days=1), D3))
        states.append(_scenario_state(ops))
    gov.close()
    ops.close()
    first, again = states
    assert {r for r in first["scenario_sme_credit_profile.enterprise_registry"] if r[0] == ENT_B} == {(ENT_B, str(D3))}
    assert again == first


def test_a_purge_whose_snapshot_update_failed_is_applied_by_the_next_boundary_step(dbs, registry, snapshots, opdb,
                                                                                    monkeypatch):
    """The crossing commits ENT_B's revocation on ops; the snapshot store then fails. The purge stays owed in the
    operational DB and the next step applies it (found in review: nothing recorded it, later crossings did not
    report ENT_B again, and `zq deliver` kept handing ENT_B's row out of D1's snapshot)."""
    gov, ops = dbs
    night(gov, ops, registry, D1, snapshots)
    night(gov, ops, registry, D2, snapshots)
    consent(gov, "C9", "enterprise", ENT_B, "sme_credit_profile", "revoked", D3)
    report = cross_boundary(gov, ops, registry, D3, _key(), strict=False)
    assert revocation.owe_purge(report, "run-d3", opdb) is not None

    real_put = type(snapshots).put_bytes

    def unavailable(self, key, data):
        raise OSError("object store unavailable")

    monkeypatch.setattr(type(snapshots), "put_bytes", unavailable)
    with pytest.raises(OSError):
        revocation.settle_owed_purges(snapshots, registry, "run-d3", opdb)
    assert snapshot_codes(snapshots, D1) == {ENT_A, ENT_B}  # still published: the purge is owed
    monkeypatch.setattr(type(snapshots), "put_bytes", real_put)

    again = cross_boundary(gov, ops, registry, D3, _key(), strict=False)  # the day re-run: nothing new to purge
    assert again.product_days == {} and revocation.owe_purge(again, "run-d3b", opdb) is None
    merged, done = revocation.settle_owed_purges(snapshots, registry, "run-d3b", opdb)
    assert merged is not None and f"{PRODUCT}/{D1}" in done["republished"]
    for day in (D1, D2):
        assert snapshot_codes(snapshots, day) == {ENT_A}
    assert revocation.settle_owed_purges(snapshots, registry, "run-d4", opdb) == (
        None, {"withdrawn": [], "republished": []})  # settled: nothing owed any more


def test_the_boundary_steps_follow_up_applies_what_is_owed(dbs, registry, opdb, monkeypatch):
    """`follow_purges` (the boundary step's last act, also after a failed day) applies every owed purge from the
    operational DB, its own crossings' and an earlier step's alike."""
    import logging
    from types import SimpleNamespace

    from assets.ops_platform.boundary import follow_purges
    from zqdata.publish import published_store

    monkeypatch.setenv("ZQ_OPDB_URL", str(opdb.url.render_as_string(hide_password=False)))
    store = published_store()
    gov, ops = dbs
    night(gov, ops, registry, D1, store)
    consent(gov, "C9", "enterprise", ENT_B, "sme_credit_profile", "revoked", D2)
    revocation.owe_purge(cross_boundary(gov, ops, registry, D2, _key(), strict=False), "earlier-step", opdb)
    assert snapshot_codes(store, D1) == {ENT_A, ENT_B}
    follow_purges(SimpleNamespace(run=SimpleNamespace(run_id="next-step"), log=logging.getLogger("test")), registry)
    assert snapshot_codes(store, D1) == {ENT_A}
    assert revocation.settle_owed_purges(store, registry, "later", opdb)[0] is None
