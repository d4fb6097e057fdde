"""Supervision and risk (Art. 30): the compliance matrix covers every article DOMAIN.md maps to software, every
reference of the controls registry resolves against the loaded Definitions, a check removed from the definitions turns its row
red, statuses come from the latest runs, and the risk list finds what is overdue, expiring, refused and failed."""

from __future__ import annotations

import datetime as dt
import functools
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from zqdata.governance import compliance as comp
from zqdata.registry import RegistryError, load_registry
from zqdata.settings import TZ, repo_root

COMPLIANCE_KEY = dg.AssetKey(["governance", "compliance_matrix"])
DOMAIN_CANDIDATES = [os.environ.get("ZQ_DOMAIN_MD", ""), "/work/shared/DOMAIN.md",
                     str(repo_root() / "docs" / "DOMAIN.md")]


@functools.cache
def _loaded() -> dg.Definitions:
    from assets.governance.reports import loaded_definitions

    return loaded_definitions()


def _without_product_gates() -> dg.Definitions:
    """The code location's definitions as assembled by orchestration.definitions, but without the product gate checks
    (`no_personal_data_leak` / `authorization_in_force` on ops/products/*)."""
    from assets.gov_platform import gov_platform_defs
    from assets.governance import governance_defs
    from assets.governance.reports import reports_defs
    from assets.ops_platform.boundary import boundary_defs
    from assets.ops_platform.products import ops_dbt_defs
    from assets.ops_platform.publish import publish_defs
    from assets.source_systems import source_defs

    from orchestration.resources import default_resources

    governance = governance_defs()
    parts = [source_defs(), gov_platform_defs(), governance, boundary_defs(), ops_dbt_defs(), publish_defs(),
             dg.Definitions(resources=default_resources())]
    wired = any(COMPLIANCE_KEY in getattr(a, "keys", ()) for a in governance.assets or [])
    return dg.Definitions.merge(*parts, *([] if wired else [reports_defs()]))


def _t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=TZ)


# --------------------------------------------------------------------------------------------- coverage and references

def test_the_matrix_covers_every_article_domain_md_maps_to_software():
    path = next((Path(p) for p in DOMAIN_CANDIDATES if p and Path(p).is_file()), None)
    if path is None:
        pytest.skip("DOMAIN.md not found (set ZQ_DOMAIN_MD)")
    wanted = comp.domain_articles(path.read_text(encoding="utf-8"))
    assert {2, 6, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 28, 30, 31} <= wanted  # the parser reads the table
    controls = comp.load_controls()
    assert {a.article for a in controls.articles} == wanted
    rows = comp.build_matrix(controls, comp.DefinitionsInventory.of(_loaded()), None, _t("2025-07-01 06:00"))
    assert [r.article.article for r in rows] == sorted(wanted)
    gaps = {r.article.article for r in rows if r.status == "gap"}
    assert gaps == {a for a in wanted if not any(a in c.articles for c in controls.controls)}


def test_every_reference_resolves_against_the_loaded_definitions():
    assert comp.validate_controls(comp.load_controls(), _loaded()) == []


def test_removing_a_check_turns_its_row_red():
    controls = comp.load_controls()
    as_of = _t("2025-07-01 06:00")
    full = {r.article.article: r for r in
            comp.build_matrix(controls, comp.DefinitionsInventory.of(_loaded()), None, as_of)}
    assert full[23].status == "not_run"  # present, never run in this (empty) instance
    reduced = comp.DefinitionsInventory.of(_without_product_gates())
    assert ("ops/products/ops_sme_credit_profile", "authorization_in_force") not in reduced.checks
    rows = {r.article.article: r for r in comp.build_matrix(controls, reduced, None, as_of)}
    assert rows[23].status == "failed"
    (ctl,) = [s for s in rows[23].controls if s.control.id == "one_scenario_one_authorization"]
    assert any("检查不存在" in d and "authorization_in_force" in d for d in ctl.details)
    assert rows[6].status == "failed" and rows[24].status == "failed"  # the product leak gate is gone too
    assert rows[2].status == full[2].status  # the others are untouched
    report = comp.build_compliance_report(comp.Compliance(
        dt.date(2025, 7, 1), as_of, False, list(rows.values()), comp.Risks(), controls.risk))
    html = report.to_html()
    red = [line for line in html.split("<tr") if "one_scenario_one_authorization" in line]
    assert red and all(line.startswith(' class="bad"') for line in red)


def test_a_broken_registry_is_refused_at_load(tmp_path):
    doc = yaml.safe_load((repo_root() / "registry" / "controls.yaml").read_text(encoding="utf-8"))
    doc["controls"][0]["articles"] = [99]
    (tmp_path / "controls.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RegistryError, match="unknown articles"):
        comp.load_controls(tmp_path)


# --------------------------------------------------------------------------------------------- status from the runs

OUTCOME = {"passed": True, "severity": dg.AssetCheckSeverity.ERROR}


@dg.asset(key=["demo", "table"])
def demo_table() -> None:
    return None


@dg.asset_check(asset=demo_table, name="demo_gate", blocking=True)
def demo_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=OUTCOME["passed"], severity=OUTCOME["severity"])


