"""Alerts to the responsible agency over a real SMTP server (aiosmtpd) and a real HTTP server, both on loopback."""

from __future__ import annotations

import datetime as dt
import logging

import dagster as dg
import pytest
from conftest import _free_port
from test_lineage import DAY, build_gov_db, default_findings, set_findings

from zqdata import alerting, issues
from zqdata.registry import load_registry
from zqdata.settings import TZ

T0 = dt.datetime(2025, 5, 2, 3, 0, tzinfo=TZ)
AGENCIES = ("psb", "samr")


@pytest.fixture
def env(tmp_path, monkeypatch, smtp_server, http_server):
    ctl, _ = smtp_server
    url, _ = http_server
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZQ_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ZQ_SMTP_PORT", str(ctl.port))
    monkeypatch.setenv("ZQ_SMTP_FROM", "zq-platform@zwsj.zhaoqing.example")
    monkeypatch.setenv("ZQ_ALERT_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("ZQ_ALERT_TIMEOUT_SECONDS", "5")
    for code in AGENCIES:
        monkeypatch.setenv(f"ZQ_WEBHOOK_{code.upper()}", f"{url}/hook/{code}")
    for other in ("TRANSPORT", "POWER", "WATER", "HRSS", "DATA_BUREAU"):
        monkeypatch.delenv(f"ZQ_WEBHOOK_{other}", raising=False)
    return monkeypatch


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture
def gov(tmp_path):
    con = build_gov_db(tmp_path / "gov.duckdb")
    yield con
    con.close()


def _mail_by_agency(box, registry) -> dict[str, list]:
    out: dict[str, list] = {}
    addr = {a.contact.email: code for code, a in registry.agencies.items()}
    for m in box.messages:
        out.setdefault(addr[m["To"]], []).append(m)
    return out


def test_each_agency_gets_exactly_one_message_per_issue_and_channel_with_trace(env, gov, registry, smtp_server, http_server):
    _, box = smtp_server
    _, hooks = http_server
    issues.sync_issues(gov, registry, DAY, now=T0)
    rep = alerting.notify_issues(gov, registry, now=T0)
    assert rep.failed == [] and len(rep.sent) == 4  # 2 issues × (email + webhook)

    mails = _mail_by_agency(box, registry)
    assert sorted(mails) == sorted(AGENCIES) and all(len(v) == 1 for v in mails.values())
    psb_mail = mails["psb"][0]
    body = psb_mail.get_content()
    assert "准确性" in psb_mail["Subject"] and registry.agencies["psb"].name in psb_mail["Subject"]
    for expected in (
        "准确性",  # Art. 20 dimension in Chinese
        f"psb/resident_population/{DAY}/part-0001.jsonl：第 2-3 行",  # delivery file and rows
        "逐级溯源",  # the trace
        "gov/ods/resident_population",
        f"landing/psb/resident_population/{DAY}/",  # what to do
        "zq issues ack",
    ):
        assert expected in body, expected
    assert "110105194912310021" not in body and "李四" not in body  # no personal data in the alert

    assert sorted(p for p, _ in hooks) == ["/hook/psb", "/hook/samr"]
    payload = dict(hooks)["/hook/samr"]
    assert payload["agency"] == "samr" and payload["dimension_cn"].startswith("准确性")
    assert payload["delivery_files"] == [{"file": f"samr/enterprise_registry/{DAY}/part-0001.csv", "rows": [2], "row_count": 1}]
    assert payload["trace"]["sources"][0]["row_numbers"] == [2]
    assert {i.status for i in issues.list_issues(gov)} == {"notified"}

    # Re-running the checks and the sensor for the same partition sends nothing new.
    issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(minutes=10))
    again = alerting.notify_issues(gov, registry, now=T0 + dt.timedelta(minutes=10))
    assert again.enqueued == [] and again.sent == []
    assert len(box.messages) == 2 and len(hooks) == 2


