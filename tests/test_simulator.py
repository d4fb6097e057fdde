"""The source-agency simulator: determinism, volumes, cross-source consistency, defect injection and ground truth."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from zqdata import standards
from zqdata.landing import read_manifest
from zqdata.registry import Registry, load_registry
from zqdata.settings import TZ
from zqdata.simulator import (
    DEFECT_KINDS,
    ROW_DEFECT_KINDS,
    ground_truth_path,
    read_ground_truth,
    rows_by_dataset,
    simulate_day,
)
from zqdata.storage import LocalObjectStore, ObjectStore

DAY = dt.date(2025, 5, 1)
ROWS = 1500


@pytest.fixture()
def registry() -> Registry:
    return load_registry()


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def _store(root: Path) -> LocalObjectStore:
    return LocalObjectStore(root)


def _all_bytes(store: ObjectStore) -> dict[str, bytes]:
    return {o.key: store.get_bytes(o.key) for o in store.list("")}


def _records(store: ObjectStore, registry: Registry, dataset: str, day: dt.date = DAY) -> dict[str, list[dict]]:
    """Each data file's records (values as delivered), keyed by landing key."""
    ds = registry.datasets[dataset]
    manifest = read_manifest(store, ds.agency, dataset, day)
    assert manifest is not None, dataset
    out: dict[str, list[dict]] = {}
    for f in manifest.files:
        key = f"{ds.agency}/{dataset}/{day.isoformat()}/{f.name}"
        data = store.get_bytes(key)
        if f.format == "csv":
            out[key] = list(csv.DictReader(io.StringIO(data.decode(f.encoding))))
        elif f.format == "jsonl":
            out[key] = [json.loads(line) for line in data.decode(f.encoding).splitlines()]
        else:
            with store.local_copy(key) as path:
                out[key] = pq.read_table(path).to_pylist()
    return out


def _rows(store: ObjectStore, registry: Registry, dataset: str) -> list[dict]:
    return [r for recs in _records(store, registry, dataset).values() for r in recs]


def test_same_seed_and_day_give_identical_bytes_and_another_day_differs(env: Path, registry: Registry) -> None:
    a, b, c = _store(env / "a"), _store(env / "b"), _store(env / "c")
    truth_a = simulate_day(a, registry, DAY, ROWS, seed=7, defect_rate=0.03)
    truth_b = simulate_day(b, registry, DAY, ROWS, seed=7, defect_rate=0.03)
    simulate_day(c, registry, DAY + dt.timedelta(days=1), ROWS, seed=7, defect_rate=0.03)
    files_a, files_b = _all_bytes(a), _all_bytes(b)
    assert files_a == files_b and truth_a == truth_b
    files_c = {k.replace((DAY + dt.timedelta(days=1)).isoformat(), DAY.isoformat()): v for k, v in _all_bytes(c).items()}
    assert files_c.keys() == files_a.keys()
    assert all(files_c[k] != files_a[k] for k in files_a)


