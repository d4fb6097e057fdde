"""Alert the responsible source agency about its quality issues (Art. 20): e-mail (SMTP) and webhook (HTTP POST JSON).

Messages go through an outbox in the gov DB, `governance.notifications`, unique per (fingerprint, channel, status event), so
each issue gets exactly one message per channel per event (opened, reopened #n, escalated #n) however often the sensor
ticks. Every attempt is recorded in `governance.notification_attempts`; a failed message stays `failed` and is retried on
the next call (next sensor tick), with bounded exponential backoff within a call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import duckdb

from zqdata import issues as issue_register
from zqdata import lineage
from zqdata.issues import Issue
from zqdata.registry import Registry
from zqdata.settings import TZ

log = logging.getLogger(__name__)

CHANNELS = ("email", "webhook")
MAX_ROWS_LISTED = 100  # row numbers listed per file in a message; the trace and `zq issues show` give the rest

DDL = """
create schema if not exists governance;
create table if not exists governance.notifications (
    notification_id  varchar primary key,   -- sha256(fingerprint|channel|status_event)[:20]
    fingerprint      varchar not null,
    issue_id         varchar not null,
    agency           varchar not null,      -- the webhook URL is resolved from the registry at send time (it may hold a token)
    channel          varchar not null,      -- email | webhook
    status_event     varchar not null,      -- opened | reopened#<n> | escalated#<n>
    recipient        varchar,               -- e-mail address (webhooks: the agency code)
    subject          varchar not null,
    body             varchar not null,
    payload          varchar not null,      -- JSON posted to the webhook
    status           varchar not null,      -- pending | sent | failed
    attempts         integer not null default 0,
    last_error       varchar,
    created_at       timestamptz not null,
    last_attempt_at  timestamptz,
    sent_at          timestamptz,
    unique (fingerprint, channel, status_event)
);
create table if not exists governance.notification_attempts (
    notification_id  varchar not null,
    attempt          integer not null,
    attempted_at     timestamptz not null,
    ok               boolean not null,
    error            varchar
);
"""


@dataclass(frozen=True)
class AlertSettings:
    """SMTP and retry settings, from the environment (secrets only there)."""

    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = ""
    retries: int = 3  # attempts per message per call (sensor tick)
    backoff_seconds: float = 1.0  # first wait; doubles each attempt
    backoff_max_seconds: float = 30.0
    timeout_seconds: float = 10.0
    escalation_agency: str = "data_bureau"  # the data management agency also gets escalations (if registered)

    @property
    def email_enabled(self) -> bool:
        return bool(self.smtp_host)

    @classmethod
    def from_env(cls) -> "AlertSettings":
        env = os.environ.get
        return cls(
            smtp_host=env("ZQ_SMTP_HOST", ""),
            smtp_port=int(env("ZQ_SMTP_PORT") or 25),
            smtp_user=env("ZQ_SMTP_USER", ""),
            smtp_password=env("ZQ_SMTP_PASSWORD", ""),
            smtp_from=env("ZQ_SMTP_FROM", ""),
            retries=max(1, int(env("ZQ_ALERT_RETRIES") or 3)),
            backoff_seconds=float(env("ZQ_ALERT_BACKOFF_SECONDS") or 1.0),
            backoff_max_seconds=float(env("ZQ_ALERT_BACKOFF_MAX_SECONDS") or 30.0),
            timeout_seconds=float(env("ZQ_ALERT_TIMEOUT_SECONDS") or 10.0),
            escalation_agency=env("ZQ_ALERT_ESCALATION_AGENCY", "data_bureau"),
        )


@dataclass
class NotifyReport:
    enqueued: list[str] = field(default_factory=list)  # notification ids
    sent: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (notification id, last error)
    email_disabled: bool = False

    def summary(self) -> str:
        s = f"新消息 {len(self.enqueued)}，已发送 {len(self.sent)}，发送失败 {len(self.failed)}（下次重试）"
        return s + ("；未配置 ZQ_SMTP_HOST，邮件通知已停用" if self.email_disabled else "")


def ensure_tables(gov_con: duckdb.DuckDBPyConnection) -> None:
    issue_register.ensure_tables(gov_con)
    gov_con.execute(DDL)


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(TZ)).astimezone(TZ)


# --------------------------------------------------------------------------- message


def _affected_rows(gov_con: duckdb.DuckDBPyConnection, issue: Issue) -> list[tuple[str, list[int], int]]:
    """(delivery file, first row numbers, number of rows) of the issue, from quality.findings."""
    if not lineage.table_exists(gov_con, "quality", "findings"):
        return []
    rows = gov_con.execute(
        f"""select coalesce(delivery_file, ''), list(distinct row_number order by row_number)[1:{MAX_ROWS_LISTED}],
                   count(distinct row_number)
            from quality.findings where partition_date = ? and dataset = ? and rule = ? and agency = ?
            group by 1 order by 1""",
        [issue.partition_date, issue.dataset, issue.rule, issue.agency],
    ).fetchall()
    return [(f, [int(x) for x in (rns or []) if x is not None], int(n)) for f, rns, n in rows]


def build_message(gov_con: duckdb.DuckDBPyConnection, registry: Registry, issue: Issue, status_event: str) -> tuple[str, str, dict[str, Any]]:
    """(subject, Chinese text body, webhook JSON payload) of an issue's notification."""
    ds = registry.datasets.get(issue.dataset)
    ag = registry.agencies.get(issue.agency)
    ds_name = ds.name if ds else issue.dataset
    ag_name = ag.name if ag else issue.agency
    day = issue.partition_date.isoformat()
    sev = {"error": "错误 error（问题记录已被拦截，不进入运营服务平台）", "warn": "警告 warn"}.get(issue.severity or "", issue.severity or "-")
    kind = status_event.split("#")[0]
    head = {"opened": "数据质量问题通知", "reopened": "数据质量问题重新打开（重新交付后复核未通过）", "escalated": "数据质量问题升级（超过处理时限）"}[kind]
    redeliver = f"landing/{issue.agency}/{issue.dataset}/{day}/"
    files = _affected_rows(gov_con, issue)
    subject = f"【{head}】{ag_name} · {ds_name} · {day} · {lineage.dimension_label(issue.dimension)} · {issue.issue_id}"
    lines = [
        f"【{head}】依据《肇庆市公共数据资源授权运营管理办法（试行）》第二十条（数据质量问题逐级溯源、数源机构整改）",
        "",
        f"{ag_name}（{ag.contact.person if ag else ''}）：",
        f"贵单位交付的「{ds_name}」（{issue.dataset}）{day} 分区数据未通过质量检查，请核实整改。",
        "",
        f"问题编号：{issue.issue_id}",
        f"质量维度（第二十条）：{lineage.dimension_label(issue.dimension)}",
        f"规则：{issue.rule}（检查工具 {issue.tools or '-'}）",
        f"严重程度：{sev}",
        f"影响记录：{issue.records_failed} 条（{issue.findings_count} 项发现）",
        "交付文件与行号：",
    ]
    for f, rns, n in files:
        more = f" 等共 {n} 行" if n > len(rns) else ""
        where = f"第 {lineage.row_ranges(rns)} 行{more}" if rns else "交付级问题（整个文件/分区）"
        lines.append(f"  - {f or '（未交付）'}：{where}")
    if issue.sample_rows:
        lines.append("问题示例（个人信息已遮蔽）：")
        for s in issue.sample_rows:
            rn = s.get("row_number")
            lines.append(f"  - 行 {rn if rn is not None else '-'} 字段 {s.get('field') or '-'}：{s.get('detail') or ''}")
    lines.append("")
    if issue.trace and "levels" in issue.trace:
        lines.append(lineage.Trace.from_dict(issue.trace).to_text())
    elif issue.trace.get("error"):
        lines.append(f"逐级溯源：{issue.trace['error']}")
    lines += [
        "",
        "处理要求：",
        "  1. 核实上述记录，在源系统中修正数据；",
        f"  2. 将修正后的该分区完整数据连同 _manifest.json 重新交付至 {redeliver}；",
        f"  3. 收到本通知后确认：zq issues ack {issue.issue_id} --by <经办人>；完成整改后：zq issues resolve {issue.issue_id} --note \"<整改说明>\"。",
        "平台将在重新交付后自动复核：通过即关闭（verified），仍不通过则重新打开（reopened）。",
        f"处理时限：数据集约定交付时限 {ds.delivery.sla_hours if ds else '-'} 小时，逾期将升级至数据管理机构。",
    ]
    body = "\n".join(lines)
    payload = {
        "type": "zq.quality_issue",
        "event": kind,
        "status_event": status_event,
        "issue_id": issue.issue_id,
        "fingerprint": issue.fingerprint,
        "status": issue.status,
        "agency": issue.agency,
        "agency_name": ag_name,
        "dataset": issue.dataset,
        "dataset_name": ds_name,
        "partition_date": day,
        "rule": issue.rule,
        "dimension": issue.dimension,
        "dimension_cn": lineage.dimension_label(issue.dimension),
        "severity": issue.severity,
        "records_failed": issue.records_failed,
        "delivery_files": [{"file": f, "rows": rns, "row_count": n} for f, rns, n in files],
        "redeliver_to": redeliver,
        "trace": issue.trace,
        "text": body,
    }
    return subject, body, payload


