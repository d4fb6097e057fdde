"""Annual evaluation of source agencies (Art. 22): the scorecard's numbers equal a hand computation on a small fixture
(records-weighted pass rates, deliveries vs SLA, medians of issue handling, composite, ranking); the report is the same
bytes when regenerated (but its generation time) and is published once; the Dagster asset wires it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest
import sqlalchemy as sa

from zqdata import opdb
from zqdata.governance import evaluation as ev_mod
from zqdata.governance.evaluation import build_evaluation_report, evaluate_agencies
from zqdata.governance.reporting import current_report, publish_report
from zqdata.governance.weights import load_evaluation_config
from zqdata.ingest import DELIVERY_COLUMNS
from zqdata.quality.dimensions import DIMENSION_KEYS
from zqdata.quality.scores import ensure_quality_tables
from zqdata.registry import RegistryError, load_registry
from zqdata.settings import TZ
from zqdata.storage import LocalObjectStore

YEAR = 2025


def _t(text: str) -> dt.datetime:
    """'2025-06-02 08:00' in Asia/Shanghai."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=TZ)


# --------------------------------------------------------------------------------------------- the fixture

# (dataset, day, records checked, {dimension: records failed})
SCORES = [
    ("enterprise_registry", "2025-06-01", 100, {"accuracy": 10, "completeness": 5}),
    ("enterprise_registry", "2025-06-02", 300, {"consistency": 30}),
    ("enterprise_registry", "2025-07-01", 0, {}),  # nothing delivered
    ("bus_card_swipes", "2025-06-01", 1000, {"accuracy": 50, "timeliness": 100}),
    ("electricity_usage", "2025-06-01", 0, {}),  # nothing delivered: no quality component
    ("enterprise_registry", "2024-12-31", 50, {"accuracy": 50}),  # another year: not counted
]
# (dataset, day, status, delivered_at (manifest), arrived_at (store))
DELIVERIES = [
    ("enterprise_registry", "2025-06-01", "ok", "2025-06-02 02:00", "2025-06-02 03:00"),  # SLA 6 h: on time
    ("enterprise_registry", "2025-06-02", "warn", "2025-06-03 05:00", "2025-06-03 09:00"),  # store says late
    ("enterprise_registry", "2025-07-01", "missing", None, None),
    ("bus_card_swipes", "2025-06-01", "ok", "2025-06-02 01:00", None),  # on time by the manifest, but see findings
    ("bus_card_swipes", "2025-06-02", "ok", None, "2025-06-03 02:00"),  # SLA 4 h: on time
    ("electricity_usage", "2025-06-01", "missing", None, None),
]
# the nightly timeliness check judged bus_card_swipes 2025-06-01 late by the store's time (not recorded in meta)
LATE_FINDINGS = [("transport", "bus_card_swipes", "2025-06-01")]
# issue key -> (agency, dataset, partition day, [(event, time)])
ISSUES = {
    "I1": ("samr", "enterprise_registry", "2025-06-01",
           [("opened", "2025-06-02 08:00"), ("notified", "2025-06-02 08:05"), ("acknowledged", "2025-06-02 20:00"),
            ("resolved", "2025-06-04 08:00"), ("verified", "2025-06-05 08:00")]),
    "I2": ("samr", "enterprise_registry", "2025-06-02",
           [("opened", "2025-06-03 08:00"), ("acknowledged", "2025-06-05 08:00"), ("verified", "2025-06-20 08:00"),
            ("reopened", "2025-06-25 08:00")]),
    "I3": ("samr", "enterprise_registry", "2025-12-30",
           [("opened", "2025-12-30 08:00"), ("acknowledged", "2026-03-02 08:00")]),  # acknowledged after the cutoff
    "I4": ("transport", "bus_card_swipes", "2025-06-01",
           [("opened", "2025-06-02 09:00"), ("acknowledged", "2025-06-02 10:00"), ("superseded", "2025-06-03 09:00")]),
    "I5": ("transport", "bus_card_swipes", "2024-12-31", [("opened", "2025-01-01 09:00")]),  # last year's data
    "I6": ("transport", "bus_card_swipes", "2025-12-31", [("opened", "2026-03-05 09:00")]),  # raised after the cutoff
}
STATUS_AFTER = {"opened": "open", "notified": "notified", "acknowledged": "acknowledged", "resolved": "resolved",
                "verified": "verified", "superseded": "superseded", "reopened": "reopened", "escalated": None}


