"""信息披露 (Art. 21): the report lists every authorization in force in the period and none outside it, the catalogue
with registration codes, the data use from the audit log, no personal data or credential, and is published atomically."""

from __future__ import annotations

import datetime as dt
import json

import duckdb
import pytest

from zqdata.audit import append_delivery
from zqdata.governance import disclosure as ds
from zqdata.governance import registration as r
from zqdata.leakgate import find_leaks
from zqdata.settings import TZ
from zqdata.storage import LocalObjectStore

Y2025 = ds.Period.year(2025)
ID = "11010519491231002X"  # a valid GB 11643 number (DOMAIN.md)
MOBILE = "13912345678"
PERSON = "欧阳明辉"


def _scenario(reg, code, valid_from, valid_to, **update):
    base = reg.scenarios["transit_ridership"]
    return base.model_copy(update={"code": code, "name": f"场景{code}", "product": f"ops_{code}",
                                   "product_registration": None, "valid_from": valid_from, "valid_to": valid_to,
                                   **update})


@pytest.fixture
def terms_registry(reg):
    """The shipped scenarios plus one expired before 2025, one starting after it, one ending inside it, one starting
    inside it (revoked since)."""
    extra = [
        _scenario(reg, "expired_2024", dt.date(2023, 1, 1), dt.date(2024, 12, 31)),
        _scenario(reg, "starts_2026", dt.date(2026, 1, 1), dt.date(2027, 12, 31)),
        _scenario(reg, "ends_in_march", dt.date(2024, 6, 1), dt.date(2025, 3, 31)),
        _scenario(reg, "from_december", dt.date(2025, 12, 31), dt.date(2026, 6, 30), status="revoked",
                  kind="commercial"),
    ]
    return reg.model_copy(update={"scenarios": {**reg.scenarios, **{s.code: s for s in extra}}})


@pytest.mark.parametrize("period,expected", [
    (Y2025, ["ends_in_march", "from_december", "sme_credit_profile", "transit_ridership"]),
    (ds.Period.year(2024), ["ends_in_march", "expired_2024"]),
    (ds.Period.between(dt.date(2025, 4, 1), dt.date(2025, 4, 30)), []),
    (ds.Period.between(dt.date(2025, 3, 31), dt.date(2025, 5, 1)),
     ["ends_in_march", "sme_credit_profile", "transit_ridership"]),
    (ds.Period.year(2026), ["from_december", "sme_credit_profile", "starts_2026", "transit_ridership"]),
])
def test_every_authorization_in_force_and_none_outside_the_period(opdb, terms_registry, period, expected):
    report = ds.build_disclosure(opdb, terms_registry, period)
    assert [a["scenario"] for a in report["authorizations"]] == expected
    md = ds.render_markdown(report).decode()
    for code in terms_registry.scenarios:
        assert (f"({code})" in md) == (code in expected), code


def test_an_authorization_is_disclosed_with_object_content_scope_term_and_kind(opdb, reg):
    report = ds.build_disclosure(opdb, reg, Y2025)
    sme = next(a for a in report["authorizations"] if a["scenario"] == "sme_credit_profile")
    assert (sme["operator"], sme["developer"]) == ("肇庆市数据运营有限公司", "肇庆普惠金融科技有限公司")
    assert (sme["valid_from"], sme["valid_to"], sme["kind"], sme["kind_cn"]) == ("2025-05-01", "2027-04-30",
                                                                                 "commercial", "经营性")
    water = next(d for d in sme["datasets"] if d["code"] == "water_usage")
    assert [f["name"] for f in water["fields"]] == reg.scenarios["sme_credit_profile"].authorized_fields["water_usage"]
    assert water["agency_name"] == "肇庆市供水有限公司"
    assert sme["consumers"] == [{"code": "zq_rural_bank", "name": "肇庆农村商业银行"}]
    transit = next(a for a in report["authorizations"] if a["scenario"] == "transit_ridership")
    assert (transit["kind_cn"], transit["k_anonymity"]) == ("公益", 5)
    html = ds.render_html(report).decode()
    for text in ("肇庆普惠金融科技有限公司", "2027-04-30", "经营性", "公益", "用水量（立方米）"):
        assert text in html


