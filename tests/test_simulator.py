"""The source-agency simulator: determinism, volumes, cross-source consistency, defect injection and ground truth."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zqdata import standards
from zqdata.landing import (
    delivery_prefix,
    future_delivery_days,
    manifest_key,
    read_manifest,
    sha256_hex,
    try_read_manifest,
)
from zqdata.registry import Registry, load_registry
from zqdata.settings import TZ
from zqdata.simulator import (
    BOM,
    DEFECT_KINDS,
    DELIVERY_DEFECT_KINDS,
    ROW_DEFECT_KINDS,
    UNDECODABLE_RECORDS,
    UNDECODABLE_SEQUENCES,
    applicable_fields,
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


# ---------------------------------------------------------------- hostile deliveries (issue 12)

HOSTILE_KINDS = {"gbk_with_bom": "standardization", "undecodable_bytes": "standardization",
                 "malformed_manifest": "understandability", "future_folder": "timeliness",
                 "emptying_redelivery": "completeness"}


def _file_bytes(store: ObjectStore, registry: Registry, dataset: str, day: dt.date = DAY) -> dict[str, bytes]:
    ds = registry.datasets[dataset]
    return {o.key: store.get_bytes(o.key) for o in store.list(f"{ds.agency}/{dataset}/{day.isoformat()}/")
            if not o.key.endswith("/_manifest.json")}


def test_hostile_delivery_kinds_are_delivery_level_with_their_dimension(env: Path, registry: Registry) -> None:
    assert {k: DEFECT_KINDS[k].dimension for k in HOSTILE_KINDS} == HOSTILE_KINDS
    assert set(HOSTILE_KINDS) <= set(DELIVERY_DEFECT_KINDS) and not set(HOSTILE_KINDS) & set(ROW_DEFECT_KINDS)
    assert DEFECT_KINDS["gbk_with_bom"].found_by == "accepted"
    # never by default, and deterministic when named
    stores = [_store(env / "a"), _store(env / "b")]
    kinds = ["required_empty", "gbk_with_bom", "undecodable_bytes", "malformed_manifest", "future_folder"]
    truths = [simulate_day(s, registry, DAY, ROWS, seed=6, defect_rate=0.02, defect_kinds=kinds) for s in stores]
    assert truths[0] == truths[1] and _all_bytes(stores[0]) == _all_bytes(stores[1])
    assert {t.kind for t in truths[0]} == set(kinds)
    # a kind without a dataset goes to one the kind fits: a CSV for the BOM
    (bom,) = [t for t in truths[0] if t.kind == "gbk_with_bom"]
    assert registry.datasets[bom.dataset].delivery.format == "csv"


def test_gbk_with_bom_is_the_delivery_as_gbk_behind_a_utf8_signature(env: Path, registry: Registry) -> None:
    plain, dirty = _store(env / "plain"), _store(env / "dirty")
    simulate_day(plain, registry, DAY, ROWS, seed=8, defect_rate=0.0)  # the records as generated
    truth = simulate_day(dirty, registry, DAY, ROWS, seed=8, defect_rate=0.05,
                         defect_kinds=[*ROW_DEFECT_KINDS, "gbk_with_bom:enterprise_registry"])
    ds = registry.datasets["enterprise_registry"]
    assert not [t for t in truth if t.dataset == ds.code and t.kind != "gbk_with_bom"]  # no row defects there
    manifest = read_manifest(dirty, ds.agency, ds.code, DAY)
    assert manifest is not None
    files = _file_bytes(dirty, registry, ds.code)
    assert [(t.file, t.row, t.field, t.dimension) for t in truth if t.kind == "gbk_with_bom"] == [
        (k, None, None, "standardization") for k in files]
    expected = _rows(plain, registry, ds.code)
    got = []
    for f in manifest.files:
        data = files[f"{ds.agency}/{ds.code}/{DAY}/{f.name}"]
        assert f.encoding == "gbk" and data.startswith(BOM) and sha256_hex(data) == f.sha256
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8-sig")  # the content after the BOM really is GBK (the names are Chinese)
        got += list(csv.DictReader(io.StringIO(data[len(BOM):].decode("gbk"))))
        assert f.record_count == len(got)
    assert got == expected  # every record as generated: nothing to quarantine


# CSV in UTF-8 and in GBK, JSON Lines, Parquet
@pytest.mark.parametrize("dataset", ["enterprise_registry", "social_insurance", "resident_population",
                                     "bus_card_swipes"])
def test_undecodable_bytes_sit_inside_one_value_of_the_records_the_ground_truth_names(
        env: Path, registry: Registry, dataset: str) -> None:
    clean, dirty = _store(env / "clean"), _store(env / "dirty")
    simulate_day(clean, registry, DAY, ROWS, seed=10, defect_rate=0.03)
    truth = simulate_day(dirty, registry, DAY, ROWS, seed=10, defect_rate=0.03,
                         defect_kinds=[*ROW_DEFECT_KINDS, f"undecodable_bytes:{dataset}"])
    bad = [t for t in truth if t.kind == "undecodable_bytes"]
    assert len(bad) == UNDECODABLE_RECORDS and {t.dataset for t in bad} == {dataset}
    fields = applicable_fields("undecodable_bytes", registry.datasets[dataset])
    assert all(t.dimension == "standardization" and t.row and t.field in fields for t in bad)
    assert len({(t.file, t.row) for t in truth}) == len(truth), "a row carries at most one defect"
    ds = registry.datasets[dataset]
    before, after = _file_bytes(clean, registry, dataset), _file_bytes(dirty, registry, dataset)
    assert before.keys() == after.keys()
    fmt, enc = ds.delivery.format, ds.delivery.encoding

    def values(data: bytes, field: str) -> list[bytes]:
        """The field's raw bytes per record (surrogateescape keeps the invalid bytes as they are)."""
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data)).column(field).cast(pa.binary()).to_pylist()
        text = data.decode(enc, "surrogateescape")
        recs = csv.DictReader(io.StringIO(text)) if fmt == "csv" else (json.loads(x) for x in text.splitlines())
        return [r[field].encode(enc, "surrogateescape") for r in recs]

    for key in after:
        mine = [t for t in bad if t.file == key]
        for fname in ds.field_names:
            old, new = values(before[key], fname), values(after[key], fname)
            changed = {i + 1 for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b}
            named = {t.row for t in mine if t.field == fname}
            assert named <= changed, (key, fname)
            for row in named:  # the value as generated with one invalid sequence inserted, undecodable as delivered
                value, was = new[row - 1], old[row - 1]
                assert any(value == was[:i] + seq + was[i:] for seq in UNDECODABLE_SEQUENCES
                           for i in range(len(was) + 1)), (row, value, was)
                with pytest.raises(UnicodeDecodeError):
                    value.decode("utf-8" if fmt != "csv" else enc)
    # the file as a whole keeps its sha256 and record count in the manifest
    manifest = read_manifest(dirty, ds.agency, dataset, DAY)
    assert manifest is not None
    for f in manifest.files:
        assert sha256_hex(after[f"{ds.agency}/{dataset}/{DAY}/{f.name}"]) == f.sha256