def build_gov(path: Path) -> None:
    """A small gov DuckDB: quality.scores, meta.deliveries, quality.findings and quality.gate_decisions."""
    reg = load_registry()
    con = duckdb.connect(str(path))
    try:
        ensure_quality_tables(con)
        con.execute("create schema if not exists meta")
        con.execute(f"create table meta.deliveries ({', '.join(f'{n} {t}' for n, t in DELIVERY_COLUMNS)})")
        for ds, day, checked, failed in SCORES:
            for dim in DIMENSION_KEYS:
                f = failed.get(dim, 0)
                con.execute("insert into quality.scores values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [day, reg.datasets[ds].agency, ds, dim, checked, f, 3, int(f > 0),
                             None if checked == 0 else 1 - f / checked])
        for ds, day, status, delivered, arrived in DELIVERIES:
            con.execute("insert into meta.deliveries (partition_date, agency, dataset, delivery_file, status, "
                        "delivered_at, arrived_at) values (?, ?, ?, ?, ?, ?, ?)",
                        [day, reg.datasets[ds].agency, ds, None if status == "missing" else f"{ds}/{day}/part-1.csv",
                         status, delivered and _t(delivered), arrived and _t(arrived)])
        for agency, ds, day in LATE_FINDINGS:
            con.execute("insert into quality.findings (partition_date, agency, dataset, tool, rule, dimension, "
                        "severity, delivery_file, detail) values (?, ?, ?, 'delivery', 'delivery.late', 'timeliness', 'warn', ?, "
                        "'逾期交付')", [day, agency, ds, f"{ds}/{day}/"])
        con.execute("insert into quality.gate_decisions values "
                    "('2025-06-02', 'samr', 'enterprise_registry', false, 0.1, 0.05, '错误级记录 10%', now()), "
                    "('2025-06-01', 'samr', 'enterprise_registry', true, 0.0, 0.05, null, now())")
    finally:
        con.close()


def build_opdb(url: str) -> sa.Engine:
    """A small operational DB: the issues above with their events."""
    from zqdata.issues import fingerprint, issue_id_of

    engine = opdb.get_engine(url)
    with opdb.transaction(engine) as conn:
        for key, (agency, ds, day, events) in ISSUES.items():
            fp = fingerprint(ds, f"rule.{key}", day, agency)
            first = _t(events[0][1])
            conn.execute(sa.insert(opdb.quality_issues).values(
                fingerprint=fp, issue_id=issue_id_of(fp), partition_date=dt.date.fromisoformat(day), agency=agency,
                dataset=ds, rule=f"rule.{key}", dimension="accuracy", severity="error", status="open",
                first_seen_at=first, open_since=first, reopen_count=0, updated_at=first))
            status = None
            for event, at in events:
                to = STATUS_AFTER[event] or status
                conn.execute(sa.insert(opdb.issue_events).values(
                    fingerprint=fp, issue_id=issue_id_of(fp), event=event, from_status=status, to_status=to,
                    event_at=_t(at)))
                status = to
            conn.execute(sa.update(opdb.quality_issues).where(opdb.quality_issues.c.fingerprint == fp)
                         .values(status=status))
    return engine


@pytest.fixture
def fixture_dbs(tmp_path):
    gov_path = tmp_path / "gov.duckdb"
    build_gov(gov_path)
    engine = build_opdb(f"sqlite:///{tmp_path / 'op.sqlite'}")
    gov = duckdb.connect(str(gov_path), read_only=True)
    yield gov, engine
    gov.close()


def _evaluate(gov, engine, now=None):
    return evaluate_agencies(gov, engine, load_registry(), load_evaluation_config(), YEAR,
                             now=now or _t("2026-06-01 00:00"))


# --------------------------------------------------------------------------------------------- the numbers

