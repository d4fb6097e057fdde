"""登记 (Art. 17): the registry's codes imported once, a changed dataset or product files one change record (none on a
rerun), the procedure's state machine with its history, and no delivery of a product without a code or cancelled."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from zqdata import publish
from zqdata.audit import read_chain
from zqdata.authorization import AccessDenied, deliver_product
from zqdata.governance import registration as r
from zqdata.registry import load_registry, registry
from zqdata.settings import TZ, repo_root

from test_authorization import GATES, build_products, demo_credentials

NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=TZ)
D = dt.date(2025, 5, 1)
SME = "ops_sme_credit_profile"


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "registry"
    shutil.copytree(repo_root() / "registry", dst)
    return dst


def _edit_yaml(path: Path, edit) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(doc)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def columns() -> dict:
    """The products' output columns as declared in the dbt manifest (built by `make`)."""
    cols = r.product_columns_from_manifest()
    assert {SME, "ops_transit_ridership"} <= set(cols) and len(cols[SME]) > 5
    return cols


def test_registry_codes_are_imported_once_as_first_records_with_code(opdb, reg, columns):
    report = r.sync_registrations(opdb, reg, columns, actor="tester", now=NOW)
    imported = {(x.subject_kind, x.subject): x for x in report.imported}
    assert len(imported) == len(reg.datasets) + len(reg.scenarios) and not report.changed and not report.applied
    sme = imported[("product", SME)]
    assert (sme.record_type, sme.state, sme.code, sme.registered_on) == (
        "first", "code_assigned", "ZQSJ-CP-2025-0001", dt.date(2025, 4, 30))
    assert [c["name"] for c in sme.version["columns"]] == sorted(c["name"] for c in columns[SME])
    water = imported[("dataset", "water_usage")]
    assert water.version["fields"][0]["classification"]["level"] in ("一般", "重要", "核心")
    [event] = r.registration_events(opdb, water.registration_id)
    assert (event["event"], event["to_state"], event["actor"]) == ("imported", "code_assigned", "tester")
    assert event["event_at"] == NOW
    assert r.sync_registrations(opdb, reg, columns, actor="tester").created == []  # idempotent


def test_a_field_added_to_a_dataset_files_one_change_record(opdb, registry_copy, columns):
    r.sync_registrations(opdb, load_registry(registry_copy), columns, now=NOW)
    [first] = r.list_registrations(opdb, kind="dataset", subject="water_usage")

    def add_field(doc):
        doc["fields"].append({"name": "meter_type", "type": "string", "cn_name": "水表类型", "description": "水表类型代码",
                              "required": False, "class": {"level": "一般", "pi": "none", "openness": "open",
                                                           "confidential": False}, "mask": {"method": "keep"}})

    _edit_yaml(registry_copy / "datasets" / "water_usage.yaml", add_field)
    changed_registry = load_registry(registry_copy)
    report = r.sync_registrations(opdb, changed_registry, columns, actor="night", now=NOW + dt.timedelta(days=1))
    [change] = report.created
    assert (change.subject_kind, change.subject, change.record_type, change.state, change.seq) == (
        "dataset", "water_usage", "change", "applied", 2)
    assert change.previous_hash == first.version_hash and change.version_hash != first.version_hash
    assert "meter_type" in change.note and "meter_type" in [f["name"] for f in change.version["fields"]]
    assert r.sync_registrations(opdb, changed_registry, columns, actor="night").created == []  # a rerun: nothing new
    # the change goes through the procedure and keeps the subject's code
    for _ in range(4):
        change = r.advance(opdb, change.registration_id, actor="审核员", now=NOW + dt.timedelta(days=2))
    assert (change.state, change.code) == ("code_assigned", first.code)
    assert r.sync_registrations(opdb, changed_registry, columns).created == []


def test_a_product_output_column_change_files_a_change_record(opdb, reg, columns):
    r.sync_registrations(opdb, reg, columns, now=NOW)
    wider = {**columns, SME: [*columns[SME], {"name": "gas_cubic_meters", "data_type": None}]}
    [change] = r.sync_registrations(opdb, reg, wider, now=NOW).changed
    assert (change.subject, change.record_type) == (SME, "change") and "gas_cubic_meters" in change.note
    assert r.sync_registrations(opdb, reg, wider, now=NOW).created == []
    # delivery is not blocked by a change in the procedure: the product keeps its code
    assert r.delivery_refusal(opdb, reg, SME) is None


