"""Alert the responsible source agency about its quality issues (Art. 20): e-mail and webhook (HTTP POST JSON).

E-mail always has a transport: SMTP when ``ZQ_SMTP_HOST`` is set, otherwise a local Maildir outbox
(``ZQ_ALERT_MAILDIR``, default ``<ZQ_DATA_DIR>/outbox/maildir``) that an operator or a mail relay picks up — an alert is
never dropped for want of a mail server.

Messages go through an outbox in the operational DB (`zqdata.opdb`: `notifications`), unique per (fingerprint, channel,
status event), so each issue gets exactly one message per channel per event (opened, reopened #n, escalated #n) however
often the sensor ticks. Every attempt is recorded in `notification_attempts`; a failed message stays `failed` and is
retried on the next call (next sensor tick), with bounded exponential backoff within a call. Sending touches no
database: read the pending messages, send them, then record the attempts in one short transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import mailbox
import os
import ipaddress
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from zqdata import display, lineage
from zqdata import issues as issue_register
from zqdata.issues import Issue
from zqdata.opdb import notification_attempts as attempts_t
from zqdata.opdb import quality_issues as issues_t
from zqdata.opdb import notifications as notifications_t
from zqdata.opdb import transaction
from zqdata.registry import Registry
from zqdata.settings import TZ, get_settings

log = logging.getLogger(__name__)

CHANNELS = ("email", "webhook")
OUTBOX_STATUSES = ("pending", "sent", "failed")
MAX_ROWS_LISTED = issue_register.MAX_ROWS_LISTED
DEFAULT_FROM = "zq-data-platform@localhost"
MESSAGE_ID_DOMAIN = "zq-data-platform.local"
TLS_MODES = ("starttls", "ssl", "none")


def _loopback(host: str) -> bool:
    """True for localhost and loopback addresses (a test server on this machine)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def default_maildir() -> Path:
    """``ZQ_ALERT_MAILDIR``, else ``<ZQ_DATA_DIR>/outbox/maildir``."""
    raw = os.environ.get("ZQ_ALERT_MAILDIR", "").strip()
    return Path(raw) if raw else get_settings().data_dir / "outbox" / "maildir"


@dataclass(frozen=True)
class AlertSettings:
    """Mail transport and retry settings, from the environment (secrets only there)."""

    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = ""
    smtp_tls: str = ""  # starttls | ssl | none (ZQ_SMTP_TLS); empty: starttls when a user logs in, else none
    maildir: Path = field(default_factory=default_maildir)  # the local outbox used when no SMTP host is set
    retries: int = 3  # attempts per message per call (sensor tick)
    backoff_seconds: float = 1.0  # first wait; doubles each attempt
    backoff_max_seconds: float = 30.0
    timeout_seconds: float = 10.0
    escalation_agency: str = "data_bureau"  # the data management agency also gets escalations (if registered)

    def __post_init__(self) -> None:
        mode = self.tls_mode
        if mode not in TLS_MODES:
            raise ValueError(f"ZQ_SMTP_TLS 只能是 {'|'.join(TLS_MODES)}，实际为 {self.smtp_tls!r}")
        if mode == "none" and self.smtp_user and self.smtp_host and not _loopback(self.smtp_host):
            raise ValueError(
                "ZQ_SMTP_TLS=none 时不能用 ZQ_SMTP_USER 登录：口令将以明文传输（仅允许本机回环地址的测试服务器）。"
                " Credentials only over TLS: set ZQ_SMTP_TLS=starttls or ssl.")

    @property
    def tls_mode(self) -> str:
        """How the SMTP connection is protected: ``ZQ_SMTP_TLS``, else starttls when a user logs in, else none."""
        return (self.smtp_tls or ("starttls" if self.smtp_user else "none")).strip().lower()

    @property
    def email_transport(self) -> str:
        """"smtp" when ``ZQ_SMTP_HOST`` is set, else "maildir" (the local outbox)."""
        return "smtp" if self.smtp_host else "maildir"

    @property
    def email_destination(self) -> str:
        """Where e-mail goes, for summaries and logs (no credentials)."""
        if self.email_transport == "smtp":
            return f"SMTP {self.smtp_host}:{self.smtp_port}"
        return f"Maildir {self.maildir}"

    @property
    def sender(self) -> str:
        return self.smtp_from or self.smtp_user or DEFAULT_FROM

    @classmethod
    def from_env(cls) -> "AlertSettings":
        env = os.environ.get
        return cls(
            smtp_host=env("ZQ_SMTP_HOST", "").strip(),
            smtp_port=int(env("ZQ_SMTP_PORT") or 25),
            smtp_user=env("ZQ_SMTP_USER", ""),
            smtp_password=env("ZQ_SMTP_PASSWORD", ""),
            smtp_from=env("ZQ_SMTP_FROM", ""),
            smtp_tls=env("ZQ_SMTP_TLS", "").strip().lower(),
            maildir=default_maildir(),
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
    email_transport: str = "smtp"  # smtp | maildir
    email_destination: str = ""  # "SMTP host:port" | "Maildir <path>"

    @classmethod
    def for_settings(cls, settings: AlertSettings, **kw: Any) -> "NotifyReport":
        return cls(email_transport=settings.email_transport, email_destination=settings.email_destination, **kw)

    def summary(self) -> str:
        s = f"新消息 {len(self.enqueued)}，已发送 {len(self.sent)}，发送失败 {len(self.failed)}（下次重试）"
        if self.email_transport == "maildir":
            return s + f"；未配置 ZQ_SMTP_HOST，邮件写入本地发件箱 {self.email_destination}"
        return s + (f"；邮件经 {self.email_destination} 发送" if self.email_destination else "")


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(TZ)).astimezone(TZ)


