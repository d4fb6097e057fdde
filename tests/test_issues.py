"""The quality-issue register: one issue per fingerprint, lifecycle open → … → verified / reopened, escalation past SLA."""

from __future__ import annotations

import datetime as dt

import pytest
from test_lineage import DAY, build_gov_db, default_findings, set_findings

from zqdata import issues
from zqdata.registry import load_registry
from zqdata.settings import TZ

T0 = dt.datetime(2025, 5, 2, 3, 0, tzinfo=TZ)


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture
def gov(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    con = build_gov_db(tmp_path / "gov.duckdb")
    yield con
    con.close()


def _by_rule(con, rule):
    (issue,) = [i for i in issues.list_issues(con) if i.rule == rule]
    return issue


def test_sync_opens_one_issue_per_fingerprint_and_rerun_dedups(gov, registry):
    r1 = issues.sync_issues(gov, registry, DAY, now=T0)
    assert len(r1.opened) == 2
    r2 = issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(minutes=5))
    assert r2.opened == [] and sorted(r2.updated) == sorted(r1.opened)
    all_issues = issues.list_issues(gov)
    assert len(all_issues) == 2
    psb = _by_rule(gov, "accuracy.citizen_id_check")
    assert psb.fingerprint == issues.fingerprint("resident_population", "accuracy.citizen_id_check", DAY, "psb")
    assert (psb.status, psb.severity, psb.dimension, psb.records_failed, psb.findings_count) == ("open", "error", "accuracy", 2, 2)
    assert psb.trace["sources"][0]["row_numbers"] == [2, 3]
    assert psb.trace["sources"][0]["agency"] == "psb"
    assert [s["row_number"] for s in psb.sample_rows] == [2, 3]
    assert "110105194912310021" not in str(psb.sample_rows)  # detail scrubbed
    assert [e["event"] for e in issues.issue_events(gov, psb.issue_id)] == ["opened"]


def test_resolved_then_passing_is_verified_then_failing_again_is_reopened(gov, registry):
    issues.sync_issues(gov, registry, DAY, now=T0)
    psb = _by_rule(gov, "accuracy.citizen_id_check")
    issues.acknowledge(gov, psb.issue_id, by="户政数据组 张工", now=T0)
    issues.resolve(gov, psb.issue_id, note="已修正并重新交付", now=T0)
    assert issues.get_issue(gov, psb.issue_id).status == "resolved"
    # Redelivered corrected data: the citizen-id findings disappear, the samr warning stays.
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])
    rep = issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.verified == [psb.issue_id]
    assert issues.get_issue(gov, psb.issue_id).status == "verified"
    assert _by_rule(gov, "accuracy.uscc_check").status == "open"
    # The defect comes back in a later redelivery.
    set_findings(gov, DAY, default_findings())
    rep = issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(hours=2))
    assert rep.reopened == [psb.issue_id]
    again = issues.get_issue(gov, psb.issue_id)
    assert (again.status, again.reopen_count) == ("reopened", 1)
    events = [e["event"] for e in issues.issue_events(gov, psb.issue_id)]
    assert events == ["opened", "acknowledged", "resolved", "verified", "reopened"]


def test_acknowledged_issue_verified_when_findings_disappear(gov, registry):
    issues.sync_issues(gov, registry, DAY, now=T0)
    samr = _by_rule(gov, "accuracy.uscc_check")
    issues.acknowledge(gov, samr.issue_id, by="数据管理科")
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "samr"])
    assert issues.sync_issues(gov, registry, DAY, now=T0).verified == [samr.issue_id]


def test_no_verification_for_datasets_not_rechecked(gov, registry):
    """Empty findings for a dataset that quality.scores shows was not evaluated must not verify its issues."""
    issues.sync_issues(gov, registry, DAY, now=T0)
    gov.execute("create table quality.scores (partition_date date, agency varchar, dataset varchar, dimension varchar)")
    gov.execute("insert into quality.scores values (?, 'samr', 'enterprise_registry', 'accuracy')", [DAY])
    set_findings(gov, DAY, [])
    rep = issues.sync_issues(gov, registry, DAY, now=T0)
    assert rep.verified == [_by_rule(gov, "accuracy.uscc_check").issue_id]
    assert _by_rule(gov, "accuracy.citizen_id_check").status == "open"


def test_escalation_after_sla_hours_once(gov, registry):
    issues.sync_issues(gov, registry, DAY, now=T0)
    psb = _by_rule(gov, "accuracy.citizen_id_check")
    sla = dt.timedelta(hours=registry.datasets["resident_population"].delivery.sla_hours)
    issues.acknowledge(gov, _by_rule(gov, "accuracy.uscc_check").issue_id, by="x")  # acknowledged: not escalated
    assert issues.escalate_overdue(gov, registry, now=T0 + sla - dt.timedelta(minutes=1)) == []
    assert issues.escalate_overdue(gov, registry, now=T0 + sla + dt.timedelta(minutes=1)) == [psb.issue_id]
    assert issues.escalate_overdue(gov, registry, now=T0 + sla + dt.timedelta(hours=1)) == []  # once
    assert issues.get_issue(gov, psb.issue_id).escalated_at is not None
    assert issues.issue_events(gov, psb.issue_id)[-1]["event"] == "escalated"


def test_acknowledged_issue_does_not_escalate(gov, registry):
    issues.sync_issues(gov, registry, DAY, now=T0)
    for i in issues.list_issues(gov):
        issues.acknowledge(gov, i.issue_id, by="x")
    assert issues.escalate_overdue(gov, registry, now=T0 + dt.timedelta(days=3)) == []


@pytest.mark.parametrize(
    ("steps", "bad"),
    [
        ([], lambda c, i: issues.acknowledge(c, i, by=" ")),
        ([], lambda c, i: issues.resolve(c, i, note="")),
        ([lambda c, i: issues.resolve(c, i, note="ok")], lambda c, i: issues.acknowledge(c, i, by="x")),
        ([], lambda c, i: issues.acknowledge(c, "QI-doesnotexist", by="x")),
    ],
)
def test_invalid_actions_are_refused(gov, registry, steps, bad):
    issues.sync_issues(gov, registry, DAY, now=T0)
    iid = _by_rule(gov, "accuracy.uscc_check").issue_id
    for s in steps:
        s(gov, iid)
    with pytest.raises(issues.IssueError):
        bad(gov, iid)


def test_cli_list_ack_resolve_show(gov, registry, tmp_path, monkeypatch, capsys):
    from zqdata.cli import main

    issues.sync_issues(gov, registry, DAY, now=T0)
    iid = _by_rule(gov, "accuracy.citizen_id_check").issue_id
    gov.close()
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "gov.duckdb"))
    assert main(["issues", "list", "--status", "open"]) == 0
    out = capsys.readouterr().out
    assert iid in out and "准确性" in out
    assert main(["issues", "ack", iid, "--by", "张工"]) == 0
    assert main(["issues", "resolve", iid, "--note", "已重新交付"]) == 0
    assert main(["issues", "show", iid]) == 0
    out = capsys.readouterr().out
    assert "resolved" in out and "已重新交付" in out and "part-0001.jsonl" in out
    assert main(["issues", "ack", iid, "--by", "x"]) == 1  # resolved cannot be acknowledged: clear error, exit 1