def test_catalogue_carries_registration_codes_and_their_state(opdb, reg):
    columns = r.product_columns_from_manifest()
    r.sync_registrations(opdb, reg, columns)
    rec = r.apply(opdb, "product", "ops_transit_ridership", "cancellation", note="停止运营")
    for _ in range(4):
        rec = r.advance(opdb, rec.registration_id)
    svc = r.apply(opdb, "service", "data_delivery_api", "first", note="场景产品交付接口")
    for _ in range(4):
        svc = r.advance(opdb, svc.registration_id, registry=reg, now=dt.datetime(2025, 8, 1, tzinfo=TZ))
    cat = ds.build_disclosure(opdb, reg, Y2025)["catalogue"]
    products = {p["subject"]: p for p in cat["products"]}
    assert products["ops_sme_credit_profile"]["code"] == "ZQSJ-CP-2025-0001"
    assert products["ops_transit_ridership"]["cancelled"] and "已注销" in products["ops_transit_ridership"]["status"]
    assert [(s["name"], s["code"]) for s in cat["services"]] == [("data_delivery_api", "ZQSJ-FW-2025-0001")]
    assert {x["code"] for x in cat["resources"]} == {d.registration.code for d in reg.datasets.values()}


@pytest.fixture
def audited(opdb):
    """Deliveries and refusals in 2025 (and one in 2026); two refusals echo a requester's personal data."""
    def log(consumer, product, outcome, reason, rows, when):
        append_delivery(opdb, consumer=consumer, scenario="", product=product, partition_date=None, outcome=outcome,
                        reason=reason, row_count=rows, file_sha256="", delivered_at=when)

    at = dt.datetime(2025, 6, 2, 9, 0, tzinfo=TZ)
    log("zq_rural_bank", "ops_sme_credit_profile", "delivered", "", 120, at)
    log("zq_rural_bank", "ops_sme_credit_profile", "delivered", "", 80, at + dt.timedelta(days=1))
    log("zq_transit_planning", "ops_transit_ridership", "delivered", "", 24, at)
    log("zq_rural_bank", "ops_sme_credit_profile", "denied", "使用方 zq_rural_bank 凭证错误 (wrong credential)", 0, at)
    log(ID, "ops_sme_credit_profile", "denied", f"未登记的使用方 {ID} (unknown consumer)", 0, at)
    log(PERSON, MOBILE, "denied", f"产品 {MOBILE} 未登记 (unknown product)", 0, at)
    log("zq_rural_bank", "ops_sme_credit_profile", "delivered", "", 999,
        dt.datetime(2025, 12, 31, 23, 59, tzinfo=TZ))  # last minute of the year, Shanghai time
    log("zq_rural_bank", "ops_sme_credit_profile", "delivered", "", 5000,
        dt.datetime(2025, 12, 31, 16, 0, tzinfo=dt.timezone.utc))  # 2026-01-01 00:00 in Shanghai: next year
    return opdb


def test_data_use_per_product_and_consumer_class_from_the_audit_log(audited, reg):
    use = ds.build_disclosure(audited, reg, Y2025)["data_use"]
    assert use["totals"] == {"deliveries": 4, "rows": 120 + 80 + 24 + 999, "refusals": 3}
    by_product = {p["product"]: p for p in use["by_product"]}
    assert by_product["ops_sme_credit_profile"] == {"product": "ops_sme_credit_profile", "deliveries": 3,
                                                    "rows": 1199, "consumers": 1, "refusals": 2}
    assert by_product["ops_transit_ridership"]["rows"] == 24
    assert by_product["（未登记产品 unregistered product）"]["refusals"] == 1
    by_class = {c["class"]: c for c in use["by_consumer_class"]}
    assert (by_class["commercial"]["deliveries"], by_class["commercial"]["refusals"]) == (3, 1)
    assert (by_class["public_interest"]["deliveries"], by_class["public_interest"]["rows"]) == (1, 24)
    assert by_class["unregistered"]["refusals"] == 2
    assert {x["category"]: x["count"] for x in use["refusals_by_reason"]} == {
        "credential": 1, "unknown_consumer": 1, "unknown_product": 1}
    assert ds.build_disclosure(audited, reg, ds.Period.year(2026))["data_use"]["totals"]["rows"] == 5000


