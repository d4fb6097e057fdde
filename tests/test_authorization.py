"""一场景一授权 and audited delivery: authorized fields, scenario validity, consumer credentials, denied attempts logged."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

import duckdb
import pytest
import sqlalchemy as sa

from zqdata import publish
from zqdata.audit import read_chain, verify_chain
from zqdata.authorization import (
    AccessDenied,
    AuthorizationError,
    UnauthorizedFieldError,
    authorized_fields,
    check_fields_authorized,
    check_product_authorized,
    check_scenario_active,
    deliver_product,
    hash_credential,
    verify_credential,
)
from zqdata.opdb import audit_deliveries
from zqdata.registry import Registry, load_registry
from zqdata.settings import TZ, repo_root

D = dt.date(2025, 5, 1)
NOW = dt.datetime(2025, 5, 2, 9, 30, tzinfo=TZ)


def demo_credentials() -> dict[str, str]:
    """consumer code -> demo credential, as documented in docs/security.md."""
    text = (repo_root() / "docs" / "security.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `(zq_[a-z_]+)` \|[^|]*\|[^|]*\| `([^`]+)` \|", text, flags=re.M))


@pytest.fixture
def registry() -> Registry:
    return load_registry()


GATES = {"dbt_tests": True, "k_anonymity": True}


def build_products(path: Path) -> Path:
    """A stand-in for the nightly build: the product table in an ops DuckDB file (two rows on D, one on D+1)."""
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA products")
    con.execute("CREATE TABLE products.ops_sme_credit_profile (credit_code VARCHAR, kwh DECIMAL(18,2), "
                "_partition_date DATE)")
    con.execute("INSERT INTO products.ops_sme_credit_profile VALUES ('91441200MA00000002', 2.5, ?), "
                "('91441200MA00000001', 1.5, ?), ('91441200MA00000003', 3.5, ?)", [D, D, D + dt.timedelta(days=1)])
    con.close()
    return path


@pytest.fixture
def store(data_dir, monkeypatch):
    """The published-snapshot store as configured (local folder under the data dir)."""
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    return publish.published_store()


@pytest.fixture
def ops(opdb, store, registry, tmp_path):
    """The operational DB with D and D+1 of ops_sme_credit_profile published; the build file is gone afterwards."""
    build = build_products(tmp_path / "build.duckdb")
    con = duckdb.connect(str(build), read_only=True)
    for day in (D, D + dt.timedelta(days=1)):
        publish.publish_partition(con, store, registry, "ops_sme_credit_profile", day, GATES, run_id="run-1")
    con.close()
    build.unlink()
    return opdb


def test_authorized_fields_come_from_the_registry(registry):
    assert authorized_fields(registry, "transit_ridership", "bus_card_swipes") == \
        registry.scenarios["transit_ridership"].authorized_fields["bus_card_swipes"]


def test_unauthorized_field_is_a_clear_error(registry):
    check_fields_authorized(registry, "sme_credit_profile", "enterprise_registry", ["credit_code", "ent_name"])
    with pytest.raises(UnauthorizedFieldError,
                       match=r"场景 sme_credit_profile 未授权字段 enterprise_registry\.legal_rep_name \(unauthorized field\)"):
        check_fields_authorized(registry, "sme_credit_profile", "enterprise_registry", ["credit_code", "legal_rep_name"])
    with pytest.raises(UnauthorizedFieldError, match="未授权数据集 resident_population"):
        authorized_fields(registry, "sme_credit_profile", "resident_population")


@pytest.mark.parametrize("update,day,message", [
    ({}, dt.date(2025, 4, 30), "2025-04-30 不在期限内"),
    ({"valid_to": dt.date(2025, 6, 30)}, dt.date(2025, 7, 1), "expired"),
    ({"status": "revoked"}, D, "已撤销"),
])
def test_inactive_scenario_is_refused(registry, update, day, message):
    scenario = registry.scenarios["transit_ridership"].model_copy(update=update)
    with pytest.raises(AuthorizationError, match=message):
        check_scenario_active(scenario, day)


def test_active_scenario_on_its_last_day_passes(registry):
    scenario = registry.scenarios["transit_ridership"]
    check_scenario_active(scenario, scenario.valid_to)
    assert check_product_authorized(registry, scenario.product, scenario.valid_from).code == scenario.code


def test_credentials_are_pbkdf2_and_constant_time_verified():
    stored = hash_credential("open sesame", iterations=1000)
    assert re.fullmatch(r"pbkdf2_sha256\$1000\$[0-9a-f]{32}\$[0-9a-f]{64}", stored)
    assert verify_credential("open sesame", stored)
    assert not verify_credential("open sesame!", stored)
    assert not verify_credential("open sesame", "TO_BE_SET")


def test_demo_credentials_in_the_docs_match_the_registry(registry):
    creds = demo_credentials()
    assert set(creds) == set(registry.consumers)
    for code, consumer in registry.consumers.items():
        assert verify_credential(creds[code], consumer.credential_hash), code


def test_registered_consumer_gets_the_partition_and_it_is_logged(ops, store, registry, tmp_path):
    receipt = deliver_product(ops, store, registry, "zq_rural_bank", demo_credentials()["zq_rural_bank"],
                              "ops_sme_credit_profile", D, tmp_path / "out", now=NOW)
    assert receipt.row_count == 2
    assert receipt.path == tmp_path / "out" / "ops_sme_credit_profile" / str(D) / \
        f"ops_sme_credit_profile_{D}_zq_rural_bank.parquet"
    assert receipt.sha256 == hashlib.sha256(receipt.path.read_bytes()).hexdigest()
    snap = publish.current_snapshot(store, "ops_sme_credit_profile", D)
    assert (receipt.snapshot, receipt.sha256) == (snap.key, snap.sha256)
    exported = duckdb.sql(f"SELECT credit_code FROM read_parquet('{receipt.path}')").fetchall()
    assert [r[0] for r in exported] == ["91441200MA00000001", "91441200MA00000002"]  # sorted at publication
    assert [p.name for p in receipt.path.parent.iterdir()] == [receipt.path.name]  # no temp file left
    [rec] = read_chain(ops)
    assert (rec.consumer, rec.product, rec.outcome, rec.row_count, rec.file_sha256, rec.snapshot) == \
        ("zq_rural_bank", "ops_sme_credit_profile", "delivered", 2, receipt.sha256, snap.key)
    assert rec.delivered_at.endswith("+08:00") and rec.record_hash == receipt.record_hash
    assert verify_chain(ops) == []


@pytest.mark.parametrize("consumer,credential,reason", [
    ("no_such_bank", "whatever", "unknown consumer"),
    ("zq_rural_bank", "wrong-password", "wrong credential"),
    ("zq_transit_planning", None, "not registered for the scenario"),
])
def test_unknown_wrong_or_unregistered_consumer_gets_no_data_and_is_logged(ops, store, registry, tmp_path, consumer,
                                                                          credential, reason):
    credential = credential or demo_credentials()[consumer]
    with pytest.raises(AccessDenied, match=reason):
        deliver_product(ops, store, registry, consumer, credential, "ops_sme_credit_profile", D, tmp_path / "out",
                        now=NOW)
    assert not (tmp_path / "out").exists()  # no data at all
    [rec] = read_chain(ops)
    assert (rec.consumer, rec.outcome, rec.row_count, rec.snapshot) == (consumer, "denied", 0, "")
    assert reason in rec.reason
    assert verify_chain(ops) == []


def test_unknown_product_is_denied_and_logged(ops, store, registry, tmp_path):
    with pytest.raises(AccessDenied, match="unknown product"):
        deliver_product(ops, store, registry, "zq_rural_bank", demo_credentials()["zq_rural_bank"], "../etc",
                        D, tmp_path / "out", now=NOW)
    assert read_chain(ops)[0].outcome == "denied"
    assert not (tmp_path / "out").exists()


def test_expired_authorization_blocks_delivery_of_its_product(ops, store, registry, tmp_path):
    sme = registry.scenarios["sme_credit_profile"]
    reg = registry.model_copy(update={"scenarios": {**registry.scenarios,
                                                    sme.code: sme.model_copy(update={"valid_to": D})}})
    with pytest.raises(AccessDenied, match="expired"):
        deliver_product(ops, store, reg, "zq_rural_bank", demo_credentials()["zq_rural_bank"], "ops_sme_credit_profile",
                        D, tmp_path / "out", now=NOW)  # the partition is in term, but the delivery day is not
    assert read_chain(ops)[0].outcome == "denied"
    assert not (tmp_path / "out").exists()


def test_a_partition_never_published_is_denied_and_logged(ops, store, registry, tmp_path):
    day = D + dt.timedelta(days=2)
    with pytest.raises(AccessDenied, match=r"尚未发布.*partition not published"):
        deliver_product(ops, store, registry, "zq_rural_bank", demo_credentials()["zq_rural_bank"],
                        "ops_sme_credit_profile", day, tmp_path / "out", now=NOW)
    [rec] = read_chain(ops)
    assert (rec.outcome, rec.partition_date, rec.scenario) == ("denied", day, "sme_credit_profile")
    assert "partition not published" in rec.reason
    assert not (tmp_path / "out").exists()


def test_cli_deliver_and_audit_verify_without_any_ops_duckdb_file(ops, data_dir, tmp_path, monkeypatch, capsys):
    from zqdata.cli import main
    from zqdata.settings import get_settings

    def no_duckdb(*args, **kwargs):
        raise AssertionError("delivery opened a DuckDB database")

    monkeypatch.setattr(duckdb, "connect", no_duckdb)
    ops_db = get_settings().ops_db
    assert not ops_db.exists() and not list(tmp_path.rglob("*.duckdb"))  # only snapshots + the operational DB
    monkeypatch.setenv("ZQ_CONSUMER_CREDENTIAL", "wrong")
    args = ["deliver", "--consumer", "zq_rural_bank", "--product", "ops_sme_credit_profile", "--date", str(D),
            "--out", str(tmp_path / "out")]
    assert main(args) == 3
    monkeypatch.setenv("ZQ_CONSUMER_CREDENTIAL", demo_credentials()["zq_rural_bank"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rows=2" in out and "snapshot=products/ops_sme_credit_profile/2025-05-01/" in out
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 1
    assert main(["audit", "verify"]) == 0
    assert "2 records" in capsys.readouterr().out
    assert main(["audit", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in listed] == ["denied", "delivered"]
    with ops.begin() as conn:
        conn.execute(sa.update(audit_deliveries).where(audit_deliveries.c.seq == 1).values(outcome="delivered"))
    assert main(["audit", "verify"]) == 1
    assert "record 1 was edited" in capsys.readouterr().out
    assert not ops_db.exists()


def test_a_delivery_refused_for_a_missing_credential_is_logged_and_listed_safely(opdb, data_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    """Every refusal is in the audit log, and a logged value cannot forge a line of `zq audit list` (issue 11, 9)."""
    from zqdata.audit import read_chain
    from zqdata.cli import main

    monkeypatch.delenv("ZQ_CONSUMER_CREDENTIAL", raising=False)
    forged = "zq_rural_bank\n    9 2025-05-01T00:00:00+08:00 delivered zq_rural_bank"
    assert main(["deliver", "--consumer", forged, "--product", "ops_sme_credit_profile", "--date", str(D),
                 "--out", str(tmp_path / "out")]) == 2
    (record,) = read_chain(opdb)
    assert record.outcome == "denied" and "凭证" in record.reason and record.consumer == forged
    capsys.readouterr()
    assert main(["audit", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and "\\n" in listed[0]  # the newline is shown escaped, on the record's own line