def test_rows_per_dataset_follow_the_registered_volume_shares(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    simulate_day(store, registry, DAY, ROWS, seed=1)
    expected = rows_by_dataset(registry, ROWS)
    assert sum(expected.values()) == ROWS
    for code, ds in registry.datasets.items():
        assert abs(expected[code] - ROWS * ds.delivery.volume_share) <= 1
        manifest = read_manifest(store, ds.agency, code, DAY)
        assert manifest is not None and sum(f.record_count for f in manifest.files) == expected[code]
        assert {f.format for f in manifest.files} == {ds.delivery.format}
        assert {f.encoding for f in manifest.files} == {ds.delivery.encoding}
        assert len(_rows(store, registry, code)) == expected[code]
    assert expected["bus_card_swipes"] == max(expected.values())


def test_clean_day_is_valid_and_consistent_across_sources(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    assert simulate_day(store, registry, DAY, ROWS, seed=3, defect_rate=0.0) == []
    assert ground_truth_path(DAY).read_text(encoding="utf-8") == ""
    districts = standards.zhaoqing_districts(registry)
    start = dt.datetime.combine(DAY, dt.time(), tzinfo=TZ)
    for code, ds in registry.datasets.items():
        rows = _rows(store, registry, code)
        assert len({tuple(r[k] for k in ds.primary_key) for r in rows}) == len(rows), f"{code}: duplicate key"
        for r in rows:
            assert list(r) == ds.field_names
            for f in ds.fields:
                v = r[f.name]
                assert v or not f.required, (code, f.name)
                if not v:
                    continue
                check = {"citizen_id": standards.is_valid_citizen_id, "uscc": standards.is_valid_uscc,
                         "mobile": standards.is_valid_mobile, "district_code": lambda x: x in districts}.get(f.format or "")
                assert check is None or check(v), (code, f.name, v)
                if f.code_table:
                    assert v in registry.code_tables[f.code_table], (code, f.name, v)
                if f.range:
                    assert f.range.min <= float(v) <= f.range.max, (code, f.name, v)
                if f.type == "date":
                    assert dt.date.fromisoformat(v).isoformat() == v
                if f.type == "timestamp":
                    assert v.endswith("+08:00") and "T" in v
            event = r[ds.event_time_field]
            t = dt.datetime.fromisoformat(event) if "T" in event else dt.datetime.combine(
                dt.date.fromisoformat(event), dt.time(), tzinfo=TZ)
            assert start <= t < start + dt.timedelta(days=1), (code, event)
        manifest = read_manifest(store, ds.agency, code, DAY)
        assert manifest is not None and manifest.delivered_at is not None
        assert start + dt.timedelta(days=1) <= manifest.delivered_at <= start + dt.timedelta(
            days=1, hours=ds.delivery.sla_hours)

    enterprises = {r["credit_code"]: r["district_code"] for r in _rows(store, registry, "enterprise_registry")}
    for code in ("social_insurance", "electricity_usage", "water_usage"):
        for r in _rows(store, registry, code):
            assert enterprises.get(r["credit_code"]) == r["district_code"], (code, r)
    for r in _rows(store, registry, "subject_consent"):
        assert r["scenario_code"] in registry.scenarios
        if r["subject_type"] == "enterprise":
            assert r["subject_id"] in enterprises
        else:
            assert standards.is_valid_citizen_id(r["subject_id"])
    # the person's ID, gender and birth date agree
    for r in _rows(store, registry, "resident_population"):
        assert r["birth_date"].replace("-", "") == r["citizen_id"][6:14]
        assert r["gender"] == ("1" if int(r["citizen_id"][16]) % 2 else "2")


def test_universe_is_stable_across_days(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    simulate_day(store, registry, DAY, ROWS, seed=5)
    simulate_day(store, registry, DAY + dt.timedelta(days=1), ROWS, seed=5)
    day1 = {r["credit_code"]: r["ent_name"] for r in _rows(store, registry, "enterprise_registry")}
    recs = _records(store, registry, "enterprise_registry", DAY + dt.timedelta(days=1))
    day2 = {r["credit_code"]: r["ent_name"] for rows in recs.values() for r in rows}
    assert day1 == day2


def test_ground_truth_lists_exactly_the_changed_rows(env: Path, registry: Registry) -> None:
    clean, dirty = _store(env / "clean"), _store(env / "dirty")
    simulate_day(clean, registry, DAY, ROWS, seed=9, defect_rate=0.0)
    truth = simulate_day(dirty, registry, DAY, ROWS, seed=9, defect_rate=0.05)
    assert truth == read_ground_truth(DAY)
    assert all(t.row is not None and t.file for t in truth)
    assert len({(t.file, t.row) for t in truth}) == len(truth), "a row carries at most one defect"
    assert {t.kind for t in truth} >= {"duplicate_primary_key", "required_empty", "event_time_outside_day"}
    for t in truth:
        assert DEFECT_KINDS[t.kind].dimension == t.dimension
    # Datasets that refer to no enterprise are identical to the clean run except on the ground-truth rows.
    for code in ("enterprise_registry", "bus_card_swipes", "resident_population"):
        a, b = _records(clean, registry, code), _records(dirty, registry, code)
        changed = {(k, i + 1) for k in a for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y}
        listed = {(t.file, t.row) for t in truth if t.dataset == code}
        assert changed == listed, code
        assert round(0.05 * sum(len(v) for v in a.values())) == len(listed)


def test_injected_defects_break_the_rule_they_name(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    kinds = ["citizen_id_check_char", "citizen_id_birth_date", "uscc_check_char", "invalid_mobile",
             "district_not_zhaoqing", "credit_code_not_in_registry", "code_outside_table", "out_of_range"]
    truth = simulate_day(store, registry, DAY, 4000, seed=11, defect_rate=0.3, defect_kinds=kinds)
    assert {t.kind for t in truth} == set(kinds)
    files: dict[str, list[dict]] = {}
    for code in registry.datasets:
        files.update(_records(store, registry, code))
    enterprises = {r["credit_code"] for r in _rows(store, registry, "enterprise_registry")}
    districts = standards.zhaoqing_districts(registry)
    for t in truth:
        v = files[t.file][t.row - 1][t.field]
        f = registry.datasets[t.dataset].field(t.field)
        broken = {
            "citizen_id_check_char": lambda: not standards.is_valid_citizen_id(v) and standards.citizen_id_birth_date(v),
            "citizen_id_birth_date": lambda: not standards.is_valid_citizen_id(v)
            and standards.citizen_id_check_char(v[:17]) == v[17],
            "uscc_check_char": lambda: not standards.is_valid_uscc(v),
            "invalid_mobile": lambda: not standards.is_valid_mobile(v),
            "district_not_zhaoqing": lambda: v not in districts,
            "credit_code_not_in_registry": lambda: standards.is_valid_uscc(v) and v not in enterprises,
            "code_outside_table": lambda: v not in registry.code_tables[f.code_table],
            "out_of_range": lambda: not (f.range.min <= float(v) <= f.range.max),
        }[t.kind]()
        assert broken, (t, v)


def test_consistency_holds_outside_the_ground_truth_when_defects_are_injected(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    truth = simulate_day(store, registry, DAY, 4000, seed=13, defect_rate=0.05)
    flagged = {(t.file, t.row) for t in truth}
    registry_rows = _records(store, registry, "enterprise_registry")
    enterprises = {r["credit_code"]: r["district_code"] for k, rows in registry_rows.items()
                   for i, r in enumerate(rows) if (k, i + 1) not in flagged}
    for code in ("social_insurance", "electricity_usage", "water_usage"):
        for key, rows in _records(store, registry, code).items():
            for i, r in enumerate(rows):
                if (key, i + 1) not in flagged:
                    assert enterprises.get(r["credit_code"]) == r["district_code"], (code, i + 1, r)


def test_delivery_level_defects_only_when_asked(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    simulate_day(store, registry, DAY, ROWS, seed=2)  # a first, complete delivery that the next run must replace
    truth = simulate_day(
        store, registry, DAY, ROWS, seed=2, defect_rate=0.02,
        defect_kinds=["late_delivery:water_usage", "missing_delivery:subject_consent", "extra_column:social_insurance",
                      "manifest_count_mismatch:electricity_usage", "required_empty"],
    )
    by_kind = {t.kind: t for t in truth if t.row is None}
    assert set(by_kind) == {"late_delivery", "missing_delivery", "extra_column", "manifest_count_mismatch"}
    assert {t.kind for t in truth if t.row is not None} == {"required_empty"}
    assert not any(t.dataset in ("subject_consent", "social_insurance") and t.row for t in truth)

    water = registry.datasets["water_usage"]
    m = read_manifest(store, water.agency, "water_usage", DAY)
    day_end = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), tzinfo=TZ)
    assert m is not None and m.delivered_at > day_end + dt.timedelta(hours=water.delivery.sla_hours)
    assert store.list(f"{registry.datasets['subject_consent'].agency}/subject_consent/{DAY}/") == []
    si = _records(store, registry, "social_insurance")
    assert all("remark" in rows[0] for rows in si.values())
    elec = registry.datasets["electricity_usage"]
    m = read_manifest(store, elec.agency, "electricity_usage", DAY)
    actual = {k.rsplit("/", 1)[1]: len(v) for k, v in _records(store, registry, "electricity_usage").items()}
    assert m is not None and any(f.record_count != actual[f.name] for f in m.files)


def test_default_kinds_are_row_level_only_and_unknown_kinds_are_rejected(env: Path, registry: Registry) -> None:
    truth = simulate_day(_store(env / "l"), registry, DAY, ROWS, seed=4, defect_rate=0.05)
    assert {t.kind for t in truth} <= set(ROW_DEFECT_KINDS)
    assert Counter(t.row is None for t in truth)[True] == 0
    with pytest.raises(ValueError, match="unknown defect kind"):
        simulate_day(_store(env / "m"), registry, DAY, ROWS, seed=4, defect_kinds=["typo"])


def test_landing_assets_simulate_the_partition_or_only_observe(env: Path, registry: Registry,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from assets.source_systems.landing import build_landing_assets, landing_key
    from orchestration.resources import ObjectStoreResource

    monkeypatch.setenv("ZQ_SIM_ROWS_PER_DAY", "500")
    monkeypatch.setenv("ZQ_SIM_DEFECT_RATE", "0")
    landing = build_landing_assets(registry)
    assert {k for k in landing.keys} == {landing_key(c) for c in registry.datasets}
    resources = {"store": ObjectStoreResource(local_root=str(env / "landing"))}

    def run(simulate: bool, day: str) -> dict:
        result = dg.materialize(
            [landing], resources=resources, partition_key=day,
            run_config={"ops": {"source_agency_deliveries": {"config": {"simulate": simulate}}}},
        )
        assert result.success
        mats = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
        return {m.asset_key: m.metadata for m in mats}

    meta = run(True, "2025-05-01")
    expected = rows_by_dataset(registry, 500)
    for code in registry.datasets:
        m = meta[landing_key(code)]
        assert m["records"].value == expected[code] and m["manifest_present"].value is True
    observed = run(False, "2025-05-02")  # nothing delivered that day: observed, not written
    assert all(m["manifest_present"].value is False and m["records"].value == 0 for m in observed.values())
    assert _store(env / "landing").list("samr/enterprise_registry/2025-05-02/") == []


CROSS_FIELD_KINDS = ["id_birth_date_mismatch", "id_sex_mismatch", "district_wrong_level", "implausible_meter_reading"]


def test_cross_field_kinds_are_default_row_kinds_with_ground_truth(env: Path, registry: Registry) -> None:
    """Issue 12: the national standards' cross-field rules and the history plausibility have defect kinds of their
    own, injected at the default rate with the others (defect_kinds=None)."""
    assert set(CROSS_FIELD_KINDS) <= set(ROW_DEFECT_KINDS)
    assert {k: DEFECT_KINDS[k].dimension for k in CROSS_FIELD_KINDS} == {
        "id_birth_date_mismatch": "consistency", "id_sex_mismatch": "consistency",
        "district_wrong_level": "accuracy", "implausible_meter_reading": "accuracy"}
    truth = simulate_day(_store(env / "l"), registry, DAY, 20000, seed=21, defect_rate=0.05)
    assert {t.kind for t in truth} >= set(CROSS_FIELD_KINDS)
    assert all(t.row is not None and t.file for t in truth if t.kind in CROSS_FIELD_KINDS)


def test_cross_field_defects_break_the_rule_they_name(env: Path, registry: Registry) -> None:
    clean, dirty = _store(env / "clean"), _store(env / "dirty")
    simulate_day(clean, registry, DAY, 4000, seed=11, defect_rate=0.0)
    truth = simulate_day(dirty, registry, DAY, 4000, seed=11, defect_rate=0.3, defect_kinds=CROSS_FIELD_KINDS)
    assert {t.kind for t in truth} == set(CROSS_FIELD_KINDS)
    before: dict[str, list[dict]] = {}
    after: dict[str, list[dict]] = {}
    for code in registry.datasets:
        before.update(_records(clean, registry, code))
        after.update(_records(dirty, registry, code))
    table = standards.zhaoqing_districts(registry)
    for t in truth:
        row, was = after[t.file][t.row - 1], before[t.file][t.row - 1]
        v = row[t.field]
        if t.dataset in ("enterprise_registry", "resident_population"):  # referring to no enterprise: same row
            assert {k for k in row if row[k] != was[k]} == {t.field}, t  # only the named field changed
        if t.kind == "id_birth_date_mismatch":  # a real date, not the one the (valid) ID encodes
            assert standards.is_valid_citizen_id(row["citizen_id"], DAY)
            assert dt.date.fromisoformat(v) != standards.citizen_id_birth_date(row["citizen_id"]), t
        elif t.kind == "id_sex_mismatch":  # a valid code of the table, not the one the ID's 17th digit encodes
            assert v in registry.code_tables["gender"] and v != standards.citizen_id_sex(row["citizen_id"]), t
        elif t.kind == "district_wrong_level":  # a Zhaoqing code, but not county level
            assert v in table and not standards.is_county_level_district(v), t
        else:  # implausible_meter_reading: the same meter's value ×100, still a well-formed number
            assert float(v) == pytest.approx(100 * float(was[t.field]), rel=1e-6), t


def test_implausible_reading_applies_where_the_suites_check_history(registry: Registry) -> None:
    """The simulator's choice of fields for the ×100 defect and the GX plausibility expectation agree."""
    from expectations.suites import history_plausibility
    from zqdata.simulator import applicable_fields

    for ds in registry.datasets.values():
        assert applicable_fields("implausible_meter_reading", ds) == history_plausibility(ds)[1], ds.code
    assert applicable_fields("implausible_meter_reading", registry.datasets["electricity_usage"]) == ["kwh"]