def test_scorecard_equals_a_hand_computation(fixture_dbs):
    gov, engine = fixture_dbs
    ev = _evaluate(gov, engine)
    cards = {c.agency: c for c in ev.scorecards}
    samr, transport, power = cards["samr"], cards["transport"], cards["power"]
    assert not ev.provisional and ev.as_of == _t("2026-03-01 06:00")

    # quality: 1 - Σ failed / Σ checked over the year (2024-12-31 left out)
    assert samr.quality["accuracy"] == (400, 10)
    assert samr.pass_rate("accuracy") == pytest.approx(1 - 10 / 400)
    assert samr.pass_rate("completeness") == pytest.approx(1 - 5 / 400)
    assert samr.pass_rate("consistency") == pytest.approx(1 - 30 / 400)
    assert samr.pass_rate("timeliness") == 1.0
    assert transport.pass_rate("accuracy") == pytest.approx(0.95)
    assert transport.pass_rate("timeliness") == pytest.approx(0.90)
    assert power.pass_rate("accuracy") is None  # nothing checked
    # monthly trend over the six dimensions: June = 1 - 45 / (6 × 400); July: nothing checked
    assert samr.monthly == {"2025-06": (2400, 45), "2025-07": (0, 0)}

    # deliveries vs SLA: samr on time, late (store time after day end + 6 h), missing
    d = samr.delivery
    assert (d.expected, d.on_time, d.late, d.missing, d.pending) == (3, 1, 1, 1, 0)
    assert d.late_items == [("enterprise_registry", "2025-06-02")]
    assert d.missing_items == [("enterprise_registry", "2025-07-01")]
    # transport: 06-01 on time by the manifest but the nightly check recorded delivery.late; 06-02 on time
    t = transport.delivery
    assert (t.expected, t.on_time, t.late, t.missing) == (2, 1, 1, 0)
    assert t.late_items == [("bus_card_swipes", "2025-06-01")]
    assert (power.delivery.expected, power.delivery.missing) == (1, 1)

    # issue handling, rebuilt from the events up to the cutoff
    i = samr.issues
    assert (i.raised, i.acknowledged, i.verified, i.reopened_issues, i.reopen_events) == (3, 2, 2, 1, 1)
    assert i.median_ack_hours == pytest.approx((12 + 48) / 2)  # I1 12 h, I2 48 h; I3 acknowledged after the cutoff
    assert i.median_fix_hours == pytest.approx((72 + 408) / 2)  # I1 3 days, I2 17 days
    assert (i.ack_within_target, i.fixed_within_target) == (1, 1)  # targets 24 h and 168 h
    j = transport.issues
    assert (j.raised, j.acknowledged, j.verified, j.superseded, j.reopened_issues) == (1, 1, 0, 1, 0)
    assert j.median_ack_hours == pytest.approx(1.0) and j.median_fix_hours is None

    # components and composite with registry/evaluation.yaml's weights
    w = {"understandability": .10, "accuracy": .15, "standardization": .10, "consistency": .10, "completeness": .10,
         "timeliness": .10, "delivery": .15, "issue_handling": .20}
    samr_parts = {"understandability": 1, "accuracy": 1 - 10 / 400, "standardization": 1, "consistency": 1 - 30 / 400,
                  "completeness": 1 - 5 / 400, "timeliness": 1, "delivery": (1 + 0.5 * 1) / 3,
                  "issue_handling": (1 + 1 + (3 - 1)) / 9}
    transport_parts = {"understandability": 1, "accuracy": .95, "standardization": 1, "consistency": 1,
                       "completeness": 1, "timeliness": .9, "delivery": (1 + 0.5 * 1) / 2,
                       "issue_handling": (1 + 0 + 1) / 3}
    assert samr.components == pytest.approx(samr_parts)
    assert samr.composite == pytest.approx(sum(w[k] * v for k, v in samr_parts.items()))  # 0.80144
    assert transport.composite == pytest.approx(sum(w[k] * v for k, v in transport_parts.items()))  # 0.87833
    # power: no quality data (left out, weights rescaled), delivery 0, no issue raised
    assert power.left_out == list(DIMENSION_KEYS)
    assert power.composite == pytest.approx((.15 * 0 + .20 * 1) / (.15 + .20))

    # ranking: transport, samr, power; agencies without any data are listed unranked
    assert [(c.agency, c.rank) for c in ev.scorecards[:3]] == [("transport", 1), ("samr", 2), ("power", 3)]
    assert {c.agency for c in ev.scorecards[3:]} == {"data_bureau", "hrss", "psb", "water"}
    assert all(c.rank is None and c.composite is None for c in ev.scorecards[3:])


def test_equal_scores_share_a_rank():
    cards = [ev_mod.AgencyScorecard(a, a, []) for a in ("b", "a", "c")]
    for c, score in zip(cards, (0.9, 0.9, 0.5)):
        c.composite = score
    ranked = ev_mod.rank(cards)
    assert [(c.agency, c.rank) for c in ranked] == [("a", 1), ("b", 1), ("c", 3)]


