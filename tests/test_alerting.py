"""Alerts to the responsible agency over a real SMTP server (aiosmtpd), a real HTTP server (both on loopback) and the
local Maildir outbox; the outbox and the register in the operational DB (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import logging

import pytest
import sqlalchemy as sa
from conftest import _free_port
from test_lineage import DAY, build_gov_db, default_findings, set_findings

from zqdata import alerting, issues
from zqdata.opdb import notification_attempts, notifications
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
    monkeypatch.delenv("ZQ_ALERT_MAILDIR", raising=False)
    return monkeypatch


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture
def gov(tmp_path):
    con = build_gov_db(tmp_path / "gov.duckdb")
    yield con
    con.close()


def _outbox(db, *cols, **where):
    """Rows of the outbox table (selected columns, filtered by equality)."""
    q = sa.select(*(notifications.c[c] for c in cols)) if cols else sa.select(notifications)
    for k, v in where.items():
        q = q.where(notifications.c[k] == v)
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(q.order_by(notifications.c.notification_id))]


def _mail_by_agency(box, registry) -> dict[str, list]:
    out: dict[str, list] = {}
    addr = {a.contact.email: code for code, a in registry.agencies.items()}
    for m in box.messages:
        out.setdefault(addr[m["To"]], []).append(m)
    return out


def test_each_agency_gets_exactly_one_message_per_issue_and_channel_with_trace(env, gov, opdb, registry, smtp_server, http_server):
    _, box = smtp_server
    _, hooks = http_server
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    rep = alerting.notify_issues(opdb, registry, now=T0)
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
        "gov/ods/ods_resident_population",
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
    assert {i.status for i in issues.list_issues(opdb)} == {"notified"}

    # Re-running the checks and the sensor for the same partition sends nothing new.
    issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(minutes=10))
    again = alerting.notify_issues(opdb, registry, now=T0 + dt.timedelta(minutes=10))
    assert again.enqueued == [] and again.sent == []
    assert len(box.messages) == 2 and len(hooks) == 2


def test_unreachable_webhook_is_retried_recorded_and_sent_later(env, gov, opdb, registry, http_server):
    url, hooks = http_server
    env.setenv("ZQ_WEBHOOK_SAMR", f"http://127.0.0.1:{_free_port()}/hook/samr")  # nothing listens there
    env.setenv("ZQ_ALERT_RETRIES", "3")
    waits: list[float] = []
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    rep = alerting.notify_issues(opdb, registry, now=T0, sleep=waits.append)
    assert len(rep.failed) == 1
    nid, error = rep.failed[0]
    assert "Connection refused" in error or "URLError" in error
    assert waits == [0.01, 0.02]  # exponential backoff between the 3 attempts
    (row,) = _outbox(opdb, "status", "attempts", "last_error", "transport", notification_id=nid)
    assert row[0] == "failed" and row[1] == 3 and row[2] and row[3] == "http"
    with opdb.connect() as conn:
        attempts = conn.execute(
            sa.select(notification_attempts.c.attempt, notification_attempts.c.ok, notification_attempts.c.error)
            .where(notification_attempts.c.notification_id == nid).order_by(notification_attempts.c.attempt)
        ).all()
    assert [(a, ok) for a, ok, _ in attempts] == [(1, False), (2, False), (3, False)] and all(e for _, _, e in attempts)
    assert alerting.outbox_counts(opdb) == {"pending": 0, "sent": 3, "failed": 1}
    samr = next(i for i in issues.list_issues(opdb) if i.agency == "samr")
    assert samr.status == "notified"  # its e-mail went out; the webhook is retried

    # Next tick: still down → retried again, never dropped.
    alerting.notify_issues(opdb, registry, now=T0, sleep=waits.append)
    assert _outbox(opdb, "attempts", notification_id=nid) == [(6,)]
    # The agency's endpoint is back: the same message goes out once.
    env.setenv("ZQ_WEBHOOK_SAMR", f"{url}/hook/samr")
    rep = alerting.notify_issues(opdb, registry, now=T0, sleep=waits.append)
    assert rep.sent == [nid]
    assert [p for p, _ in hooks].count("/hook/samr") == 1
    assert _outbox(opdb, "status", "attempts", notification_id=nid) == [("sent", 7)]
    assert alerting.outbox_counts(opdb) == {"pending": 0, "sent": 4, "failed": 0}


def test_verified_then_reopened_issue_is_notified_once_more(env, gov, opdb, registry, smtp_server, http_server):
    _, box = smtp_server
    _, hooks = http_server
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    alerting.notify_issues(opdb, registry, now=T0)
    psb = next(i for i in issues.list_issues(opdb) if i.agency == "psb")
    issues.resolve(opdb, psb.issue_id, note="已重新交付")
    set_findings(gov, DAY, [f for f in default_findings() if f[0] != "psb"])  # corrected redelivery
    issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=1))
    assert issues.get_issue(opdb, psb.issue_id).status == "verified"
    assert alerting.notify_issues(opdb, registry).enqueued == []  # verified: nothing to say
    set_findings(gov, DAY, default_findings())  # the defect is back
    issues.sync_issues(gov, opdb, registry, DAY, now=T0 + dt.timedelta(hours=2))
    rep = alerting.notify_issues(opdb, registry)
    assert len(rep.sent) == 2  # one email + one webhook for the reopening
    psb_mails = _mail_by_agency(box, registry)["psb"]
    assert len(psb_mails) == 2 and "重新打开" in psb_mails[-1]["Subject"]
    assert [h["status_event"] for p, h in hooks if p == "/hook/psb"] == ["opened", "reopened#1"]
    alerting.notify_issues(opdb, registry)
    assert len(_mail_by_agency(box, registry)["psb"]) == 2  # still exactly one per event


def test_a_night_reads_whole_only_the_issues_with_a_message_due(env, gov, opdb, registry, smtp_server, http_server):
    """Issue 15: open issues pile up over a year; a night's alerting reads in full (trace, samples) only the issues it
    has a message for, here the one new issue, not every notified issue before it."""
    day2 = str(dt.date.fromisoformat(DAY) + dt.timedelta(days=1))
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    assert len(alerting.notify_issues(opdb, registry, now=T0).sent) == 4
    set_findings(gov, day2, [f for f in default_findings(day2) if f[0] == "psb"])
    issues.sync_issues(gov, opdb, registry, day2, now=T0 + dt.timedelta(hours=1))
    new = [i for i in issues.list_issues(opdb) if i.status == "open"]
    assert [str(i.partition_date) for i in new] == [day2]
    read: list[str] = []
    whole = issues.issues_by_fingerprint

    def spy(conn, fingerprints):
        read.extend(fingerprints)
        return whole(conn, fingerprints)

    env.setattr(alerting.issue_register, "issues_by_fingerprint", spy)
    rep = alerting.notify_issues(opdb, registry, now=T0 + dt.timedelta(hours=1))
    assert read == [new[0].fingerprint]
    assert len(rep.enqueued) == 2 and len(rep.sent) == 2  # the new psb issue: email + webhook
    assert {i.status for i in issues.list_issues(opdb)} == {"notified"}


def test_the_issues_with_a_message_due_are_found_in_sql(env, gov, opdb, registry, smtp_server, http_server):
    """`_with_missing_messages` names exactly the open issues with an (event, channel) not in the outbox: none after a
    notified night, the escalated ones after an escalation, and one whose webhook row is missing (say, a channel
    configured since) — so the nightly alerting need not read every open issue and its outbox rows."""
    import sqlalchemy as sa

    from zqdata.opdb import notifications as notifications_t

    def pending() -> set[str]:
        with opdb.connect() as conn:
            return {r[0] for r in conn.execute(alerting._with_missing_messages(registry, alerting.AlertSettings.from_env()))}

    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    opened = {i.fingerprint for i in issues.list_issues(opdb)}
    assert pending() == opened
    alerting.notify_issues(opdb, registry, now=T0)
    assert pending() == set()
    sla = registry.datasets["resident_population"].delivery.sla_hours
    escalated = set(issues.escalate_overdue(opdb, registry, now=T0 + dt.timedelta(hours=sla + 1)))
    assert escalated
    assert {issues.issue_id_of(fp) for fp in pending()} == escalated
    alerting.notify_issues(opdb, registry)
    assert pending() == set()
    psb = next(i for i in issues.list_issues(opdb) if i.agency == "psb")
    with opdb.begin() as conn:
        conn.execute(sa.delete(notifications_t).where(notifications_t.c.fingerprint == psb.fingerprint,
                                                       notifications_t.c.channel == "webhook"))
    assert pending() == {psb.fingerprint}
    with opdb.connect() as conn:
        due = alerting._due_messages(conn, registry, alerting.AlertSettings.from_env())
    assert [(fp, [m[0] for m in missing]) for fp, _ev, _key, missing in due] == [(psb.fingerprint, ["webhook"])]


def test_escalation_goes_to_agency_and_data_management_agency(env, gov, opdb, registry, smtp_server):
    _, box = smtp_server
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    alerting.notify_issues(opdb, registry, now=T0)
    sla = registry.datasets["resident_population"].delivery.sla_hours
    issues.escalate_overdue(opdb, registry, now=T0 + dt.timedelta(hours=sla + 1))
    rep = alerting.notify_issues(opdb, registry)
    escalations = [m for m in box.messages if "升级" in m["Subject"]]
    assert rep.failed == [] and escalations
    recipients = {m["To"] for m in escalations}
    assert registry.agencies["psb"].contact.email in recipients
    assert registry.agencies["data_bureau"].contact.email in recipients


def _maildir_messages(path) -> list[email.message.EmailMessage]:
    out = []
    for f in sorted((path / "new").iterdir()):
        with f.open("rb") as fh:
            out.append(email.message_from_binary_file(fh, policy=email.policy.default))
    return out


def test_without_smtp_host_email_goes_to_the_local_maildir_once(env, gov, opdb, registry, smtp_server, http_server, tmp_path, caplog):
    _, box = smtp_server
    _, hooks = http_server
    env.delenv("ZQ_SMTP_HOST")
    settings = alerting.AlertSettings.from_env()
    maildir = tmp_path / "outbox" / "maildir"  # <ZQ_DATA_DIR>/outbox/maildir
    assert settings.email_transport == "maildir" and settings.maildir == maildir
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    with caplog.at_level(logging.INFO, logger="zqdata.alerting"):
        rep = alerting.notify_issues(opdb, registry, now=T0)
    assert rep.failed == [] and len(rep.sent) == 4
    assert f"邮件写入本地发件箱 Maildir {maildir}" in rep.summary() and "ZQ_SMTP_HOST" in caplog.text
    assert box.messages == [] and len(hooks) == 2  # nothing over SMTP; webhooks as usual

    msgs = _maildir_messages(maildir)
    by_issue = {i.issue_id: i for i in issues.list_issues(opdb)}
    assert sorted(m["X-ZQ-Issue-Id"] for m in msgs) == sorted(by_issue)  # one message file per issue
    for m in msgs:
        issue = by_issue[m["X-ZQ-Issue-Id"]]
        assert m["To"] == registry.agencies[issue.agency].contact.email
        assert m["X-ZQ-Agency"] == issue.agency and m["X-ZQ-Status-Event"] == "opened"
        assert m["From"] == "zq-platform@zwsj.zhaoqing.example"
        assert email.utils.parsedate_to_datetime(m["Date"]) == T0
        assert m["Message-ID"].startswith("<") and m["Message-ID"].endswith(">")
        assert issue.issue_id in m["Subject"] and "准确性" in m["Subject"]
        body = m.get_body().get_content()
        assert m.get_body().get_content_charset() == "utf-8"
        assert f"问题编号：{issue.issue_id}" in body and "zq issues ack" in body
    psb = next(m for m in msgs if m["X-ZQ-Agency"] == "psb")
    assert f"psb/resident_population/{DAY}/part-0001.jsonl：第 2-3 行" in psb.get_body().get_content()
    assert dict((ch, t) for ch, t in _outbox(opdb, "channel", "transport")) == {"email": "maildir", "webhook": "http"}
    assert {i.status for i in issues.list_issues(opdb)} == {"notified"}

    again = alerting.notify_issues(opdb, registry, now=T0 + dt.timedelta(minutes=10))
    assert again.enqueued == [] and again.sent == []
    assert len(list((maildir / "new").iterdir())) == 2 and len(hooks) == 2


def test_smtp_transport_is_recorded(env, gov, opdb, registry, smtp_server):
    _, box = smtp_server
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    rep = alerting.notify_issues(opdb, registry, now=T0)
    assert "SMTP 127.0.0.1" in rep.summary()
    assert {t for (t,) in _outbox(opdb, "transport", channel="email")} == {"smtp"}
    assert {m["X-ZQ-Issue-Id"] for m in box.messages} == {i.issue_id for i in issues.list_issues(opdb)}
    shown = alerting.notifications(opdb, box.messages[0]["X-ZQ-Issue-Id"])
    assert {(n["channel"], n["status"], n["transport"]) for n in shown} == {("email", "sent", "smtp"), ("webhook", "sent", "http")}


def test_build_message_needs_no_database(registry):
    issue = issues.Issue(
        fingerprint="f" * 64, issue_id="QI-ffffffffffff", partition_date=dt.date(2025, 5, 1), agency="psb",
        dataset="resident_population", rule="accuracy.citizen_id_check", dimension="accuracy", severity="error", tools="dbt",
        findings_count=150, records_failed=150, sample_rows=[],
        affected_rows=[{"file": "psb/resident_population/2025-05-01/part-0001.jsonl", "rows": list(range(1, 101)), "row_count": 150}],
        trace={}, status="open", first_seen_at=T0, last_seen_at=T0, open_since=T0, notified_at=None, acknowledged_at=None,
        acknowledged_by=None, resolved_at=None, resolution_note=None, verified_at=None, escalated_at=None, reopen_count=0,
        updated_at=T0,
    )
    subject, body, payload = alerting.build_message(registry, issue, "opened")
    assert "QI-ffffffffffff" in subject
    assert "part-0001.jsonl：第 1-100 行 等共 150 行" in body
    assert payload["delivery_files"] == issue.affected_rows


def test_outbox_never_stores_the_webhook_url(env, gov, opdb, registry, http_server):
    url, _ = http_server
    env.setenv("ZQ_WEBHOOK_PSB", f"{url}/hook/psb?token=s3cret")
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    alerting.notify_issues(opdb, registry)
    dump = str(_outbox(opdb))
    with opdb.connect() as conn:
        dump += str(conn.execute(sa.select(notification_attempts)).all())
    assert "s3cret" not in dump


def test_a_duplicate_message_does_not_fail_the_transaction(opdb):
    """Two enqueuers racing on the same (issue, channel, status event): the loser's insert is a no-op, not an error."""
    row = dict(
        notification_id="n1", fingerprint="f" * 64, issue_id="QI-ffffffffffff", agency="psb", channel="email",
        status_event="opened", recipient="a@b", subject="s", body="b", payload="{}", status="pending", attempts=0,
        created_at=T0,
    )
    with opdb.begin() as conn:
        assert alerting._insert_ignore(conn, notifications, **row) is True
        assert alerting._insert_ignore(conn, notifications, **{**row, "notification_id": "n2"}) is False  # unique key
        assert alerting._insert_ignore(conn, notifications, **row) is False  # primary key
        conn.execute(sa.update(notifications).values(subject="still usable"))
    assert _outbox(opdb, "notification_id", "subject") == [("n1", "still usable")]


