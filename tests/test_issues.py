"""The quality-issue register in the operational DB (SQLite and PostgreSQL): one issue per fingerprint, lifecycle
open → … → verified / reopened, escalation past SLA, safe concurrent writers."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import traceback

import duckdb
import pytest
from test_lineage import DAY, build_gov_db, default_findings, set_findings

from zqdata import issues, opdb
from zqdata import opdb as opdb_module
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


def _by_rule(db, rule):
    (issue,) = [i for i in issues.list_issues(db) if i.rule == rule]
    return issue


def test_sync_opens_one_issue_per_fingerprint_and_rerun_dedups(gov, opdb, registry):
    r1 = issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    assert len(r1.opened) == 2
    r2 = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(minutes=5))
    assert r2.opened == [] and sorted(r2.updated) == sorted(r1.opened)
    all_issues = issues.list_issues(opdb)
    assert [i.agency for i in all_issues] == ["psb", "samr"]
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    assert psb.fingerprint == issues.fingerprint("resident_population", "accuracy.citizen_id_check", DAY, "psb")
    assert (psb.status, psb.severity, psb.dimension, psb.records_failed, psb.findings_count) == ("open", "error", "accuracy", 2, 2)
    assert psb.partition_date == dt.date.fromisoformat(DAY)
    assert psb.first_seen_at == T0 and psb.last_seen_at == T0 + dt.timedelta(minutes=5)
    assert psb.first_seen_at.utcoffset() == dt.timedelta(hours=8)
    assert psb.trace["sources"][0]["row_numbers"] == [2, 3]
    assert psb.trace["sources"][0]["agency"] == "psb"
    assert [s["row_number"] for s in psb.sample_rows] == [2, 3]
    assert "110105194912310021" not in str(psb.sample_rows)  # detail scrubbed
    assert [e["event"] for e in issues.issue_events(opdb, psb.issue_id)] == ["opened"]
    assert issues.list_issues(opdb, agency="samr", partition_date=DAY, status=["open"])[0].rule == "accuracy.uscc_check"
    assert issues.list_issues(opdb, partition_date="2025-05-02") == []


def test_affected_rows_are_stored_at_sync_from_a_read_only_gov_db(tmp_path, monkeypatch, opdb, registry):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    path = tmp_path / "gov.duckdb"
    build_gov_db(path).close()
    with duckdb.connect(str(path), read_only=True) as ro:  # a write to the gov DB would fail here
        rep = issues.sync_issues(ro, opdb, registry, DAY, now=T0)
    assert len(rep.opened) == 2
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    assert psb.affected_rows == [{"file": f"psb/resident_population/{DAY}/part-0001.jsonl", "rows": [2, 3], "row_count": 2}]
    with duckdb.connect(str(path)) as con:  # the checks rerun: 150 failing rows in the file
        findings = [("psb", "resident_population", "dbt", "accuracy.citizen_id_check", "accuracy", "error",
                     f"psb/resident_population/{DAY}/part-0001.jsonl", rn, None, "citizen_id", "x") for rn in range(1, 151)]
        set_findings(con, DAY, findings)
    with duckdb.connect(str(path), read_only=True) as ro:
        issues.sync_issues(ro, opdb, registry, DAY, now=T0)
    (files,) = issues.get_issue(opdb, psb.issue_id).affected_rows
    assert files["rows"] == list(range(1, 101)) and files["row_count"] == 150


def test_resolved_then_passing_is_verified_then_failing_again_is_reopened(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    issues.acknowledge(opdb, psb.issue_id, by="户政数据组 张工", now=T0)
    issues.resolve(opdb, psb.issue_id, note="已修正并重新交付", now=T0)
    assert issues.get_issue(opdb, psb.issue_id).status == "resolved"
    # Redelivered corrected data: the citizen-id findings disappear, the samr warning stays.
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.verified == [psb.issue_id]
    assert issues.get_issue(opdb, psb.issue_id).status == "verified"
    assert _by_rule(opdb, "accuracy.uscc_check").status == "open"
    # The defect comes back in a later redelivery.
    set_findings(gov, DAY, default_findings())
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=2))
    assert rep.reopened == [psb.issue_id]
    again = issues.get_issue(opdb, psb.issue_id)
    assert (again.status, again.reopen_count, again.verified_at) == ("reopened", 1, None)
    assert again.open_since == T0 + dt.timedelta(hours=2)
    events = issues.issue_events(opdb, psb.issue_id)
    assert [e["event"] for e in events] == ["opened", "acknowledged", "resolved", "verified", "reopened"]
    assert [(e["from_status"], e["to_status"]) for e in events][1:] == [
        ("open", "acknowledged"), ("acknowledged", "resolved"), ("resolved", "verified"), ("verified", "reopened")
    ]
    assert events[1]["actor"] == "户政数据组 张工"


def test_acknowledged_issue_verified_when_findings_disappear(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    samr = _by_rule(opdb, "accuracy.uscc_check")
    issues.acknowledge(opdb, samr.issue_id, by="数据管理科")
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "samr"])
    assert issues.sync_issues(gov, opdb, registry, DAY, now=T0).verified == [samr.issue_id]


def test_no_verification_for_datasets_not_rechecked(gov, opdb, registry):
    """Empty findings for a dataset that quality.scores shows was not evaluated must not verify its issues."""
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    gov.execute("create table quality.scores (partition_date date, agency varchar, dataset varchar, dimension varchar)")
    gov.execute("insert into quality.scores values (?, 'samr', 'enterprise_registry', 'accuracy')", [DAY])
    set_findings(gov, DAY, [])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    assert rep.verified == [_by_rule(opdb, "accuracy.uscc_check").issue_id]
    assert _by_rule(opdb, "accuracy.citizen_id_check").status == "open"


# --------------------------------------------------------------------------- closing on evidence (issue 12, finding 5)

RP_FILE = f"psb/resident_population/{DAY}/part-0001.jsonl"
PSB_RULE = "accuracy.citizen_id_check"


def _catalog(gov, *rules: tuple[str, str, str]) -> None:
    """quality.rule_catalog as the pipeline writes it: the rules evaluated for the partition, passing or not."""
    gov.execute("create table if not exists quality.rule_catalog (partition_date date, dataset varchar, tool varchar,"
                " rule varchar, dimension varchar, severity varchar)")
    gov.execute("delete from quality.rule_catalog where partition_date = ?", [DAY])
    for dataset, tool, rule in rules:
        gov.execute("insert into quality.rule_catalog values (?, ?, ?, ?, 'accuracy', 'error')", [DAY, dataset, tool, rule])


ALL_RULES = (("resident_population", "dbt", PSB_RULE), ("enterprise_registry", "dbt", "accuracy.uscc_check"))


def _redeliver_psb(gov, kind: str, rows: tuple[int, ...] = (1, 2, 3)) -> None:
    """What ingestion leaves for psb's redelivery of the partition: the ODS rows, quarantine and meta.deliveries.

    accepted: the file is accepted with `rows`; quarantined: the whole file is quarantined (column set), its rows are in
    quarantine and none in the ODS; rejected: the delivery is refused (future partition), no row anywhere; empty: an
    accepted file without records."""
    gov.execute("delete from quarantine.rows where _dataset = 'resident_population'")
    gov.execute("delete from meta.deliveries where dataset = 'resident_population'")
    if kind == "quarantined":
        gov.execute("insert into quarantine.rows select _lineage_id, _agency, _dataset, _delivery_file, _row_number,"
                    " _batch_id, _ingested_at, _partition_date, '{}', '字段集合与登记不一致', 'contract.columns',"
                    " 'understandability', null from ods.resident_population")
    gov.execute("delete from ods.resident_population where not list_contains(?, _row_number) or ? <> 'accepted'",
                [list(rows), kind])
    delivered = {"accepted": len(rows), "quarantined": 3, "rejected": 0, "empty": 0}[kind]
    status = {"accepted": "ok", "quarantined": "quarantined", "rejected": "rejected", "empty": "warn"}[kind]
    gov.execute("insert into meta.deliveries (agency, dataset, partition_date, delivery_file, status, rows_delivered,"
                " rows_accepted, rows_quarantined) values ('psb', 'resident_population', ?, ?, ?, ?, ?, ?)",
                [DAY, RP_FILE, status, delivered, delivered if kind == "accepted" else 0,
                 delivered if kind == "quarantined" else 0])


@pytest.mark.parametrize("kind", ["quarantined", "rejected", "empty"])
def test_a_rejected_or_empty_redelivery_verifies_nothing(gov, opdb, registry, kind):
    """The finding is absent because no row reached the rule, not because the rule passed: the issue stays."""
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, PSB_RULE)
    issues.resolve(opdb, psb.issue_id, note="已重新交付", now=T0)
    _redeliver_psb(gov, kind)
    _catalog(gov, *ALL_RULES)  # ingestion and dbt catalogue their rules even when no row reached them
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.verified == [] and rep.superseded == [] and rep.unverified == [psb.issue_id]
    assert issues.get_issue(opdb, psb.issue_id).status == "resolved"
    assert [e["event"] for e in issues.issue_events(opdb, psb.issue_id)] == ["opened", "resolved"]


def test_a_rule_not_evaluated_on_the_partition_verifies_nothing(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    _catalog(gov, ("enterprise_registry", "dbt", "accuracy.uscc_check"))  # the citizen-id rule did not run
    set_findings(gov, DAY, [])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.verified == [_by_rule(opdb, "accuracy.uscc_check").issue_id]
    assert rep.unverified == [_by_rule(opdb, PSB_RULE).issue_id] and _by_rule(opdb, PSB_RULE).status == "open"


def test_a_rule_evaluated_on_the_redelivered_rows_and_passing_verifies(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, PSB_RULE)
    _redeliver_psb(gov, "accepted")  # the same rows, corrected
    _catalog(gov, *ALL_RULES)
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.verified == [psb.issue_id] and rep.superseded == rep.unverified == []
    closed = issues.get_issue(opdb, psb.issue_id)
    assert (closed.status, closed.verified_at) == ("verified", T0 + dt.timedelta(hours=1))
    assert "已执行且通过" in issues.issue_events(opdb, psb.issue_id)[-1]["note"]


def test_rows_the_redelivery_dropped_close_the_issue_as_superseded(gov, opdb, registry):
    """Rows 2 and 3 failed; the redelivery has row 1 only and the rule passes on it: nothing was fixed, the rows are
    gone — superseded, not verified. The rows coming back with the defect reopen the issue."""
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, PSB_RULE)
    _redeliver_psb(gov, "accepted", rows=(1,))
    _catalog(gov, *ALL_RULES)
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert rep.superseded == [psb.issue_id] and rep.verified == rep.unverified == []
    closed = issues.get_issue(opdb, psb.issue_id)
    assert (closed.status, closed.verified_at) == ("superseded", None)
    assert issues.list_issues(opdb, status=["superseded"]) == [closed]
    assert "superseded" in issues.STATUS_CN["superseded"] and "superseded" in issues.CLOSED
    event = issues.issue_events(opdb, psb.issue_id)[-1]
    assert (event["event"], event["from_status"], event["to_status"]) == ("superseded", "open", "superseded")
    assert "已不存在" in event["note"]
    # a later sync does not touch it; the rows and their defect coming back reopen it
    assert issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=2)).superseded == []
    _redeliver_psb(gov, "accepted")
    set_findings(gov, DAY, default_findings())
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=3))
    assert rep.reopened == [psb.issue_id] and issues.get_issue(opdb, psb.issue_id).status == "reopened"


def test_escalation_after_sla_hours_once(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    sla = dt.timedelta(hours=registry.datasets["resident_population"].delivery.sla_hours)
    issues.acknowledge(opdb, _by_rule(opdb, "accuracy.uscc_check").issue_id, by="x")  # acknowledged: not escalated
    assert issues.escalate_overdue(opdb, registry, now=T0 + sla - dt.timedelta(minutes=1)) == []
    assert issues.escalate_overdue(opdb, registry, now=T0 + sla + dt.timedelta(minutes=1)) == [psb.issue_id]
    assert issues.escalate_overdue(opdb, registry, now=T0 + sla + dt.timedelta(hours=1)) == []  # once
    assert issues.get_issue(opdb, psb.issue_id).escalated_at == T0 + sla + dt.timedelta(minutes=1)
    assert issues.issue_events(opdb, psb.issue_id)[-1]["event"] == "escalated"


def test_next_escalation_due_is_the_earliest_sla_deadline(gov, opdb, registry):
    assert issues.next_escalation_due(opdb, registry) is None
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    samr = _by_rule(opdb, "accuracy.uscc_check")
    due_psb = T0 + dt.timedelta(hours=registry.datasets["resident_population"].delivery.sla_hours)
    due_samr = T0 + dt.timedelta(hours=registry.datasets["enterprise_registry"].delivery.sla_hours)
    assert issues.next_escalation_due(opdb, registry) == min(due_psb, due_samr)
    issues.acknowledge(opdb, samr.issue_id, by="x")  # no longer waiting for the agency
    assert issues.next_escalation_due(opdb, registry) == due_psb
    assert issues.escalate_overdue(opdb, registry, now=due_psb - dt.timedelta(microseconds=1)) == []
    assert issues.escalate_overdue(opdb, registry, now=due_psb) == [psb.issue_id]  # due means: escalated from then on
    assert issues.next_escalation_due(opdb, registry) is None


def test_a_night_reads_only_the_issues_old_enough_to_be_overdue(gov, opdb, registry):
    """Open issues pile up; the escalation reads only those open since before the shortest SLA (issue 15)."""
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    shortest = dt.timedelta(hours=min(ds.delivery.sla_hours for ds in registry.datasets.values()))
    with opdb.connect() as conn:
        everyone = issues._overdue_candidates(conn, lock=False)
        early = issues._overdue_candidates(conn, lock=False, registry=registry, at=T0 + shortest - dt.timedelta(seconds=1))
        due = issues._overdue_candidates(conn, lock=False, registry=registry, at=T0 + shortest)
    assert everyone and early == [] and due == everyone


def test_acknowledged_issue_does_not_escalate(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    for i in issues.list_issues(opdb):
        issues.acknowledge(opdb, i.issue_id, by="x")
    assert issues.escalate_overdue(opdb, registry, now=T0 + dt.timedelta(days=3)) == []


@pytest.mark.parametrize(
    ("steps", "bad"),
    [
        ([], lambda c, i: issues.acknowledge(c, i, by=" ")),
        ([], lambda c, i: issues.resolve(c, i, note="")),
        ([lambda c, i: issues.resolve(c, i, note="ok")], lambda c, i: issues.acknowledge(c, i, by="x")),
        ([], lambda c, i: issues.acknowledge(c, "QI-doesnotexist", by="x")),
        ([], lambda c, i: issues.acknowledge(c, "QI-", by="x")),
    ],
)
def test_invalid_actions_are_refused(gov, opdb, registry, steps, bad):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    iid = _by_rule(opdb, "accuracy.uscc_check").issue_id
    for s in steps:
        s(opdb, iid)
    before = issues.issue_events(opdb, iid)
    with pytest.raises(issues.IssueError):
        bad(opdb, iid)
    assert issues.issue_events(opdb, iid) == before  # nothing half-written


def test_issue_found_by_fingerprint_prefix(gov, opdb, registry):
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    psb = _by_rule(opdb, "accuracy.citizen_id_check")
    assert issues.get_issue(opdb, psb.fingerprint[:8]).issue_id == psb.issue_id
    assert issues.get_issue(opdb, psb.issue_id.lower()).issue_id == psb.issue_id


# --------------------------------------------------------------------------- concurrency

N_EXTRA_RULES = 6  # issues the ack/resolve workers share out, besides the two of default_findings


def _extra_findings() -> list[tuple]:
    rp = f"psb/resident_population/{DAY}/part-0001.jsonl"
    return default_findings() + [
        ("psb", "resident_population", "dbt", f"validity.rule_{k}", "validity", "warn", rp, 1, None, "phone", "x")
        for k in range(N_EXTRA_RULES)
    ]


def _worker(url: str, gov_path: str | None, ids: list[str], barrier, results) -> None:
    """In a fresh (spawned) process: try to acknowledge (then resolve) each issue, or sync the partition (gov_path)."""
    try:
        db = opdb.get_engine(url)
        registry = load_registry()
        barrier.wait(timeout=60)
        if gov_path:
            with duckdb.connect(gov_path, read_only=True) as gov:
                for _ in range(4):
                    issues.sync_issues(gov, db, registry, DAY)
                    issues.escalate_overdue(db, registry)
            return
        for iid in ids:
            try:
                issues.acknowledge(db, iid, by="worker")
            except issues.IssueError:
                continue  # another worker acknowledged it first
            results.put(("acknowledged", iid))
            issues.resolve(db, iid, note="已重新交付")  # only who acknowledged resolves: always allowed
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(("error", traceback.format_exc()))
        raise


def test_concurrent_writers_never_fail_and_every_transition_has_its_event(tmp_path, monkeypatch, opdb, registry):
    """3 processes race to acknowledge + resolve the same issues while a 4th syncs the partition (which reopens the
    resolved ones): no "database is locked", no lost update (each event starts from the status the previous left)."""
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    gov_path = tmp_path / "gov.duckdb"
    build_gov_db(gov_path, findings=_extra_findings()).close()
    with duckdb.connect(str(gov_path), read_only=True) as ro:
        issues.sync_issues(ro, opdb, registry, DAY, now=T0)
    ids = [i.issue_id for i in issues.list_issues(opdb)]
    assert len(ids) == 2 + N_EXTRA_RULES
    url = opdb.url.render_as_string(hide_password=False)

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, None, ids[k:] + ids[:k], barrier, results)) for k in range(3)]
    procs.append(ctx.Process(target=_worker, args=(url, str(gov_path), [], barrier, results)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    reported = []
    while not results.empty():
        reported.append(results.get())
    errors = [r for kind, r in reported if kind == "error"]
    assert not alive, "worker hung"
    assert errors == [] and [p.exitcode for p in procs] == [0] * 4, "\n".join(errors)

    acked = [iid for kind, iid in reported if kind == "acknowledged"]
    assert sorted(set(acked)) == sorted(ids)  # every issue was acknowledged by someone
    for iid in ids:
        issue = issues.get_issue(opdb, iid)
        events = issues.issue_events(opdb, iid)
        kinds = [e["event"] for e in events]
        assert kinds[0] == "opened", kinds
        assert kinds.count("acknowledged") == acked.count(iid) == kinds.count("resolved"), kinds
        # Every status change is an event, in order: each starts from the status the previous one left.
        for prev, cur in zip(events, events[1:]):
            assert cur["from_status"] == prev["to_status"], kinds
        assert events[-1]["to_status"] == issue.status
        assert issue.reopen_count == kinds.count("reopened")


# --------------------------------------------------------------------------- CLI


def test_cli_list_ack_resolve_show_without_any_duckdb_file(gov, opdb, registry, tmp_path, monkeypatch, capsys):
    from zqdata.cli import main

    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    iid = _by_rule(opdb, "accuracy.citizen_id_check").issue_id
    gov.close()
    (tmp_path / "gov.duckdb").unlink()
    data = tmp_path / "data"
    monkeypatch.setenv("ZQ_DATA_DIR", str(data))
    monkeypatch.setenv("ZQ_GOV_DB", str(data / "warehouse" / "gov.duckdb"))
    monkeypatch.setenv("ZQ_OPS_DB", str(data / "warehouse" / "ops.duckdb"))
    assert main(["issues", "list", "--status", "open"]) == 0
    out = capsys.readouterr().out
    assert iid in out and "准确性" in out and "共 2 个问题" in out
    assert main(["issues", "ack", iid, "--by", "张工"]) == 0
    assert main(["issues", "resolve", iid, "--note", "已重新交付"]) == 0
    assert main(["issues", "show", iid]) == 0
    out = capsys.readouterr().out
    assert "resolved" in out and "已重新交付" in out and "part-0001.jsonl" in out
    assert main(["issues", "ack", iid, "--by", "x"]) == 1  # resolved cannot be acknowledged: clear error, exit 1
    assert "resolved" in capsys.readouterr().out
    assert issues.get_issue(opdb, iid).acknowledged_by == "张工"  # written to the DB of ZQ_OPDB_URL
    assert list(tmp_path.rglob("*.duckdb")) == []  # no DuckDB file opened (or created) anywhere


def test_cli_sync_reads_the_gov_db_read_only(gov, opdb, registry, tmp_path, monkeypatch, capsys):
    from zqdata.cli import main

    gov.close()
    path = tmp_path / "gov.duckdb"
    monkeypatch.setenv("ZQ_GOV_DB", str(path))
    monkeypatch.setenv("ZQ_SMTP_HOST", "")
    monkeypatch.delenv("ZQ_ALERT_MAILDIR", raising=False)
    for code in ("PSB", "SAMR", "TRANSPORT", "POWER", "WATER", "HRSS", "DATA_BUREAU"):
        monkeypatch.delenv(f"ZQ_WEBHOOK_{code}", raising=False)
    mtime = path.stat().st_mtime_ns
    assert main(["issues", "sync", "--partition", DAY, "--notify"]) == 0
    out = capsys.readouterr().out
    assert "新增 2" in out and "Maildir" in out
    assert len(issues.list_issues(opdb, status=["notified"])) == 2
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.setenv("ZQ_GOV_DB", str(tmp_path / "missing.duckdb"))
    with pytest.raises(SystemExit, match="gov DB not found"):
        main(["issues", "sync", "--partition", DAY])
    assert not (tmp_path / "missing.duckdb").exists()


FILE_RULE = "delivery.checksum_mismatch"


def test_a_file_level_issue_counts_no_record_and_says_so(gov, opdb, registry):
    """A finding about a whole delivery file (no row) is not "1 条记录": the register counts 0 records, and the
    event and the agency's message say it is a file- or dataset-level problem."""
    from zqdata import alerting

    set_findings(gov, DAY, [("psb", "resident_population", "delivery", FILE_RULE, "accuracy", "error", RP_FILE, None,
                             None, None, "清单摘要与文件不符")])
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    issue = _by_rule(opdb, FILE_RULE)
    assert issue.records_failed == 0 and issue.findings_count == 1
    assert "1 条记录" not in (issues.issue_events(opdb, issue.issue_id)[0]["note"] or "")
    text = alerting.build_message(registry, issue, "opened")[1]
    assert "影响记录：1 条" not in text and "整个交付文件或数据集" in text