def _scan(files: dict[str, bytes], reg, day: dt.date):
    """The leak gate of the ops tests (zqdata.leakgate.find_leaks) over every line of the report files, against a gov
    value set holding the person whose data the refused requests echoed."""
    gov, ops = duckdb.connect(), duckdb.connect()
    try:
        gov.execute("CREATE SCHEMA ods")
        gov.execute("CREATE TABLE ods.resident_population (citizen_id VARCHAR, name VARCHAR, phone VARCHAR, "
                    "_partition_date DATE)")
        gov.execute("INSERT INTO ods.resident_population VALUES (?, ?, ?, ?)", [ID, PERSON, MOBILE, day])
        ops.execute("CREATE SCHEMA reports")
        ops.execute("CREATE TABLE reports.disclosure (file VARCHAR, line VARCHAR)")
        for name, data in files.items():
            ops.executemany("INSERT INTO reports.disclosure VALUES (?, ?)",
                            [[name, line] for line in data.decode("utf-8").splitlines()])
        return find_leaks(gov, ops, day, reg)
    finally:
        gov.close()
        ops.close()


def test_report_files_hold_no_personal_data_and_no_credential(audited, reg):
    files = ds.render_files(ds.build_disclosure(audited, reg, Y2025))
    day = dt.date(2025, 12, 31)
    assert _scan(files, reg, day) == []
    # the scan is live: the same report with the refused requester's input in it is caught
    leaky = {**files, "report.md": files["report.md"] + f"\n| {PERSON} | {ID} | {MOBILE} |\n".encode()}
    assert {leak.found for leak in _scan(leaky, reg, day)} == {"citizen_id", "mobile", "name"}
    for data in files.values():
        text = data.decode("utf-8")
        assert "pbkdf2" not in text and "credential_hash" not in text
        assert not any(c.credential_hash.split("$")[-1] in text for c in reg.consumers.values())
        assert not any(a.contact.email in text for a in reg.agencies.values())
        assert "zq_rural_bank 凭证错误" not in text  # no reason text, only its category