# --------------------------------------------------------------------------- message


def build_message(registry: Registry, issue: Issue, status_event: str) -> tuple[str, str, dict[str, Any]]:
    """(subject, Chinese text body, webhook JSON payload) of an issue's notification; from the issue alone (its
    `affected_rows` were taken from quality.findings at sync time), no database access."""
    ds = registry.datasets.get(issue.dataset)
    ag = registry.agencies.get(issue.agency)
    # Masked again by field classification when the message is built: a register row filed before masking went by
    # classification (or by any other writer) never carries a personal value into a mail or webhook.
    samples = [display.finding(registry, s) for s in issue.sample_rows]
    trace = display.trace_dict(registry, issue.trace) if issue.trace else {}
    ds_name = ds.name if ds else issue.dataset
    ag_name = ag.name if ag else issue.agency
    day = issue.partition_date.isoformat()
    sev = {"error": "错误 error（问题记录已被拦截，不进入运营服务平台）", "warn": "警告 warn"}.get(issue.severity or "", issue.severity or "-")
    kind = status_event.split("#")[0]
    head = {"opened": "数据质量问题通知", "reopened": "数据质量问题重新打开（重新交付后复核未通过）", "escalated": "数据质量问题升级（超过处理时限）"}[kind]
    redeliver = f"landing/{issue.agency}/{issue.dataset}/{day}/"
    files = [
        {"file": f.get("file") or "", "rows": [int(x) for x in f.get("rows") or []], "row_count": int(f.get("row_count") or 0)}
        for f in issue.affected_rows
    ]
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
        (f"影响记录：{issue.records_failed} 条（{issue.findings_count} 项发现）" if issue.records_failed else
         f"影响范围：整个交付文件或数据集，不涉及单条记录 (file- or dataset-level; {issue.findings_count} 项发现)"),
        "交付文件与行号：",
    ]
    for f in files:
        rns, n = f["rows"], f["row_count"]
        more = f" 等共 {n} 行" if n > len(rns) else ""
        where = f"第 {lineage.row_ranges(rns)} 行{more}" if rns else "交付级问题（整个文件/分区）"
        lines.append(f"  - {f['file'] or '（未交付）'}：{where}")
    if samples:
        lines.append("问题示例（个人信息已遮蔽）：")
        for s in samples:
            rn = s.get("row_number")
            lines.append(f"  - 行 {rn if rn is not None else '-'} 字段 {s.get('field') or '-'}：{s.get('detail') or ''}")
    lines.append("")
    if trace and "levels" in trace:
        lines.append(lineage.Trace.from_dict(trace).to_text())
    elif trace.get("error"):
        lines.append(f"逐级溯源：{display.scrub_text(str(trace['error']))}")
    lines += [
        "",
        "处理要求：",
        "  1. 核实上述记录，在源系统中修正数据；",
        f"  2. 将修正后的该分区完整数据连同 _manifest.json 重新交付至 {redeliver}；",
        f"  3. 收到本通知后确认：zq issues ack {issue.issue_id} --by <经办人>；完成整改后：zq issues resolve {issue.issue_id} --note \"<整改说明>\"。",
        "平台将在重新交付后自动复核：该规则在重新交付的记录上执行并通过即关闭（verified）；原问题记录在重新交付中已不存在则关闭为"
        "（superseded）；仍不通过则重新打开（reopened）；重新交付被拒收或为空时不予复核，问题保持未关闭。",
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
        "delivery_files": files,
        "redeliver_to": redeliver,
        "trace": trace,
        "text": body,
    }
    return subject, body, payload