def test_a_subject_without_a_code_applies_and_gets_the_next_code_at_the_end_of_the_procedure(opdb, reg, columns):
    sme = reg.scenarios["sme_credit_profile"]
    bare = reg.model_copy(update={"scenarios": {**reg.scenarios, sme.code: sme.model_copy(
        update={"product_registration": None})}})
    [applied] = r.sync_registrations(opdb, bare, columns, actor="night", now=NOW).applied
    assert (applied.subject, applied.record_type, applied.state, applied.code) == (SME, "first", "applied", None)
    assert "未完成登记赋码，当前登记状态：申请" in r.delivery_refusal(opdb, bare, SME)
    states = []
    rec = applied
    while rec.state != "code_assigned":
        rec = r.advance(opdb, rec.registration_id, actor=f"officer{len(states)}", note="ok", registry=bare, now=NOW)
        states.append(rec.state)
    assert states == ["accepted", "formal_review", "public_notice", "code_assigned"]
    assert rec.code == "ZQSJ-CP-2025-0003" and rec.registered_on == NOW.date()  # after the transit product's 0002
    history = r.registration_events(opdb, rec.registration_id)
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in history] == [
        (None, "applied", "night"), ("applied", "accepted", "officer0"), ("accepted", "formal_review", "officer1"),
        ("formal_review", "public_notice", "officer2"), ("public_notice", "code_assigned", "officer3")]
    assert all(e["event_at"] == NOW for e in history)
    assert r.delivery_refusal(opdb, bare, SME) is None


def test_next_code_skips_every_code_in_use():
    used = ["ZQSJ-CP-2025-0001", "ZQSJ-CP-2025-0007", "ZQSJ-ZY-2025-0009", "ZQSJ-CP-2026-0003"]
    assert r.next_code(used, "product", 2025) == "ZQSJ-CP-2025-0008"
    assert r.next_code(used, "dataset", 2026) == "ZQSJ-ZY-2026-0001"


@pytest.fixture
def pending(opdb, reg, columns):
    """A first registration of the SME product in state applied (the registry carries no code for it)."""
    sme = reg.scenarios["sme_credit_profile"]
    bare = reg.model_copy(update={"scenarios": {**reg.scenarios, sme.code: sme.model_copy(
        update={"product_registration": None})}})
    [rec] = r.sync_registrations(opdb, bare, columns, now=NOW).applied
    return rec


@pytest.mark.parametrize("steps,kwargs,message", [
    (0, {"to": "public_notice"}, r"只能推进到「受理」或驳回.*invalid transition applied → public_notice"),
    (0, {"to": "code_assigned"}, r"invalid transition applied → code_assigned"),
    (2, {"to": "accepted"}, r"invalid transition formal_review → accepted"),
    (1, {"code": "ZQSJ-CP-2025-0042"}, r"only when the record reaches code_assigned"),
    (3, {"code": "ZQSJ-CP-2025-0002"}, r"已由 数据产品 ops_transit_ridership 使用"),
    (3, {"code": "not a code"}, r"invalid registration code"),
    (4, {}, r"已处于终态「赋码」"),
])
def test_invalid_transitions_are_refused_and_change_nothing(opdb, reg, pending, steps, kwargs, message):
    rec = pending
    for _ in range(steps):
        rec = r.advance(opdb, rec.registration_id, registry=reg)
    with pytest.raises(r.RegistrationError, match=message):
        r.advance(opdb, rec.registration_id, registry=reg, **kwargs)
    assert r.get_registration(opdb, rec.registration_id).state == rec.state
    assert len(r.registration_events(opdb, rec.registration_id)) == steps + 1


def test_a_rejected_record_is_final(opdb, pending):
    rec = r.advance(opdb, pending.registration_id, reject=True, actor="审核员", note="材料不全")
    assert rec.state == "rejected" and rec.code is None
    assert r.registration_events(opdb, rec.registration_id)[-1]["event"] == "rejected"
    with pytest.raises(r.RegistrationError, match="终态「驳回」"):
        r.advance(opdb, rec.registration_id)
    with pytest.raises(r.RegistrationError, match="unknown registration record"):
        r.advance(opdb, "RG-000000000000")


