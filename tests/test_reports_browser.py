"""The governance reports as people open them: the quarterly report's numbers per scenario, the three Dagster assets
publishing their reports, and each report's HTML opened in headless Chromium with every network request blocked —
nothing is attempted, and the charts (Vega SVG bars and lines) are on the page.

Chromium: Debian's package driven by Playwright, offline (tests/browser.py).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from browser import block_network, offline_browser, skip_reason
from test_evaluation import build_gov, build_opdb

from zqdata import audit
from zqdata.governance import quarterly as qmod
from zqdata.registry import load_registry
from zqdata.settings import TZ

AUDIT_KEY = audit.AuditKey.from_secret("a" * 32)


def _t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=TZ)


# (consumer, product, scenario recorded, outcome, rows, when)
AUDIT = [
    ("zq_rural_bank", "ops_sme_credit_profile", "sme_credit_profile", "delivered", 100, "2025-05-15 10:00"),
    ("zq_rural_bank", "ops_sme_credit_profile", "sme_credit_profile", "delivered", 120, "2025-06-02 10:00"),
    ("zq_transit_planning", "ops_transit_ridership", "transit_ridership", "delivered", 24, "2025-06-10 10:00"),
    ("intruder", "ops_sme_credit_profile", "", "denied", 0, "2025-06-11 10:00"),  # attributed by its product
    ("zq_rural_bank", "ops_sme_credit_profile", "sme_credit_profile", "delivered", 999, "2025-07-02 10:00"),  # Q3
]
# (asset, check, partition, passed, evaluated at): what the nightly runs recorded in the event log
CHECKS = [
    ("ops/desensitized/desensitized_enterprise_registry", "no_personal_data_leak", "2025-06-02", False, "2025-06-03 03:00"),
    ("ops/desensitized/desensitized_enterprise_registry", "no_personal_data_leak", "2025-06-03", False, "2025-06-04 03:00"),
    ("ops/desensitized/desensitized_enterprise_registry", "no_personal_data_leak", "2025-06-03", True, "2025-06-04 05:00"),  # rerun
    ("ops/desensitized/desensitized_enterprise_registry", "no_personal_data_leak", "2025-06-20", False, "2025-07-05 03:00"),  # late
    ("ops/products/ops_transit_ridership", "authorization_in_force", "2025-06-10", True, "2025-06-11 03:00"),
]


def record_check(instance: dg.DagsterInstance, asset: str, check: str, partition: str, passed: bool,
                 at: dt.datetime) -> None:
    """Store an asset check evaluation as a past nightly run would have (its time is the event's time)."""
    from dagster._core.events import DagsterEvent, DagsterEventType
    from dagster._core.events.log import EventLogEntry

    evaluation = dg.AssetCheckEvaluation(asset_key=dg.AssetKey(asset.split("/")), check_name=check, passed=passed,
                                         metadata={}, severity=dg.AssetCheckSeverity.ERROR, partition=partition)
    instance.store_event(EventLogEntry(
        error_info=None, level="INFO", user_message="", run_id=f"night-{partition}-{at:%H%M}", timestamp=at.timestamp(),
        dagster_event=DagsterEvent(DagsterEventType.ASSET_CHECK_EVALUATION.value, job_name="nightly_aggregation",
                                   event_specific_data=evaluation)))


@pytest.fixture
def stored(tmp_path):
    """The gov DB, the operational DB (issues, audit log) and a Dagster instance with past check evaluations."""
    build_gov(tmp_path / "gov.duckdb")
    engine = build_opdb(f"sqlite:///{tmp_path / 'op.sqlite'}")
    for consumer, product, scenario, outcome, rows, at in AUDIT:
        audit.append_delivery(engine, consumer=consumer, scenario=scenario, product=product,
                              partition_date=_t(at).date() - dt.timedelta(days=1), outcome=outcome,
                              reason="" if outcome == "delivered" else "凭证错误 wrong credential", row_count=rows,
                              file_sha256="0" * 64 if rows else "", delivered_at=_t(at), key=AUDIT_KEY,
                              anchor=tmp_path / "anchor.json")
    instance = dg.DagsterInstance.ephemeral()
    for asset, check, partition, passed, at in CHECKS:
        record_check(instance, asset, check, partition, passed, _t(at))
    return tmp_path, engine, instance


def _quarterly(stored, now="2026-01-01 00:00"):
    tmp_path, engine, instance = stored
    gov = duckdb.connect(str(tmp_path / "gov.duckdb"), read_only=True)
    try:
        return qmod.build_quarterly(gov, engine, load_registry(), "2025-04-01", instance=instance, now=_t(now))
    finally:
        gov.close()


# --------------------------------------------------------------------------------------------- the quarterly numbers

def test_quarterly_report_per_scenario(stored):
    q = _quarterly(stored)
    assert (q.label, q.as_of, q.provisional) == ("2025-Q2", _t("2025-07-01 06:00"), False)
    sme, transit = (next(s for s in q.scenarios if s.scenario.code == c) for c in ("sme_credit_profile",
                                                                                     "transit_ridership"))
    assert (sme.deliveries, sme.rows, sme.refused, sme.consumers_served) == (2, 220, 1, ["zq_rural_bank"])
    assert sme.monthly == {"2025-05": 1, "2025-06": 1} and sme.registered_consumers == ["zq_rural_bank"]
    assert (transit.deliveries, transit.rows, transit.refused) == (1, 24, 0)
    # quality gate: enterprise_registry held back on 2025-06-02 (sme reads it, transit does not)
    assert sme.gate_holds == [("enterprise_registry", "2025-06-02", "错误级记录 10%")] and transit.gate_holds == []
    # leak gate: 06-02 blocked; 06-03 failed then passed on a rerun; 06-20's failure came after the cutoff
    assert sme.blocks == {"ops/desensitized/desensitized_enterprise_registry :: no_personal_data_leak":
                          {"partitions": ["2025-06-02"], "evaluations": 2}}
    assert transit.blocks == {}
    # input quality of the scenario's datasets over the quarter (2025-07-01 is Q3)
    assert sme.quality["accuracy"] == (400, 10) and sme.pass_rate("accuracy") == pytest.approx(0.975)
    assert transit.pass_rate("timeliness") == pytest.approx(0.9)
    # fee class from the registry, and what it does not record
    report = qmod.build_quarterly_report(q, generated_at=_t("2025-07-01 06:30"))
    data = json.loads(report.to_json())["data"]
    sme_data = next(s for s in data["scenarios"] if s["scenario"] == "sme_credit_profile")
    assert sme_data["kind"] == "commercial" and sme_data["fee_schedule"] is None
    assert qmod.NO_FEE_SCHEDULE in report.to_markdown()
    # the demand register (Art. 18) is not in this operational DB
    assert all(not s["demand"] for s in data["scenarios"])
    assert qmod.NO_RECORDS in report.to_markdown()
    assert "Dagster" in data["sources"]["leak_blocks"]


def test_quarterly_report_is_reproducible(stored):
    a = qmod.build_quarterly_report(_quarterly(stored), generated_at=_t("2025-07-01 06:30"))
    b = qmod.build_quarterly_report(_quarterly(stored, now="2027-05-05 00:00"), generated_at=_t("2027-05-05 00:01"))
    s1, s2 = "2025-07-01T06:30:00+08:00", "2027-05-05T00:01:00+08:00"
    assert a.to_html().replace(s1, "") == b.to_html().replace(s2, "")
    assert a.to_json().replace(s1.encode(), b"") == b.to_json().replace(s2.encode(), b"")
    assert a.to_markdown().replace(s1, "") == b.to_markdown().replace(s2, "")


def test_a_quarter_not_over_is_provisional(stored):
    q = _quarterly(stored, now="2025-06-04 04:00")
    sme = next(s for s in q.scenarios if s.scenario.code == "sme_credit_profile")
    assert q.provisional and q.as_of == _t("2025-06-04 04:00")
    assert (sme.deliveries, sme.rows) == (2, 220)
    # as of 06-04 04:00 the rerun of 06-03 (05:00) had not passed yet: both partitions blocked
    assert sme.blocks["ops/desensitized/desensitized_enterprise_registry :: no_personal_data_leak"] == {
        "partitions": ["2025-06-02", "2025-06-03"], "evaluations": 2}


def test_demand_requests_are_reported_in_their_state_at_the_cutoff(stored):
    import sqlalchemy as sa

    from zqdata import opdb

    if not hasattr(opdb, "demand_requests") or qmod._demand_module() is None:
        pytest.skip("the demand register (zqdata.governance.demand) is not there yet")
    _, engine, _ = stored
    with opdb.transaction(engine) as conn:
        for demand_id, raised, state, events in (
                ("DR-000000000001", "2025-05-10 10:00", "agreed",
                 [(None, "submitted", "2025-05-10 10:00"), ("submitted", "coordinating", "2025-05-20 10:00"),
                  ("coordinating", "agreed", "2025-08-01 10:00")]),  # agreed after the quarter's cutoff
                ("DR-000000000002", "2025-07-15 10:00", "submitted", [(None, "submitted", "2025-07-15 10:00")])):
            conn.execute(sa.insert(opdb.demand_requests).values(
                demand_id=demand_id, scenario="sme_credit_profile", agency="samr", datasets='["enterprise_registry"]',
                fields='["enterprise_registry.contact_phone"]', reason="需要企业联系电话", state=state,
                requested_by="运营机构", requested_at=_t(raised), updated_at=_t(events[-1][2])))
            for frm, to, at in events:
                conn.execute(sa.insert(opdb.demand_events).values(demand_id=demand_id, from_state=frm, to_state=to,
                                                                   actor="运营机构", event_at=_t(at)))
    q = _quarterly(stored)
    sme = next(s for s in q.scenarios if s.scenario.code == "sme_credit_profile")
    assert [(d["id"], d["status"].split()[-1]) for d in sme.demand] == [("DR-000000000001", "coordinating")]
    assert qmod._demand_text(sme) != qmod.NO_RECORDS and "DR-000000000001" in qmod.build_quarterly_report(q).to_html()


# --------------------------------------------------------------------------------------------- Dagster and the browser

@pytest.mark.parametrize("day, previous", [("2025-07-01", "2025-04-01"), ("2026-01-01", "2025-10-01"),
                                           ("2026-02-15", "2025-10-01"), ("2026-04-01", "2026-01-01")])
def test_previous_quarter(day, previous):
    assert qmod.previous_quarter_start(dt.date.fromisoformat(day)).isoformat() == previous


def test_the_report_definitions_load_and_schedule_the_right_periods():
    from assets.governance.reports import reports_defs
    from orchestration.resources import WarehouseResource

    defs = dg.Definitions.merge(reports_defs(), dg.Definitions(resources={"warehouse": WarehouseResource()}))
    dg.Definitions.validate_loadable(defs)
    assert {a.key.to_user_string(): a.group_names_by_key[a.key] for a in defs.assets} == {
        "governance/agency_evaluation": "governance_reports",
        "governance/quarterly_operations_report": "governance_reports",
        "governance/compliance_matrix": "governance_reports"}

    def requests(name: str, at: str) -> list[dg.RunRequest]:
        schedule = defs.get_schedule_def(name)
        data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=_t(at),
                                                                repository_def=defs.get_repository_def()))
        return list(data.run_requests or [])

    assert defs.get_schedule_def("agency_evaluation_0301").cron_schedule == "30 6 1 3 *"
    (r,) = requests("agency_evaluation_0301", "2026-03-01 06:30")
    assert r.partition_key == "2025"
    (r,) = requests("quarterly_operations_report_quarter_start", "2025-07-01 06:30")
    assert r.partition_key == "2025-04-01"
    (r,) = requests("quarterly_operations_report_quarter_start", "2026-01-01 06:30")
    assert r.partition_key == "2025-10-01"
    (r,) = requests("compliance_matrix_quarterly", "2025-10-01 06:30")
    assert r.run_config["ops"]["governance__compliance_matrix"]["config"]["as_of_date"] == "2025-10-01"