# --------------------------------------------------------------------------- outbox


def notification_id(fp: str, channel: str, status_event: str) -> str:
    return hashlib.sha256(f"{fp}|{channel}|{status_event}".encode()).hexdigest()[:20]


def _channels_for(registry: Registry, agency: str) -> list[tuple[str, str]]:
    """(channel, recipient) pairs configured for an agency (e-mail always has a transport: SMTP or the Maildir)."""
    ag = registry.agencies.get(agency)
    if ag is None:
        return []
    out = []
    if ag.contact.email:
        out.append(("email", ag.contact.email))
    if ag.contact.webhook_url():
        out.append(("webhook", ag.code))
    return out


def _insert_ignore(conn: sa.Connection, table: sa.Table, **values: Any) -> bool:
    """INSERT … ON CONFLICT DO NOTHING (the transaction survives a duplicate); whether a row was inserted."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return conn.execute(dialect.insert(table).values(**values).on_conflict_do_nothing()).rowcount == 1


def enqueue(db: sa.Engine, registry: Registry, settings: AlertSettings, now: dt.datetime | None = None) -> list[str]:
    """Put one message per (issue, channel, status event) into the outbox; existing ones are left alone.

    Only the issues with a message due are read whole (issue 15): the others cost two short rows, not their trace and
    samples plus a query per channel, so a night with a year of open issues is not a year of reading."""
    at = _now(now)
    out = []
    with transaction(db) as conn:
        due = _due_messages(conn, registry, settings)
        issues = issue_register.issues_by_fingerprint(conn, {fp for fp, *_ in due})
        for fp, ev, key_ev, missing in due:
            subject, body, payload = build_message(registry, issues[fp], ev)
            for ch, rcpt, agency in missing:
                nid = notification_id(fp, ch, key_ev)
                if _insert_ignore(
                    conn, notifications_t,
                    notification_id=nid, fingerprint=fp, issue_id=issues[fp].issue_id, agency=agency, channel=ch,
                    status_event=key_ev, recipient=rcpt, subject=subject, body=body,
                    payload=json.dumps(payload, ensure_ascii=False), status="pending", attempts=0, created_at=at,
                ):
                    out.append(nid)
    return out


def _due_messages(conn: sa.Connection, registry: Registry,
                  settings: AlertSettings) -> list[tuple[str, str, str, list[tuple[str, str, str]]]]:
    """(fingerprint, status event, its outbox key, [(channel, recipient, agency)] not in the outbox yet) of every
    message due: an open or reopened issue's to its agency, an escalated one's to its agency and the escalation agency
    (keyed `<event>@<agency>`). In the order of `issues.list_issues` (newest partition first, then agency, dataset,
    rule)."""
    c, n = issues_t.c, notifications_t.c
    wanted = sa.or_(c.status.in_(("open", "reopened")),
                    sa.and_(c.status.in_(issue_register.OPEN_LIKE), c.escalated_at.is_not(None)))
    pending = _with_missing_messages(registry, settings)  # in SQL: open issues pile up, most long notified
    heads = conn.execute(sa.select(c.fingerprint, c.status, c.reopen_count, c.escalated_at, c.agency,
                                   c.partition_date, c.dataset, c.rule)
                         .where(wanted, c.fingerprint.in_(pending))).all()
    heads.sort(key=lambda h: (h.agency, h.dataset, h.rule))
    heads.sort(key=lambda h: h.partition_date, reverse=True)
    sent = set(conn.execute(sa.select(n.fingerprint, n.channel, n.status_event)
                            .where(n.fingerprint.in_(pending))).all())
    due = []
    for h in heads:
        events: list[tuple[str, str]] = []  # (status event, agency to notify)
        if h.status in ("open", "reopened"):
            events.append(("opened" if h.reopen_count == 0 else f"reopened#{h.reopen_count}", h.agency))
        if h.escalated_at is not None:
            events.append((f"escalated#{h.reopen_count}", h.agency))
            if settings.escalation_agency in registry.agencies and settings.escalation_agency != h.agency:
                events.append((f"escalated#{h.reopen_count}", settings.escalation_agency))
        for ev, agency in events:
            key_ev = ev if agency == h.agency else f"{ev}@{agency}"
            missing = [(ch, rcpt, agency) for ch, rcpt in _channels_for(registry, agency)
                       if (h.fingerprint, ch, key_ev) not in sent]
            if missing:
                due.append((h.fingerprint, ev, key_ev, missing))
    return due


def _with_missing_messages(registry: Registry, settings: AlertSettings) -> sa.Select:
    """The fingerprints of the open issues with a message not yet in the outbox, in SQL: every (status event,
    channel) a message is due on, as `_due_messages` derives them, without an outbox row. Reading every open issue and
    its outbox rows each night grew with history (open issues pile up by ~50 a day in the simulation; issue 15)."""
    c, n = issues_t.c, notifications_t.c
    by_channel: dict[str, list[str]] = {}
    for code in sorted(registry.agencies):
        for channel, _ in _channels_for(registry, code):
            by_channel.setdefault(channel, []).append(code)
    opened = sa.case((c.reopen_count == 0, sa.literal("opened")),
                     else_=sa.literal("reopened#") + sa.cast(c.reopen_count, sa.String))
    escalated = sa.literal("escalated#") + sa.cast(c.reopen_count, sa.String)
    is_open = c.status.in_(("open", "reopened"))
    is_escalated = sa.and_(c.status.in_(issue_register.OPEN_LIKE), c.escalated_at.is_not(None))
    expected = []
    for channel, codes in by_channel.items():  # the issue's own agency, on each channel it has
        expected.append(sa.select(c.fingerprint.label("fp"), sa.literal(channel).label("ch"), opened.label("ev"))
                        .where(is_open, c.agency.in_(codes)))
        expected.append(sa.select(c.fingerprint.label("fp"), sa.literal(channel).label("ch"), escalated.label("ev"))
                        .where(is_escalated, c.agency.in_(codes)))
    escalation = settings.escalation_agency
    if escalation in registry.agencies:  # and the escalation agency, on its own channels
        for channel, _ in _channels_for(registry, escalation):
            expected.append(sa.select(c.fingerprint.label("fp"), sa.literal(channel).label("ch"),
                                      (escalated + sa.literal(f"@{escalation}")).label("ev"))
                            .where(is_escalated, c.agency != escalation))
    if not expected:
        return sa.select(c.fingerprint).where(sa.false())
    e = sa.union_all(*expected).subquery()
    return sa.select(e.c.fp).where(~sa.exists().where(n.fingerprint == e.c.fp, n.channel == e.c.ch,
                                                       n.status_event == e.c.ev))


def email_message(settings: AlertSettings, n: dict[str, Any], at: dt.datetime | None = None) -> EmailMessage:
    """The RFC 5322 message of an e-mail notification (the same for SMTP and the Maildir), UTF-8 body."""
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = n["recipient"]
    msg["Subject"] = n["subject"]
    msg["Date"] = format_datetime(_now(at))
    msg["Message-ID"] = f"<{n['notification_id']}@{MESSAGE_ID_DOMAIN}>"  # stable: a resend is recognisably the same
    msg["X-ZQ-Issue-Id"] = n["issue_id"]
    msg["X-ZQ-Agency"] = n["agency"]
    msg["X-ZQ-Status-Event"] = n["status_event"]
    msg.set_content(n["body"], charset="utf-8")
    return msg


class SMTPTLSRequired(smtplib.SMTPException):
    """The server does not offer the TLS the settings require: nothing is sent, no credential leaves this process."""


def send_email(settings: AlertSettings, msg: EmailMessage) -> None:
    """One message over SMTP. ``ssl``: TLS from the first byte; ``starttls``: the server must offer STARTTLS before
    anything else (credentials included) is sent; ``none``: plain (refused with a login, except on loopback)."""
    mode = settings.tls_mode
    tls = ssl.create_default_context()
    if mode == "ssl":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds, context=tls)
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds)
    with smtp:
        smtp.ehlo()
        if mode == "starttls":
            if not smtp.has_extn("starttls"):
                raise SMTPTLSRequired(f"SMTP 服务器 {settings.smtp_host}:{settings.smtp_port} 不支持 STARTTLS，"
                                      "拒绝以明文发送（ZQ_SMTP_TLS=starttls） server offers no STARTTLS")
            smtp.starttls(context=tls)
            smtp.ehlo()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(msg)


def write_maildir(settings: AlertSettings, msg: EmailMessage) -> str:
    """One message into the local Maildir outbox (``<maildir>/new``); returns its key."""
    Path(settings.maildir).parent.mkdir(parents=True, exist_ok=True)  # Maildir(create=True) makes only the last level
    return mailbox.Maildir(settings.maildir, create=True).add(msg)


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


def transport_of(settings: AlertSettings, channel: str) -> str:
    """smtp | maildir | http."""
    return settings.email_transport if channel == "email" else "http"


def _deliver_one(registry: Registry, settings: AlertSettings, n: dict[str, Any], at: dt.datetime) -> None:
    if n["channel"] == "email":
        msg = email_message(settings, n, at)
        if settings.email_transport == "smtp":
            send_email(settings, msg)
        else:
            write_maildir(settings, msg)
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
    transport: str = ""  # smtp | maildir | http


def pending_messages(db: sa.Engine) -> list[dict[str, Any]]:
    """Outbox messages not yet delivered (pending, or failed on an earlier tick)."""
    q = (
        sa.select(notifications_t)
        .where(notifications_t.c.status.in_(("pending", "failed")))
        .order_by(notifications_t.c.created_at, notifications_t.c.notification_id)
    )
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


Clock = Callable[[], dt.datetime]


def _clock(now: dt.datetime | Clock | None) -> Clock:
    if now is None:
        return lambda: dt.datetime.now(TZ)
    if callable(now):
        return now
    fixed = _now(now)
    return lambda: fixed


def send_messages(
    registry: Registry,
    settings: AlertSettings,
    messages: list[dict[str, Any]],
    *,
    now: dt.datetime | Clock | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Attempt]:
    """Send each message with bounded retries and exponential backoff. No database access: no lock or transaction is
    held while waiting on the network. `now` is a time or a clock (default: the wall clock)."""
    clock = _clock(now)
    out = []
    for n in messages:
        attempt = int(n["attempts"])
        transport = transport_of(settings, n["channel"])
        for i in range(settings.retries):
            if i:
                sleep(min(settings.backoff_seconds * 2 ** (i - 1), settings.backoff_max_seconds))
            attempt += 1
            at = clock()
            try:
                _deliver_one(registry, settings, n, at)
                error = ""
            except (OSError, smtplib.SMTPException, urllib.error.URLError, RuntimeError, ValueError, mailbox.Error) as exc:
                error = f"{type(exc).__name__}: {exc}"[:1000]
            out.append(Attempt(n["notification_id"], attempt, at, error, transport))
            if not error:
                break
    return out


def record_attempts(db: sa.Engine, messages: list[dict[str, Any]], attempts: list[Attempt]) -> tuple[list[str], list[tuple[str, str]]]:
    """Record every attempt and each message's outcome in one transaction; notified issues move to `notified`.
    Returns (sent, failed)."""
    by_id = {n["notification_id"]: n for n in messages}
    last: dict[str, Attempt] = {}
    for a in attempts:
        last[a.notification_id] = a
    sent: list[str] = []
    failed: list[tuple[str, str]] = []
    notified: list[tuple[str, str, dt.datetime]] = []
    if not attempts:
        return sent, failed
    with transaction(db) as conn:
        conn.execute(
            sa.insert(attempts_t),
            [{"notification_id": a.notification_id, "attempt": a.attempt, "attempted_at": a.at, "ok": not a.error, "error": a.error or None} for a in attempts],
        )
        for nid in sorted(last):  # rows locked in one order by every writer: no deadlock on PostgreSQL
            a = last[nid]
            values: dict[str, Any] = {
                "attempts": a.attempt, "last_attempt_at": a.at, "status": "failed" if a.error else "sent",
                "last_error": a.error or None,
            }
            if a.transport:
                values["transport"] = a.transport
            if not a.error:
                values["sent_at"] = a.at
            conn.execute(sa.update(notifications_t).where(notifications_t.c.notification_id == nid).values(**values))
            n = by_id[nid]
            if a.error:
                log.warning("通知发送失败（将在下次重试）%s %s → %s: %s", n["issue_id"], n["channel"], n["recipient"], a.error)
                failed.append((nid, a.error))
                continue
            sent.append(nid)
            if n["status_event"] == "opened" or n["status_event"].startswith("reopened#"):
                notified.append((n["fingerprint"], n["channel"], a.at))
        for fp, channel, at in sorted(notified, key=lambda x: (x[0], x[1])):
            issue_register.mark_notified(conn, fp, channel, at)
    order = {nid: i for i, nid in enumerate(by_id)}
    sent.sort(key=lambda nid: order.get(nid, 0))
    failed.sort(key=lambda f: order.get(f[0], 0))
    return sent, failed


def deliver_pending(
    db: sa.Engine,
    registry: Registry,
    settings: AlertSettings,
    *,
    now: dt.datetime | Clock | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Send every pending or failed message and record every attempt. Returns (sent ids, [(failed id, error)])."""
    messages = pending_messages(db)
    if not messages:
        return [], []
    return record_attempts(db, messages, send_messages(registry, settings, messages, now=now, sleep=sleep))