# --------------------------------------------------------------------------- outbox


def notification_id(fp: str, channel: str, status_event: str) -> str:
    return hashlib.sha256(f"{fp}|{channel}|{status_event}".encode()).hexdigest()[:20]


def _channels_for(registry: Registry, agency: str, settings: AlertSettings) -> list[tuple[str, str]]:
    """(channel, recipient) pairs configured for an agency."""
    ag = registry.agencies.get(agency)
    if ag is None:
        return []
    out = []
    if settings.email_enabled and ag.contact.email:
        out.append(("email", ag.contact.email))
    if ag.contact.webhook_url():
        out.append(("webhook", ag.code))
    return out


def enqueue(gov_con: duckdb.DuckDBPyConnection, registry: Registry, settings: AlertSettings, now: dt.datetime | None = None) -> list[str]:
    """Put one message per (issue, channel, status event) into the outbox; existing ones are left alone."""
    ensure_tables(gov_con)
    at = _now(now)
    out = []
    todo: list[tuple[Issue, str, str]] = []  # (issue, status event, agency to notify)
    for issue in issue_register.list_issues(gov_con, status=issue_register.OPEN_LIKE):
        if issue.status in ("open", "reopened"):
            ev = "opened" if issue.reopen_count == 0 else f"reopened#{issue.reopen_count}"
            todo.append((issue, ev, issue.agency))
        if issue.escalated_at is not None:
            ev = f"escalated#{issue.reopen_count}"
            todo.append((issue, ev, issue.agency))
            if settings.escalation_agency in registry.agencies and settings.escalation_agency != issue.agency:
                todo.append((issue, ev, settings.escalation_agency))
    for issue, ev, agency in todo:
        key_ev = ev if agency == issue.agency else f"{ev}@{agency}"
        channels = _channels_for(registry, agency, settings)
        missing = [
            (ch, rcpt)
            for ch, rcpt in channels
            if not gov_con.execute(
                "select 1 from governance.notifications where fingerprint = ? and channel = ? and status_event = ?",
                [issue.fingerprint, ch, key_ev],
            ).fetchone()
        ]
        if not missing:
            continue
        subject, body, payload = build_message(gov_con, registry, issue, ev)
        for ch, rcpt in missing:
            nid = notification_id(issue.fingerprint, ch, key_ev)
            gov_con.execute(
                """insert into governance.notifications
                   (notification_id, fingerprint, issue_id, agency, channel, status_event, recipient, subject, body, payload,
                    status, attempts, created_at)
                   values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?) on conflict do nothing""",
                [nid, issue.fingerprint, issue.issue_id, agency, ch, key_ev, rcpt, subject, body, json.dumps(payload, ensure_ascii=False), at],
            )
            out.append(nid)
    return out