def test_malformed_manifest_is_unreadable_and_the_data_files_intact(env: Path, registry: Registry) -> None:
    variants = set()
    for seed in range(8):  # both ways of breaking it: cut off mid-write, a required key left out
        store = _store(env / f"s{seed}")
        truth = simulate_day(store, registry, DAY, 300, seed=seed, defect_kinds=["malformed_manifest:water_usage"])
        ds = registry.datasets["water_usage"]
        key = manifest_key(ds.agency, ds.code, DAY)
        assert [(t.dataset, t.file, t.row, t.dimension) for t in truth] == [(ds.code, key, None, "understandability")]
        manifest, problem = try_read_manifest(store, ds.agency, ds.code, DAY)
        assert manifest is None and problem and key in problem
        try:
            doc = json.loads(store.get_bytes(key))
            variants.add("missing:" + next(k for k in ("partition_date", "extracted_at", "files") if k not in doc))
        except json.JSONDecodeError:
            variants.add("truncated")
        assert len(_file_bytes(store, registry, ds.code)) == 1
    assert "truncated" in variants and any(v.startswith("missing:") for v in variants), variants


def test_future_folder_is_a_copy_of_the_delivery_dated_years_ahead(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    truth = simulate_day(store, registry, DAY, ROWS, seed=12, defect_kinds=["future_folder:subject_consent"])
    ds = registry.datasets["subject_consent"]
    (t,) = truth
    future = dt.date.fromisoformat(t.file.split("/")[2])
    assert (t.dataset, t.file, t.row, t.dimension) == (ds.code, delivery_prefix(ds.agency, ds.code, future), None,
                                                       "timeliness")
    assert future.year - DAY.year in (10, 20, 30) and (future.month, future.day) == (DAY.month, DAY.day)
    # the day's own delivery is complete and on time; the future folder holds the same files, its manifest that date
    assert future_delivery_days(store, ds.agency, ds.code, DAY + dt.timedelta(days=1)) == [future]
    own, dated = read_manifest(store, ds.agency, ds.code, DAY), read_manifest(store, ds.agency, ds.code, future)
    assert own is not None and dated is not None and dated.partition_date == future
    assert own.files == dated.files and own.delivered_at == dated.delivered_at
    assert list(_file_bytes(store, registry, ds.code).values()) == list(
        _file_bytes(store, registry, ds.code, future).values())


def test_emptying_redelivery_replaces_the_complete_delivery_with_one_without_records(env: Path,
                                                                                     registry: Registry) -> None:
    store = _store(env / "l")
    first = simulate_day(store, registry, DAY, ROWS, seed=14, defect_rate=0.05)
    before = _all_bytes(store)
    codes = ["water_usage", "resident_population", "bus_card_swipes"]  # CSV, JSON Lines, Parquet
    times = {c: read_manifest(store, registry.datasets[c].agency, c, DAY).delivered_at for c in codes}
    truth = simulate_day(store, registry, DAY, ROWS, seed=14, defect_rate=0.05,
                         defect_kinds=[*ROW_DEFECT_KINDS, *(f"emptying_redelivery:{c}" for c in codes)])
    assert [t for t in first if t.dataset not in codes] == [t for t in truth if t.kind != "emptying_redelivery"]
    after = _all_bytes(store)
    for code, ds in registry.datasets.items():
        prefix = delivery_prefix(ds.agency, code, DAY)
        if code not in codes:  # the others: byte-identical to the first delivery
            assert {k: v for k, v in after.items() if k.startswith(prefix)} == {
                k: v for k, v in before.items() if k.startswith(prefix)}, code
            continue
        manifest = read_manifest(store, ds.agency, code, DAY)
        assert manifest is not None
        assert [(f.record_count, f.format) for f in manifest.files] == [(0, ds.delivery.format)]
        key = prefix + manifest.files[0].name
        assert [(t.file, t.row, t.dimension) for t in truth if t.dataset == code] == [(key, None, "completeness")]
        assert _rows(store, registry, code) == []
        data = store.get_bytes(key)
        if ds.delivery.format == "csv":  # the header only
            assert data.decode(ds.delivery.encoding).splitlines() == [",".join(f'"{f}"' for f in ds.field_names)]
        # a redelivery: after the delivery it replaces, still before the deadline
        deadline = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), tzinfo=TZ) + dt.timedelta(
            hours=ds.delivery.sla_hours)
        assert times[code] < manifest.delivered_at < deadline, code


def test_hostile_kinds_refuse_datasets_and_combinations_they_do_not_fit(env: Path, registry: Registry) -> None:
    store = _store(env / "l")
    for kinds, message in [
        (["gbk_with_bom:resident_population"], "不适用"),  # JSON Lines: no BOM case
        (["gbk_with_bom:water_usage", "undecodable_bytes:water_usage"], "不能同时"),
        (["malformed_manifest:water_usage", "manifest_count_mismatch:water_usage"], "不能同时"),
        (["emptying_redelivery:water_usage", "extra_column:water_usage"], "不能同时"),
        (["missing_delivery:water_usage", "future_folder:water_usage"], "不能同时"),
    ]:
        with pytest.raises(ValueError, match=message):
            simulate_day(store, registry, DAY, ROWS, seed=1, defect_kinds=kinds)