@pytest.fixture
def smtp_without_tls():
    """A loopback SMTP server that offers AUTH without TLS and records every credential it is given."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    from conftest import _free_port, _Mailbox

    box, seen = _Mailbox(), []

    def authenticator(server, session, envelope, mechanism, auth_data):
        seen.append((getattr(auth_data, "login", b""), getattr(auth_data, "password", b"")))
        return AuthResult(success=True)

    ctl = Controller(box, hostname="127.0.0.1", port=_free_port(), authenticator=authenticator,
                     auth_require_tls=False)
    ctl.start()
    yield ctl, box, seen
    ctl.stop()


def test_credentials_never_cross_a_connection_without_tls(env, gov, opdb, registry, smtp_without_tls):
    ctl, box, seen = smtp_without_tls
    env.setenv("ZQ_SMTP_PORT", str(ctl.port))
    env.setenv("ZQ_SMTP_USER", "alerts")
    env.setenv("ZQ_SMTP_PASSWORD", "s3cret-password")
    env.delenv("ZQ_SMTP_TLS", raising=False)  # a login means starttls by default
    issues.sync_issues(gov, opdb, registry, DAY, now=T0)
    rep = alerting.notify_issues(opdb, registry, now=T0, sleep=lambda _: None)
    assert seen == [] and box.messages == []  # no password, no message in clear text
    errors = {e for (e,) in _outbox(opdb, "last_error", channel="email")}
    assert rep.failed and all("STARTTLS" in (e or "") for e in errors), errors


@pytest.mark.parametrize("host, ok", [("smtp.zwsj.zhaoqing.example", False), ("127.0.0.1", True), ("localhost", True)])
def test_plain_smtp_with_a_login_is_refused_except_on_loopback(monkeypatch, host, ok):
    monkeypatch.setenv("ZQ_SMTP_HOST", host)
    monkeypatch.setenv("ZQ_SMTP_USER", "alerts")
    monkeypatch.setenv("ZQ_SMTP_TLS", "none")
    if ok:
        assert alerting.AlertSettings.from_env().tls_mode == "none"
    else:
        with pytest.raises(ValueError, match="ZQ_SMTP_TLS=none"):
            alerting.AlertSettings.from_env()
    monkeypatch.setenv("ZQ_SMTP_TLS", "tls1.0")
    with pytest.raises(ValueError, match="ZQ_SMTP_TLS"):
        alerting.AlertSettings.from_env()