def _demo_controls(tmp_path: Path) -> comp.ControlsRegistry:
    doc = {
        "max_age_days": 7,
        "articles": [{"article": 2, "requirement": "demo"}, {"article": 17, "requirement": "demo"},
                     {"article": 18, "requirement": "demo"}],
        "controls": [
            {"id": "demo_gate_control", "title": "demo", "articles": [2],
             "implemented_by": ["zqdata.boundary:check_exclusions"],
             "checks": [{"asset": "demo/*", "check": "demo_gate"}], "assets": ["demo/table"]},
            {"id": "broken_function", "title": "demo", "articles": [17],
             "implemented_by": ["zqdata.boundary:no_such_function"]},
        ],
    }
    (tmp_path / "controls.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return comp.load_controls(tmp_path)


def test_statuses_come_from_the_latest_runs(tmp_path):
    controls = _demo_controls(tmp_path)
    defs = dg.Definitions(assets=[demo_table], asset_checks=[demo_gate])
    inventory = comp.DefinitionsInventory.of(defs)
    instance = dg.DagsterInstance.ephemeral()

    def status(as_of: dt.datetime) -> dict[int, str]:
        return {r.article.article: r.status for r in comp.build_matrix(controls, inventory, instance, as_of, tmp_path)}

    before = dt.datetime.now(TZ)
    assert status(before) == {2: "not_run", 17: "failed", 18: "gap"}  # never run; import fails; no control
    OUTCOME.update(passed=True, severity=dg.AssetCheckSeverity.ERROR)
    assert dg.materialize([demo_table, demo_gate], instance=instance).success
    soon = dt.datetime.now(TZ) + dt.timedelta(hours=1)
    assert status(soon)[2] == "passed"
    assert status(before)[2] == "not_run"  # as of before the run: reproducible for the past
    later = soon + dt.timedelta(days=10)
    (row,) = [r for r in comp.build_matrix(controls, inventory, instance, later, tmp_path) if r.article.article == 2]
    assert row.status == "not_run" and "10 天" in " ".join(row.controls[0].details)

    OUTCOME.update(passed=False, severity=dg.AssetCheckSeverity.WARN)
    dg.materialize([demo_table, demo_gate], instance=instance, raise_on_error=False)
    assert status(dt.datetime.now(TZ) + dt.timedelta(hours=1))[2] == "passed"  # a warning does not fail a control
    OUTCOME.update(passed=False, severity=dg.AssetCheckSeverity.ERROR)
    dg.materialize([demo_table, demo_gate], instance=instance, raise_on_error=False)
    now = dt.datetime.now(TZ) + dt.timedelta(hours=1)
    assert status(now)[2] == "failed"
    assert comp.failed_gates(instance, inventory, now, 90)[0]["check"] == "demo_gate"
    OUTCOME.update(passed=True, severity=dg.AssetCheckSeverity.ERROR)


# --------------------------------------------------------------------------------------------- risks

def test_the_risk_list(tmp_path):
    from test_evaluation import build_opdb

    from zqdata import audit

    engine = build_opdb(f"sqlite:///{tmp_path / 'op.sqlite'}")
    key = audit.AuditKey.from_secret("k" * 32)
    for consumer, at in (("zq_rural_bank", "2026-02-20 10:00"), ("zq_rural_bank", "2026-02-21 10:00"),
                         ("intruder", "2026-02-25 10:00"), ("intruder", "2025-06-01 10:00")):
        audit.append_delivery(engine, consumer=consumer, scenario="", product="ops_sme_credit_profile",
                              partition_date=dt.date(2026, 2, 1), outcome="denied", reason="凭证错误 wrong credential",
                              row_count=0, file_sha256="", delivered_at=_t(at), key=key,
                              anchor=tmp_path / "anchor.json")
    reg = load_registry()
    as_of = _t("2026-03-01 06:00")
    overdue = comp.overdue_issues(engine, reg, as_of)
    # I5 open since 2025-01-01, I2 reopened 2025-06-25, I3 open since 2025-12-30 (its acknowledgement came later);
    # I1 verified, I4 superseded, I6 raised after the cutoff
    assert [(i["agency"], i["status"], i["open_since"][:10]) for i in overdue] == [
        ("transport", "open", "2025-01-01"), ("samr", "reopened", "2025-06-25"), ("samr", "open", "2025-12-30")]
    assert overdue[-1]["overdue_hours"] == pytest.approx((as_of - _t("2025-12-30 14:00")).total_seconds() / 3600)
    refused = comp.refused_consumers(engine, reg, as_of, 90)
    # the intruder's attempt of 2025-06-01 is outside the 90 days
    assert [(r["consumer"], r["registered"], r["refused"]) for r in refused] == [
        ("zq_rural_bank", True, 2), ("intruder", False, 1)]
    assert comp.expiring_authorizations(reg, as_of, 30) == []
    soon = comp.expiring_authorizations(reg, _t("2027-04-10 06:00"), 30)
    assert [(a["scenario"], a["days_left"]) for a in soon] == [("sme_credit_profile", 20)]


def test_the_report_is_reproducible(tmp_path):
    from test_evaluation import build_opdb

    engine = build_opdb(f"sqlite:///{tmp_path / 'op.sqlite'}")
    c1 = comp.build_compliance(_loaded(), dg.DagsterInstance.ephemeral(), engine, load_registry(), dt.date(2026, 3, 1),
                               now=_t("2026-03-02 00:00"))
    c2 = comp.build_compliance(_loaded(), dg.DagsterInstance.ephemeral(), engine, load_registry(), dt.date(2026, 3, 1),
                               now=_t("2027-01-01 00:00"))
    r1 = comp.build_compliance_report(c1, generated_at=_t("2026-03-01 06:30"))
    r2 = comp.build_compliance_report(c2, generated_at=_t("2026-05-05 05:05"))
    s1, s2 = "2026-03-01T06:30:00+08:00", "2026-05-05T05:05:00+08:00"
    assert r1.to_html().replace(s1, "") == r2.to_html().replace(s2, "")
    assert r1.to_json().replace(s1.encode(), b"") == r2.to_json().replace(s2.encode(), b"")
    assert r1.content_digest() == r2.content_digest()
    assert len(c1.risks.overdue_issues) == 3 and not c1.provisional