def test_a_contract_rule_is_verified_on_a_file_read_despite_a_file_level_error(gov, opdb, registry):
    """A redelivery whose file status is `error` for a file-level finding (e.g. a count mismatch) still had its rows
    read and checked by the contract rules: their issues verify."""
    rule = "contract.format.mobile"
    finding = ("psb", "resident_population", "pandera", rule, "accuracy", "warn", RP_FILE, 2,
               None, "phone", "手机号格式不符")
    set_findings(gov, DAY, [finding])
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    issue = _by_rule(opdb, rule)
    _redeliver_psb(gov, "accepted")
    gov.execute("update meta.deliveries set status = 'error' where dataset = 'resident_population'")
    _catalog(gov, ("resident_population", "pandera", rule))
    set_findings(gov, DAY, [("psb", "resident_population", "delivery", "delivery.count_mismatch", "completeness",
                             "error", RP_FILE, None, None, None, "记录数与清单不符")])
    rep = issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert issue.issue_id in rep.verified, (rep.unverified, rep.superseded)


def test_next_escalation_due_is_the_earliest_issue_of_each_dataset(gov, opdb, registry):
    """Each dataset's earliest waiting issue sets its deadline (found per dataset in SQL: open issues pile up)."""
    day2 = "2025-05-02"
    set_findings(gov, day2, default_findings(day2))
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    issues.sync_issues(gov, opdb, registry, day2, now=T0 - dt.timedelta(hours=1))  # opened earlier
    issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=2))  # seen again: its clock stays
    slas = [dt.timedelta(hours=registry.datasets[d].delivery.sla_hours)
            for d in ("resident_population", "enterprise_registry")]
    assert issues.next_escalation_due(opdb, registry) == T0 - dt.timedelta(hours=1) + min(slas)