def notify_issues(
    db: sa.Engine,
    registry: Registry,
    settings: AlertSettings | None = None,
    *,
    now: dt.datetime | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> NotifyReport:
    """Enqueue messages for open/reopened/escalated issues and send everything pending or previously failed."""
    s = settings or AlertSettings.from_env()
    report = NotifyReport.for_settings(s)
    if s.email_transport == "maildir":
        log.info("未配置 ZQ_SMTP_HOST：邮件写入本地发件箱 %s (no SMTP host: e-mail goes to the local Maildir)", s.maildir)
    report.enqueued = enqueue(db, registry, s, now)
    report.sent, report.failed = deliver_pending(db, registry, s, now=now, sleep=sleep)
    log.info("质量问题通知 %s", report.summary())
    return report


def notifications(db: sa.Engine, issue_id: str | None = None) -> list[dict[str, Any]]:
    """Outbox rows (without bodies), optionally of one issue."""
    c = notifications_t.c
    q = sa.select(
        c.notification_id, c.issue_id, c.agency, c.channel, c.status_event, c.recipient, c.status, c.transport,
        c.attempts, c.last_error, c.created_at, c.sent_at,
    )
    if issue_id:
        q = q.where(c.issue_id == issue_id)
    q = q.order_by(c.created_at, c.notification_id)
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def outbox_counts(db: sa.Engine) -> dict[str, int]:
    """Outbox messages by status: {"pending": n, "sent": n, "failed": n}."""
    q = sa.select(notifications_t.c.status, sa.func.count()).group_by(notifications_t.c.status)
    out = dict.fromkeys(OUTBOX_STATUSES, 0)
    with db.connect() as conn:
        for status, n in conn.execute(q):
            out[status] = int(n)
    return out