def test_html_is_self_contained(opdb, reg):
    import re

    html = ds.render_html(ds.build_disclosure(opdb, reg, Y2025)).decode("utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and '<meta charset="utf-8">' in html
    html = re.sub(r'xmlns(:\w+)?="http://www\.w3\.org/[^"]*"', "", html)  # the SVG's namespace names, never fetched
    for external in ("http://", "https://", "<script", "<link", "<img", "url(", "@import"):
        assert external not in html, external


def test_publishing_writes_a_complete_report_then_switches_the_pointer(opdb, reg, tmp_path):
    store = LocalObjectStore(tmp_path / "published")
    first = ds.build_disclosure(opdb, reg, Y2025, now=dt.datetime(2026, 3, 1, 9, 0, tzinfo=TZ))
    one = ds.publish_disclosure(store, first)
    assert one.prefix.startswith("reports/disclosure/2025/") and set(one.keys) == set(ds.FILE_NAMES)
    assert ds.current_disclosure(store, "2025") == ds.render_files(first)
    # regenerated later from the same data: the same folder, kept as first written
    later = ds.build_disclosure(opdb, reg, Y2025, now=dt.datetime(2026, 3, 2, 9, 0, tzinfo=TZ))
    assert ds.publish_disclosure(store, later).prefix == one.prefix
    assert ds.current_disclosure(store, "2025") == ds.render_files(first)
    # new data: a new folder, then the pointer moves; the previous report stays, immutable
    append_delivery(opdb, consumer="zq_rural_bank", scenario="sme_credit_profile", product="ops_sme_credit_profile",
                    partition_date=dt.date(2025, 6, 1), outcome="delivered", reason="", row_count=7, file_sha256="",
                    delivered_at=dt.datetime(2025, 6, 2, 9, 0, tzinfo=TZ))
    second = ds.build_disclosure(opdb, reg, Y2025, now=dt.datetime(2026, 3, 3, 9, 0, tzinfo=TZ))
    two = ds.publish_disclosure(store, second)
    assert two.prefix != one.prefix and ds.current_disclosure(store, "2025") == ds.render_files(second)
    assert store.get_bytes(one.keys["report.html"]) == ds.render_files(first)["report.html"]
    pointer = json.loads(store.get_bytes(ds.current_key("2025")))
    assert pointer["snapshot"] == two.prefix
    assert json.loads(ds.current_disclosure(store, "2025")["report.json"])["period"]["start"] == "2025-01-01"
    store.put_bytes(two.keys["report.md"], b"tampered")
    with pytest.raises(ValueError, match="report file altered"):
        ds.current_disclosure(store, "2025")


def test_cli_report_disclosure_publishes_to_the_published_store(audited, data_dir, tmp_path, monkeypatch, capsys):
    from zqdata.cli import main

    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    assert main(["report", "disclosure", "--year", "2025"]) == 0
    out = capsys.readouterr().out
    assert "交付 4 次 1223 行，拒绝 3 次" in out
    pointer = data_dir / "published" / "snapshots" / "reports" / "disclosure" / "2025" / "CURRENT.json"
    folder = data_dir / "published" / "snapshots" / json.loads(pointer.read_text())["snapshot"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(ds.FILE_NAMES)
    assert main(["report", "disclosure", "--from", "2025-06-01", "--to", "2025-06-30", "--out", str(tmp_path / "o"),
                 "--no-publish"]) == 0
    assert (tmp_path / "o" / "disclosure-2025-06-01_2025-06-30.html").is_file()
    assert main(["report", "disclosure", "--from", "2025-06-30", "--to", "2025-06-01"]) == 2
    assert "period ends before it starts" in capsys.readouterr().err


# --------------------------------------------------------------------------- Dagster wiring


def test_disclosure_asset_is_yearly_and_scheduled_on_1_march_for_the_previous_year(audited, data_dir, monkeypatch):
    import dagster as dg

    from assets.governance.registration import (DISCLOSURE_KEY, build_disclosure_asset, registration_defs,
                                                yearly_partitions)

    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    assert yearly_partitions.get_partition_keys(current_time=dt.datetime(2027, 3, 1, tzinfo=TZ)) == ["2025", "2026"]
    defs = registration_defs()
    schedule = defs.resolve_schedule_def("disclosure_report_0301")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 9 1 3 *", "Asia/Shanghai")
    ctx = dg.build_schedule_context(repository_def=defs.get_repository_def(),
                                    scheduled_execution_time=dt.datetime(2026, 3, 1, 9, 0, tzinfo=TZ))
    [request] = schedule.evaluate_tick(ctx).run_requests
    assert request.partition_key == "2025"
    result = dg.materialize([build_disclosure_asset()], partition_key="2025")
    assert result.success
    [mat] = result.asset_materializations_for_node("governance__disclosure_report")
    assert mat.metadata["deliveries"].value == 4 and mat.metadata["refusals"].value == 3
    assert "肇庆市公共数据资源授权运营信息披露报告" in mat.metadata["report"].value
    published = data_dir / "published" / "snapshots" / "reports" / "disclosure" / "2025" / "CURRENT.json"
    assert published.is_file()
    assert DISCLOSURE_KEY.to_user_string() == "governance/disclosure_report"


def test_the_disclosure_opens_offline_and_shows_its_data_use_chart(audited, reg, tmp_path):
    """Issue 13 acceptance: each report opens in headless Chromium without network and shows its charts."""
    from tests.browser import block_network, offline_browser, skip_reason

    page_file = tmp_path / "report.html"
    page_file.write_bytes(ds.render_html(ds.build_disclosure(audited, reg, Y2025)))
    if skip_reason() is not None:
        pytest.skip(skip_reason())
    with offline_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        attempted = block_network(page)
        page.goto(page_file.as_uri(), wait_until="load")
        page.screenshot(path=str(tmp_path / "disclosure.png"), full_page=True)
        assert attempted == []
        assert page.locator("figure.chart-bar svg g.mark-rect path").count() > 0  # bars drawn
        box = page.locator("figure.chart svg").first.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