def test_unreachable_webhook_is_retried_recorded_and_sent_later(env, gov, registry, http_server):
    url, hooks = http_server
    env.setenv("ZQ_WEBHOOK_SAMR", f"http://127.0.0.1:{_free_port()}/hook/samr")  # nothing listens there
    env.setenv("ZQ_ALERT_RETRIES", "3")
    waits: list[float] = []
    issues.sync_issues(gov, registry, DAY, now=T0)
    rep = alerting.notify_issues(gov, registry, now=T0, sleep=waits.append)
    assert len(rep.failed) == 1
    nid, error = rep.failed[0]
    assert "Connection refused" in error or "URLError" in error
    assert waits == [0.01, 0.02]  # exponential backoff between the 3 attempts
    row = gov.execute("select status, attempts, last_error from governance.notifications where notification_id = ?", [nid]).fetchone()
    assert row[0] == "failed" and row[1] == 3 and row[2]
    attempts = gov.execute("select attempt, ok from governance.notification_attempts where notification_id = ? order by attempt", [nid]).fetchall()
    assert attempts == [(1, False), (2, False), (3, False)]

    # Next tick: still down → retried again, never dropped.
    alerting.notify_issues(gov, registry, now=T0, sleep=waits.append)
    assert gov.execute("select attempts from governance.notifications where notification_id = ?", [nid]).fetchone()[0] == 6
    # The agency's endpoint is back: the same message goes out once.
    env.setenv("ZQ_WEBHOOK_SAMR", f"{url}/hook/samr")
    rep = alerting.notify_issues(gov, registry, now=T0, sleep=waits.append)
    assert rep.sent == [nid]
    assert [p for p, _ in hooks].count("/hook/samr") == 1
    assert gov.execute("select status, attempts from governance.notifications where notification_id = ?", [nid]).fetchone() == ("sent", 7)


def test_verified_then_reopened_issue_is_notified_once_more(env, gov, registry, smtp_server, http_server):
    _, box = smtp_server
    _, hooks = http_server
    issues.sync_issues(gov, registry, DAY, now=T0)
    alerting.notify_issues(gov, registry, now=T0)
    psb = next(i for i in issues.list_issues(gov) if i.agency == "psb")
    issues.resolve(gov, psb.issue_id, note="已重新交付")
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])  # corrected redelivery
    issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert issues.get_issue(gov, psb.issue_id).status == "verified"
    assert alerting.notify_issues(gov, registry).enqueued == []  # verified: nothing to say
    set_findings(gov, DAY, default_findings())  # the defect is back
    issues.sync_issues(gov, registry, DAY, now=T0 + dt.timedelta(hours=2))
    rep = alerting.notify_issues(gov, registry)
    assert len(rep.sent) == 2  # one email + one webhook for the reopening
    psb_mails = _mail_by_agency(box, registry)["psb"]
    assert len(psb_mails) == 2 and "重新打开" in psb_mails[-1]["Subject"]
    assert [h["status_event"] for p, h in hooks if p == "/hook/psb"] == ["opened", "reopened#1"]
    alerting.notify_issues(gov, registry)
    assert len(_mail_by_agency(box, registry)["psb"]) == 2  # still exactly one per event


def test_escalation_goes_to_agency_and_data_management_agency(env, gov, registry, smtp_server):
    _, box = smtp_server
    issues.sync_issues(gov, registry, DAY, now=T0)
    alerting.notify_issues(gov, registry, now=T0)
    sla = registry.datasets["resident_population"].delivery.sla_hours
    issues.escalate_overdue(gov, registry, now=T0 + dt.timedelta(hours=sla + 1))
    rep = alerting.notify_issues(gov, registry)
    escalations = [m for m in box.messages if "升级" in m["Subject"]]
    assert rep.failed == [] and escalations
    recipients = {m["To"] for m in escalations}
    assert registry.agencies["psb"].contact.email in recipients
    assert registry.agencies["data_bureau"].contact.email in recipients