def test_merged_into_the_code_location_the_definitions_load():
    """Definitions.merge(code location, reports_defs()) loads: the daily nightly job leaves the report group out (its
    partitions are yearly, quarterly and none), and nothing else collides."""
    from assets.governance.reports import COMPLIANCE_KEY, reports_defs, reports_selection
    from orchestration.definitions import defs
    from orchestration.jobs import nightly_aggregation

    loaded = defs()
    wired = loaded.resolve_asset_graph().has(COMPLIANCE_KEY)
    merged = loaded if wired else dg.Definitions.merge(loaded, reports_defs())
    dg.Definitions.validate_loadable(merged)
    jobs = {j.name: j for j in merged.resolve_all_job_defs()}
    assert {"governance_agency_evaluation", "governance_quarterly_operations_report",
            "governance_compliance_matrix"} <= set(jobs)
    graph = merged.resolve_asset_graph()
    assert not reports_selection().resolve(graph) & nightly_aggregation.selection.resolve(graph)


def _materialize_reports(stored, monkeypatch) -> dict[str, Path]:
    """Run the three report assets as Dagster would; return the published HTML of each."""
    from assets.governance.reports import build_compliance_asset, build_evaluation_asset, build_quarterly_asset
    from orchestration.resources import WarehouseResource

    tmp_path, engine, instance = stored
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZQ_OPDB_URL", str(engine.url))
    monkeypatch.setenv("ZQ_STORE_BACKEND", "local")
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    resources = {"warehouse": WarehouseResource(gov_db=str(tmp_path / "gov.duckdb"))}
    out = {}
    for asset, partition, config in (
            (build_evaluation_asset(), "2025", None),
            (build_quarterly_asset(), "2025-04-01", None),
            (build_compliance_asset(), None,
             dg.RunConfig(ops={"governance__compliance_matrix": {"config": {"as_of_date": "2025-07-01"}}}))):
        result = dg.materialize([asset], instance=instance, partition_key=partition, resources=resources,
                                run_config=config)
        assert result.success
        (mat,) = result.get_asset_materialization_events()
        meta = mat.materialization.metadata
        out[asset.key.path[-1]] = Path(meta["report_html"].value)
        assert meta["summary"].value.startswith("**")
    return out


def test_each_report_opens_offline_and_shows_its_charts(stored, monkeypatch, tmp_path):
    pages = _materialize_reports(stored, monkeypatch)
    assert set(pages) == {"agency_evaluation", "quarterly_operations_report", "compliance_matrix"}
    for path in pages.values():
        assert path.is_file() and (path.parent / "report.md").is_file() and (path.parent / "report.json").is_file()
    if skip_reason() is not None:
        pytest.skip(skip_reason())
    expected = {  # (bars, lines) each page must draw
        "agency_evaluation": (True, True),
        "quarterly_operations_report": (True, True),
        "compliance_matrix": (True, False),
    }
    with offline_browser() as browser:
        for name, path in pages.items():
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            attempted = block_network(page)
            page.goto(path.as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            assert attempted == [], f"{name} fetched {attempted}"
            figures = page.locator("figure.chart svg")
            assert figures.count() >= 1
            bars, lines = expected[name]
            if bars:
                assert page.locator("figure.chart-bar svg g.mark-rect path").count() > 0, name
            if lines:
                assert page.locator("figure.chart-line svg g.mark-line path").count() > 0, name
            box = figures.first.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100  # drawn, not an empty element
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000
            page.close()