def test_an_operational_db_made_before_an_index_gets_it(tmp_path):
    """A deployed operational DB gets the indexes added since its tables were made (create_all makes tables only)."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = sa.create_engine(url)
    opdb.metadata.create_all(old)
    with old.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_quality_issues_open")
        conn.exec_driver_sql("DROP INDEX ix_notifications_status")
    old.dispose()
    engine = opdb.get_engine(url)
    names = {i["name"] for t in ("quality_issues", "notifications") for i in sa.inspect(engine).get_indexes(t)}
    assert {"ix_quality_issues_open", "ix_notifications_status"} <= names


def test_the_nightly_alerting_reads_open_issues_from_an_index(opdb, registry):
    """The messages due, the escalation candidates, the next deadline and the outbox counts are answered from an index,
    never by reading the issues whole (each carries its trace: 16,000 open issues after a simulated year were read
    several times a night, ~0.2 s a query)."""
    import sqlalchemy as sa

    from zqdata import alerting

    if opdb.dialect.name != "sqlite":
        pytest.skip("the query plan is SQLite's (PostgreSQL plans by its statistics)")
    c, n = issues.issues_t.c, opdb_module.notifications.c
    queries = {
        "messages due": alerting._with_missing_messages(registry, alerting.AlertSettings.from_env()),
        "escalation": sa.select(c.fingerprint, c.dataset, c.status, c.open_since).where(*issues._WAITING,
                                                                                     c.open_since <= T0),
        "next deadline": sa.select(c.dataset, sa.func.min(c.open_since)).where(*issues._WAITING).group_by(c.dataset),
        "outbox": sa.select(n.status, sa.func.count()).group_by(n.status),
    }
    with opdb.connect() as conn:
        for name, q in queries.items():
            compiled = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                        tuple(None for _ in compiled.positiontup or ())).all()
            reads = [row[-1] for row in plan if row[-1].startswith(("SCAN", "SEARCH"))]
            assert reads and all("INDEX" in d for d in reads), (name, reads)
            assert all("COVERING INDEX" in d for d in reads if "quality_issues" in d or name == "outbox"), (name, reads)