def test_no_smtp_host_disables_email_with_a_notice(env, gov, registry, smtp_server, http_server, caplog):
    _, box = smtp_server
    _, hooks = http_server
    env.delenv("ZQ_SMTP_HOST")
    issues.sync_issues(gov, registry, DAY, now=T0)
    with caplog.at_level(logging.INFO, logger="zqdata.alerting"):
        rep = alerting.notify_issues(gov, registry)
    assert rep.email_disabled and "ZQ_SMTP_HOST" in caplog.text
    assert box.messages == [] and len(hooks) == 2
    channels = {r[0] for r in gov.execute("select channel from governance.notifications").fetchall()}
    assert channels == {"webhook"}


def test_outbox_never_stores_the_webhook_url(env, gov, registry, http_server):
    url, _ = http_server
    env.setenv("ZQ_WEBHOOK_PSB", f"{url}/hook/psb?token=s3cret")
    issues.sync_issues(gov, registry, DAY, now=T0)
    alerting.notify_issues(gov, registry)
    dump = str(gov.execute("select * from governance.notifications").fetchall())
    assert "s3cret" not in dump


def test_sensor_reads_failed_checks_from_event_log_and_alerts_once(env, tmp_path, registry, smtp_server, http_server):
    from orchestration.partitions import daily_partitions
    from orchestration.resources import WarehouseResource
    from orchestration.sensors import quality_issue_alert_sensor, trace_metadata

    _, box = smtp_server
    _, hooks = http_server
    gov_path = tmp_path / "gov.duckdb"
    build_gov_db(gov_path).close()
    warehouse = WarehouseResource(gov_db=str(gov_path), ops_db=str(tmp_path / "ops.duckdb"))

    @dg.asset(key=["gov", "quality", "scores"], partitions_def=daily_partitions, check_specs=[dg.AssetCheckSpec("quality_gate", asset=["gov", "quality", "scores"])])
    def scores(context):
        with warehouse.gov() as con:
            meta = trace_metadata(con, None, registry, partition_date=context.partition_key, severity="error")
        yield dg.Output(None)
        yield dg.AssetCheckResult(check_name="quality_gate", passed=not meta, metadata=meta)

    defs = dg.Definitions(assets=[scores])
    with dg.instance_for_test() as instance:

        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"warehouse": warehouse}, definitions=defs)
            result = quality_issue_alert_sensor(ctx)
            return ctx.cursor, result

        cursor, _ = tick(None)  # nothing in the event log yet
        assert cursor is None and box.messages == []
        result = dg.materialize([scores], instance=instance, partition_key=DAY)
        (evaluation,) = result.get_asset_check_evaluations()
        assert not evaluation.passed
        assert "part-0001.jsonl" in evaluation.metadata["逐级溯源 trace"].value  # trace shown on the check in the UI
        cursor, res = tick(None)
        assert cursor is not None and "quality_gate" in res.skip_message
        assert len(box.messages) == 2 and len(hooks) == 2  # both agencies' issues of the partition, one message each
        cursor2, _ = tick(cursor)  # next tick: no new events, no duplicates
        assert cursor2 == cursor and len(box.messages) == 2 and len(hooks) == 2
        with warehouse.gov() as con:
            assert {i.status for i in issues.list_issues(con)} == {"notified"}
            set_findings(con, DAY, [f for f in default_findings() if f[0] != "psb"])  # psb redelivered corrected data
        result = dg.materialize([scores], instance=instance, partition_key=DAY)
        assert result.get_asset_check_evaluations()[0].passed
        tick(cursor)  # a passing re-check verifies the fix
        with warehouse.gov() as con:
            assert {i.agency: i.status for i in issues.list_issues(con)} == {"psb": "verified", "samr": "notified"}
        assert len(box.messages) == 2