def test_cli_register_advance_gives_a_one_line_error_and_exit_2(opdb, pending, capsys):
    from zqdata.cli import main

    assert main(["register", "advance", pending.registration_id, "--to", "code_assigned"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid transition applied → code_assigned" in err
    assert main(["register", "advance", pending.registration_id, "--actor", "王科长", "--note", "受理"]) == 0
    assert "受理 (accepted)" in capsys.readouterr().out
    assert main(["register", "show", pending.registration_id]) == 0
    out = capsys.readouterr().out
    assert "王科长" in out and "申请 → 受理" in out
    assert main(["register", "list", "--state", "accepted"]) == 0
    assert pending.registration_id in capsys.readouterr().out


def test_cancellation_stops_deliveries(opdb, reg, columns):
    r.sync_registrations(opdb, reg, columns, now=NOW)
    with pytest.raises(r.RegistrationError, match="change records are filed by the registration sync"):
        r.apply(opdb, "product", SME, "change")
    rec = r.apply(opdb, "product", SME, "cancellation", actor="运营机构", note="产品下线")
    assert r.delivery_refusal(opdb, reg, SME) is None  # applied only: still registered
    for _ in range(4):
        rec = r.advance(opdb, rec.registration_id, actor="审核员")
    assert (rec.state, rec.code) == ("code_assigned", "ZQSJ-CP-2025-0001")
    assert "已注销" in r.delivery_refusal(opdb, reg, SME)
    assert r.sync_registrations(opdb, reg, {**columns, SME: columns[SME][:3]}).created == []  # cancelled: no change
    with pytest.raises(r.RegistrationError, match="already cancelled"):
        r.apply(opdb, "product", SME, "correction")
    again = r.apply(opdb, "product", SME, "first", note="重新上线")  # registered anew: a new code
    for _ in range(4):
        again = r.advance(opdb, again.registration_id, registry=reg, now=NOW)
    assert again.code == "ZQSJ-CP-2025-0003" and r.delivery_refusal(opdb, reg, SME) is None


# --------------------------------------------------------------------------- zq deliver


@pytest.fixture
def published(opdb, data_dir, tmp_path, monkeypatch, reg):
    """The SME product's partition D published to the configured published store."""
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    store = publish.published_store()
    build = build_products(tmp_path / "build.duckdb")
    con = duckdb.connect(str(build), read_only=True)
    publish.publish_partition(con, store, reg, SME, D, GATES, run_id="run-1")
    con.close()
    return store


@pytest.fixture
def unregistered_registry(registry_copy, monkeypatch):
    """The CLI's registry: a copy in which the SME product carries no registration code."""
    _edit_yaml(registry_copy / "scenarios.yaml",
               lambda doc: doc["scenarios"][0].pop("product_registration"))
    monkeypatch.setenv("ZQ_REGISTRY_DIR", str(registry_copy))
    registry.cache_clear()
    yield load_registry(registry_copy)
    registry.cache_clear()


def test_zq_deliver_refuses_a_product_without_a_code_and_audits_it(opdb, published, unregistered_registry, tmp_path,
                                                                   monkeypatch, capsys):
    from zqdata.cli import main

    assert unregistered_registry.scenarios["sme_credit_profile"].product_registration is None
    monkeypatch.setenv("ZQ_CONSUMER_CREDENTIAL", demo_credentials()["zq_rural_bank"])
    args = ["deliver", "--consumer", "zq_rural_bank", "--product", SME, "--date", str(D), "--out", str(tmp_path / "out")]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "产品 ops_sme_credit_profile 未完成登记赋码" in err and "不予交付" in err
    [rec] = read_chain(opdb)
    assert (rec.outcome, rec.consumer, rec.product, rec.scenario) == ("denied", "zq_rural_bank", SME,
                                                                      "sme_credit_profile")
    assert "未完成登记赋码" in rec.reason
    assert not (tmp_path / "out").exists()


def test_zq_deliver_serves_a_product_whose_code_comes_from_the_registry(opdb, published, tmp_path, monkeypatch):
    """The bootstrap: a fresh operational DB, the registry's code → delivered (what `make nightly` relies on)."""
    from zqdata.cli import main

    registry.cache_clear()
    monkeypatch.setenv("ZQ_CONSUMER_CREDENTIAL", demo_credentials()["zq_rural_bank"])
    assert main(["deliver", "--consumer", "zq_rural_bank", "--product", SME, "--date", str(D),
                 "--out", str(tmp_path / "out")]) == 0
    assert [x.outcome for x in read_chain(opdb)] == ["delivered"]


def test_a_cancelled_product_is_refused_by_deliver_product(opdb, published, reg, columns, tmp_path):
    r.sync_registrations(opdb, reg, columns)
    rec = r.apply(opdb, "product", SME, "cancellation", note="停止运营")
    for _ in range(4):
        rec = r.advance(opdb, rec.registration_id)
    with pytest.raises(AccessDenied, match="已注销"):
        deliver_product(opdb, published, reg, "zq_rural_bank", demo_credentials()["zq_rural_bank"], SME, D,
                        tmp_path / "out", now=NOW)
    [audit] = read_chain(opdb)
    assert audit.outcome == "denied" and "registration cancelled" in audit.reason


# --------------------------------------------------------------------------- Dagster wiring


def test_registrations_asset_syncs_and_reports_what_it_created(opdb, data_dir):
    import dagster as dg

    from assets.governance.registration import REGISTRATIONS_KEY, build_registrations_asset, registration_defs

    defs = registration_defs()
    assert defs.resolve_job_def("registration_sync").name == "registration_sync"
    asset = build_registrations_asset()
    assert not ({"warehouse", "dbt"} & set(asset.required_resource_keys))  # opens no warehouse file: no pool needed
    assert asset.group_names_by_key[REGISTRATIONS_KEY] == "governance_reports"
    result = dg.materialize([asset])
    assert result.success
    [mat] = result.asset_materializations_for_node("governance__registrations")
    assert mat.metadata["imported"].value == 9 and mat.metadata["changed"].value == 0
    assert "ZQSJ-CP-2025-0001" in mat.metadata["created_records"].value
    rerun = dg.materialize([asset])
    [mat] = rerun.asset_materializations_for_node("governance__registrations")
    assert mat.metadata["created"].value == 0 and "no record created" in mat.metadata["created_records"].value