def send_email(settings: AlertSettings, to: str, subject: str, body: str) -> None:
    """One message over SMTP (STARTTLS when the server offers it and credentials are set)."""
    msg = EmailMessage()
    msg["From"] = settings.smtp_from or settings.smtp_user or "zq-data-platform@localhost"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds) as smtp:
        smtp.ehlo()
        if settings.smtp_user:
            if smtp.has_extn("starttls"):
                smtp.starttls()
                smtp.ehlo()
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(msg)


def post_webhook(url: str, payload: dict[str, Any], timeout: float) -> None:
    """HTTP POST of the JSON payload; anything but 2xx is an error."""
    req = urllib.request.Request(
        url,
        data=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
        headers={"Content-Type": "application/json; charset=utf-8"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL comes from the registry
        if not 200 <= resp.status < 300:
            raise urllib.error.HTTPError(url, resp.status, f"HTTP {resp.status}", resp.headers, None)


def _deliver_one(registry: Registry, settings: AlertSettings, n: dict[str, Any]) -> None:
    if n["channel"] == "email":
        if not settings.email_enabled:
            raise RuntimeError("邮件通知未配置 (ZQ_SMTP_HOST not set)")
        send_email(settings, n["recipient"], n["subject"], n["body"])
    else:
        ag = registry.agencies.get(n["agency"])
        url = ag.contact.webhook_url() if ag else ""
        if not url:
            raise RuntimeError(f"机构 {n['agency']} 未配置 webhook 地址")
        post_webhook(url, json.loads(n["payload"]), settings.timeout_seconds)


@dataclass
class Attempt:
    notification_id: str
    attempt: int
    at: dt.datetime
    error: str  # "" = delivered


def pending_messages(gov_con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Outbox messages not yet delivered (pending, or failed on an earlier tick)."""
    ensure_tables(gov_con)
    return lineage.fetch_dicts(
        gov_con, "select * from governance.notifications where status in ('pending', 'failed') order by created_at, notification_id"
    )


def send_messages(
    registry: Registry,
    settings: AlertSettings,
    messages: list[dict[str, Any]],
    *,
    now: Callable[[], dt.datetime] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Attempt]:
    """Send each message with bounded retries and exponential backoff; no DB access (the gov DB lock is not held while
    waiting on the network)."""
    clock = now or (lambda: dt.datetime.now(TZ))
    out = []
    for n in messages:
        attempt = int(n["attempts"])
        for i in range(settings.retries):
            if i:
                sleep(min(settings.backoff_seconds * 2 ** (i - 1), settings.backoff_max_seconds))
            attempt += 1
            try:
                _deliver_one(registry, settings, n)
                error = ""
            except (OSError, smtplib.SMTPException, urllib.error.URLError, RuntimeError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:1000]
            out.append(Attempt(n["notification_id"], attempt, clock(), error))
            if not error:
                break
    return out


def record_attempts(gov_con: duckdb.DuckDBPyConnection, messages: list[dict[str, Any]], attempts: list[Attempt]) -> tuple[list[str], list[tuple[str, str]]]:
    """Record every attempt and each message's outcome; notified issues move to `notified`. Returns (sent, failed)."""
    by_id = {n["notification_id"]: n for n in messages}
    last: dict[str, Attempt] = {}
    gov_con.execute("begin transaction")
    try:
        for a in attempts:
            gov_con.execute("insert into governance.notification_attempts values (?, ?, ?, ?, ?)", [a.notification_id, a.attempt, a.at, not a.error, a.error or None])
            last[a.notification_id] = a
        sent, failed = [], []
        for nid, a in last.items():
            gov_con.execute(
                """update governance.notifications set attempts = ?, last_attempt_at = ?, status = ?, last_error = ?,
                   sent_at = case when ? then ? else sent_at end where notification_id = ?""",
                [a.attempt, a.at, "failed" if a.error else "sent", a.error or None, not a.error, a.at, nid],
            )
            n = by_id[nid]
            if a.error:
                log.warning("通知发送失败（将在下次重试）%s %s → %s: %s", n["issue_id"], n["channel"], n["recipient"], a.error)
                failed.append((nid, a.error))
                continue
            sent.append(nid)
            if n["status_event"] == "opened" or n["status_event"].startswith("reopened#"):
                issue_register.mark_notified(gov_con, n["fingerprint"], n["channel"], a.at)
        gov_con.execute("commit")
    except Exception:
        gov_con.execute("rollback")
        raise
    return sent, failed


def deliver_pending(
    gov_con: duckdb.DuckDBPyConnection,
    registry: Registry,
    settings: AlertSettings,
    *,
    now: Callable[[], dt.datetime] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Send every pending or failed message and record every attempt. Returns (sent ids, [(failed id, error)])."""
    messages = pending_messages(gov_con)
    return record_attempts(gov_con, messages, send_messages(registry, settings, messages, now=now, sleep=sleep))


def notify_issues(
    gov_con: duckdb.DuckDBPyConnection,
    registry: Registry,
    settings: AlertSettings | None = None,
    *,
    now: dt.datetime | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> NotifyReport:
    """Enqueue messages for open/reopened/escalated issues and send everything pending or previously failed."""
    s = settings or AlertSettings.from_env()
    report = NotifyReport(email_disabled=not s.email_enabled)
    if not s.email_enabled:
        log.info("未配置 ZQ_SMTP_HOST：邮件通知已停用，仅发送 webhook (email alerts disabled)")
    report.enqueued = enqueue(gov_con, registry, s, now)
    report.sent, report.failed = deliver_pending(gov_con, registry, s, sleep=sleep)
    log.info("质量问题通知 %s", report.summary())
    return report


def notifications(gov_con: duckdb.DuckDBPyConnection, issue_id: str | None = None) -> list[dict[str, Any]]:
    """Outbox rows (without bodies), optionally of one issue."""
    ensure_tables(gov_con)
    sql = "select notification_id, issue_id, agency, channel, status_event, recipient, status, attempts, last_error, created_at, sent_at from governance.notifications"
    if issue_id:
        return lineage.fetch_dicts(gov_con, sql + " where issue_id = ? order by created_at", [issue_id])
    return lineage.fetch_dicts(gov_con, sql + " order by created_at")