def test_before_the_cutoff_the_evaluation_is_provisional(fixture_dbs):
    gov, engine = fixture_dbs
    ev = _evaluate(gov, engine, now=_t("2025-06-02 07:00"))
    samr = next(c for c in ev.scorecards if c.agency == "samr")
    assert ev.provisional and ev.as_of == _t("2025-06-02 07:00")
    # 06-02 and 07-01 not delivered as of then (the 06-02 file arrived later) and their deadlines not passed: pending
    d = samr.delivery
    assert (d.on_time, d.late, d.missing, d.pending) == (1, 0, 0, 2)
    assert samr.issues.raised == 0  # nothing raised yet at 07:00


@pytest.mark.parametrize("change, message", [
    (lambda d: d["evaluation"]["weights"].update(delivery=0.5), "sum to 1"),
    (lambda d: d["evaluation"]["weights"]["quality"].pop("accuracy"), "six Art. 20 dimensions"),
    (lambda d: d["evaluation"]["weights"]["quality"].update(accuracy=-0.15, completeness=0.4), "negative"),
    (lambda d: d["evaluation"]["delivery"].update(late_credit=2), "late_credit"),
])
def test_weights_are_validated_at_load(tmp_path, change, message):
    import yaml

    from zqdata.settings import repo_root

    doc = yaml.safe_load((repo_root() / "registry" / "evaluation.yaml").read_text(encoding="utf-8"))
    change(doc)
    (tmp_path / "evaluation.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RegistryError, match=message):
        load_evaluation_config(tmp_path)


# --------------------------------------------------------------------------------------------- the report

def test_the_report_is_reproducible_and_published_once(fixture_dbs, tmp_path):
    gov, engine = fixture_dbs
    first = build_evaluation_report(_evaluate(gov, engine), generated_at=_t("2026-03-01 06:30"))
    again = build_evaluation_report(_evaluate(gov, engine, now=_t("2027-01-01 00:00")),
                                    generated_at=_t("2026-09-09 09:09"))
    stamp1, stamp2 = "2026-03-01T06:30:00+08:00", "2026-09-09T09:09:00+08:00"
    for render in ("to_html", "to_markdown"):
        a, b = getattr(first, render)(), getattr(again, render)()
        assert stamp1 in a and a != b and a.replace(stamp1, "") == b.replace(stamp2, "")
    assert first.to_json().replace(stamp1.encode(), b"") == again.to_json().replace(stamp2.encode(), b"")
    data = json.loads(first.to_json())
    assert data["data"]["scorecards"][0]["agency"] == "transport"
    assert data["data"]["scorecards"][1]["issues"]["median_hours_to_acknowledge"] == 30.0

    store = LocalObjectStore(tmp_path / "published")
    p1 = publish_report(store, first)
    p2 = publish_report(store, again)
    assert p1.prefix == p2.prefix and p1.prefix.startswith("reports/evaluation/2025/") and not p1.reused and p2.reused
    served = json.loads(current_report(store, "evaluation", "2025"))
    assert served["generated_at"] == stamp1  # the folder is never rewritten
    html = current_report(store, "evaluation", "2025", "report.html").decode("utf-8")
    assert html.count("<svg") == 3 and "default-src 'none'" in html and "http" not in html.split("<body>")[1].replace(
        "http://www.w3.org", "")


def test_the_dagster_asset_publishes_the_evaluation(fixture_dbs, tmp_path, monkeypatch):
    import dagster as dg

    from assets.governance.reports import EVALUATION_KEY, build_evaluation_asset
    from orchestration.resources import WarehouseResource

    gov, engine = fixture_dbs
    gov.close()
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZQ_OPDB_URL", str(engine.url))
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    monkeypatch.setenv("ZQ_STORE_BACKEND", "local")
    result = dg.materialize([build_evaluation_asset()], partition_key="2025",
                            resources={"warehouse": WarehouseResource(gov_db=str(tmp_path / "gov.duckdb"))})
    assert result.success
    meta = result.asset_materializations_for_node("governance__agency_evaluation")[0].metadata
    assert meta["agencies_ranked"].value == 3 and meta["late_deliveries"].value == 2
    assert "transport" in meta["summary"].value or "交通" in meta["summary"].value
    assert Path(meta["report_html"].value).is_file()
    assert meta["report_prefix"].value.startswith("reports/evaluation/2025/")
    assert EVALUATION_KEY.to_user_string() == "governance/agency_evaluation"
