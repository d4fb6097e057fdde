"""Append-only, keyed hash-chained delivery log (Art. 25: identity, access, audit trail) in the operational database,
anchored outside it.

The table is ``opdb.audit_deliveries`` (SQLite WAL by default, PostgreSQL by ``ZQ_OPDB_URL``), never a DuckDB file, so a
delivery can be logged while the nightly run holds the warehouse files. Each record carries ``prev_hash`` (the previous
record's hash; 64 zeros for the first) and ``record_hash = HMAC-SHA256(key, prev_hash + canonical JSON of the record)``.
The key comes only from ``ZQ_AUDIT_KEY`` (at least 32 bytes; never in the repo, the operational DB or the ops side), so
whoever can write the database but lacks the key cannot recompute a valid chain after an edit, deletion or insertion.

A chain alone does not show what is missing at its end. After every append, under the same lock, the count and head
hash are written to the **anchor** (``ZQ_AUDIT_ANCHOR``, default ``<ZQ_DATA_DIR>/gov/audit_anchor.json``: outside the
operational DB and the ops platform; JSON ``{version, count, head_hash, updated_at, mac}``, the ``mac`` keyed too,
written atomically, mode 0600). The very first append anchors the empty log (count 0) before it inserts, so a log
never has a record without an anchor. ``verify`` fails when the log has fewer records than anchored (tail cut off,
every row deleted, table dropped), when the record at the anchored count is not the anchored head, when the anchor is
forged or missing under a non-empty log. The anchor is written *after* the commit: a crash in between leaves it
behind the log, never ahead; records beyond the anchor are accepted when they are on the keyed chain (the next append
anchors them).

Appenders in several processes keep one chain and one anchor: each append first takes an exclusive ``flock`` on
``<anchor>.lock``, then one transaction that takes the append lock (``opdb.lock_for_append``: SQLite's ``BEGIN
IMMEDIATE`` write lock, a table lock on PostgreSQL), checks the log against the anchor, reads the head and inserts after
it; after the commit it rewrites the anchor, still under the ``flock``. ``seq`` is the primary key, so a second record
with the same ``seq`` could never be stored anyway. A log found behind its anchor refuses appends
(``AuditLogTampered``), and so does a log without its anchor: continuing would overwrite the evidence.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from zqdata import opdb
from zqdata.settings import MIN_SECRET_BYTES, TZ, get_settings, secret_bytes

GENESIS = "0" * 64
_FIELDS = ("seq", "consumer", "scenario", "product", "partition_date", "delivered_at", "outcome", "reason",
           "row_count", "file_sha256", "snapshot")
TABLE = opdb.audit_deliveries
KEY_ENV = "ZQ_AUDIT_KEY"
MIN_KEY_BYTES = MIN_SECRET_BYTES
ANCHOR_VERSION = 1


class AuditError(RuntimeError):
    """The audit log cannot be appended to or trusted."""


class AuditKeyError(AuditError, ValueError):
    """``ZQ_AUDIT_KEY`` missing or too short (a configuration error)."""


class AuditLogTampered(AuditError):
    """The log is behind or different from its anchor: appends are refused so the evidence is not overwritten."""


@dataclass(frozen=True)
class AuditKey:
    """The HMAC key of the audit chain; repr never shows it."""

    secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "AuditKey(<redacted>)"

    @classmethod
    def from_secret(cls, secret: bytes | str) -> "AuditKey":
        raw = secret_bytes(secret, env=KEY_ENV, what_cn="审计日志密钥", what_en="audit log key", error=AuditKeyError)
        return cls(raw)

    def mac(self, message: str) -> str:
        return hmac.new(self.secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


def key_from_env() -> AuditKey:
    """The audit chain's key from ``ZQ_AUDIT_KEY``; a clear error when it is absent or short."""
    secret = os.environ.get(KEY_ENV, "")
    if not secret:
        raise AuditKeyError(
            f"未设置审计日志密钥环境变量 {KEY_ENV} (the audit log key {KEY_ENV} is required to append to or verify the "
            "delivery audit log; it is kept apart from the operational DB and the ops platform)")
    return AuditKey.from_secret(secret)


def anchor_path() -> Path:
    """Where the anchor is kept (``ZQ_AUDIT_ANCHOR``, default ``<ZQ_DATA_DIR>/gov/audit_anchor.json``)."""
    return get_settings().audit_anchor


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    consumer: str
    scenario: str
    product: str
    partition_date: dt.date | None
    delivered_at: str
    outcome: str
    reason: str
    row_count: int
    file_sha256: str
    snapshot: str
    prev_hash: str
    record_hash: str


@dataclass(frozen=True)
class Anchor:
    count: int
    head_hash: str
    updated_at: str


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: ``problems`` (empty when intact) and what the log and its anchor hold."""

    problems: list[str]
    records: int
    head_hash: str
    anchor: Anchor | None
    notes: list[str]


def canonical(values: dict) -> str:
    """The hashed form of a record: its fields (no hashes) as sorted, compact JSON."""
    doc = {k: (values[k].isoformat() if isinstance(values[k], dt.date) else values[k]) for k in _FIELDS}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_hash(prev_hash: str, values: dict, key: AuditKey | None = None) -> str:
    """HMAC-SHA256(key, prev_hash + canonical record); the key from ``ZQ_AUDIT_KEY`` when not given."""
    return (key or key_from_env()).mac(prev_hash + canonical(values))


def _anchor_mac(key: AuditKey, count: int, head: str, updated_at: str) -> str:
    # Its own prefix: an anchor's MAC is never a valid record hash, nor the reverse (a record's message is hex first).
    return key.mac(f"zq-audit-anchor|v{ANCHOR_VERSION}|{TABLE.name}|{count}|{head}|{updated_at}")


def read_anchor(key: AuditKey, path: Path | None = None) -> Anchor | None:
    """The anchor (None when there is none yet); AuditLogTampered when it is unreadable or its MAC is wrong."""
    path = path or anchor_path()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditLogTampered(f"审计锚点 {path} 无法读取 (audit anchor unreadable, forged or corrupt): {exc}") from None
    try:
        anchor = Anchor(count=int(doc["count"]), head_hash=str(doc["head_hash"]), updated_at=str(doc["updated_at"]))
        mac = str(doc["mac"])
    except (KeyError, TypeError, ValueError):
        raise AuditLogTampered(f"审计锚点 {path} 格式错误 (audit anchor forged or corrupt: fields missing)") from None
    if not hmac.compare_digest(mac, _anchor_mac(key, anchor.count, anchor.head_hash, anchor.updated_at)):
        raise AuditLogTampered(f"审计锚点 {path} 的校验码不符 (audit anchor forged, or made with another key)")
    return anchor


def _write_anchor(path: Path, key: AuditKey, count: int, head: str) -> None:
    """Replace the anchor atomically (temp file in the same folder, fsync, os.replace, fsync of the folder), 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    updated_at = dt.datetime.now(TZ).isoformat(timespec="microseconds")
    doc = {"version": ANCHOR_VERSION, "table": TABLE.name, "count": count, "head_hash": head, "updated_at": updated_at,
           "mac": _anchor_mac(key, count, head, updated_at)}
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(doc, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _anchor_lock(path: Path) -> Iterator[None]:
    """Exclusive lock of this host's appenders around an append and its anchor write (``<anchor>.lock``)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _text(value: str | None, limit: int | None = None) -> str:
    """A requester's value as it can be stored on both engines: undecodable bytes and NUL escaped, cut to the column."""
    text = (value or "").encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def _has_table(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table(TABLE.name)


def append_delivery(db: sa.Engine, *, consumer: str, scenario: str, product: str, partition_date: dt.date | None,
                    outcome: str, reason: str, row_count: int, file_sha256: str, snapshot: str = "",
                    delivered_at: dt.datetime | None = None, key: AuditKey | None = None,
                    anchor: Path | None = None) -> AuditRecord:
    """Append one delivery attempt to the chain (one transaction under the append lock), anchor it, and return it.

    AuditKeyError without the key; AuditLogTampered (nothing appended, anchor kept) when the log is behind or different
    from its anchor.
    """
    if outcome not in ("delivered", "denied"):
        raise ValueError(f"outcome must be delivered|denied, got {outcome!r}")
    when = delivered_at or dt.datetime.now(TZ)
    if when.tzinfo is None:
        raise ValueError(f"naive delivered_at {when!r}: audit times carry their zone")
    key = key or key_from_env()
    path = anchor or anchor_path()
    when_text = when.astimezone(TZ).isoformat(timespec="microseconds")
    with _anchor_lock(path):
        anchored = read_anchor(key, path)
        with opdb.transaction(db) as conn:
            if not _has_table(conn):
                if anchored is not None and anchored.count:
                    raise AuditLogTampered(f"审计表 {TABLE.name} 不存在，而锚点记录了 {anchored.count} 条 (audit table "
                                           f"{TABLE.name} missing: dropped; appends refused until investigated)")
                TABLE.create(conn)
            opdb.lock_for_append(conn, TABLE)
            last = conn.execute(sa.select(TABLE.c.seq, TABLE.c.record_hash)
                                .order_by(TABLE.c.seq.desc()).limit(1)).first()
            seq, prev = (int(last.seq) + 1, last.record_hash) if last else (1, GENESIS)
            if anchored is not None:
                _check_against_anchor(conn, anchored, seq - 1)
            elif last is not None:  # records, no anchor: deleted (a cut tail would be anchored by this append)
                raise AuditLogTampered(
                    f"审计锚点 {path} 缺失，而日志已有 {seq - 1} 条：停止追加 (audit anchor missing under a log of "
                    f"{seq - 1} records: deleted, or the log was moved here; appends refused until investigated)")
            else:  # the first record: the empty log is anchored before it, so no record is ever without an anchor
                _write_anchor(path, key, 0, GENESIS)
            values = {"seq": seq, "consumer": _text(consumer, 128), "scenario": _text(scenario, 128),
                      "product": _text(product, 128), "partition_date": partition_date, "delivered_at": when_text,
                      "outcome": outcome, "reason": _text(reason), "row_count": int(row_count),
                      "file_sha256": _text(file_sha256, 64), "snapshot": _text(snapshot, 256)}
            h = record_hash(prev, values, key)
            conn.execute(sa.insert(TABLE).values(**values, prev_hash=prev, record_hash=h))
        # After the commit, still under the lock: the anchor is never ahead of the committed log (see the module doc).
        _write_anchor(path, key, seq, h)
    return AuditRecord(**values, prev_hash=prev, record_hash=h)


def _check_against_anchor(conn: sa.Connection, anchored: Anchor, last_seq: int) -> None:
    if last_seq < anchored.count:
        raise AuditLogTampered(
            f"审计日志只有 {last_seq} 条，锚点记录了 {anchored.count} 条：日志被截断或删除，停止追加 (audit log truncated: "
            f"{last_seq} records, {anchored.count} anchored; appends refused until investigated)")
    if anchored.count:
        at = conn.execute(sa.select(TABLE.c.record_hash).where(TABLE.c.seq == anchored.count)).scalar()
        if not hmac.compare_digest(str(at or ""), anchored.head_hash):
            raise AuditLogTampered(
                f"序号 {anchored.count} 的哈希与锚点不符，停止追加 (audit record {anchored.count} differs from the "
                "anchored head: edited or re-chained; appends refused until investigated)")


def read_chain(db: sa.Engine) -> list[AuditRecord]:
    """Every record in chain order (by seq); empty when nothing was logged yet (or the table is missing)."""
    cols = [*_FIELDS, "prev_hash", "record_hash"]
    with db.connect() as conn:
        if not _has_table(conn):
            return []
        rows = conn.execute(sa.select(*(TABLE.c[c] for c in cols)).order_by(TABLE.c.seq, TABLE.c.record_hash)).all()
    return [AuditRecord(**dict(zip(cols, r))) for r in rows]


def verify(db: sa.Engine, key: AuditKey | None = None, anchor: Path | None = None) -> Verification:
    """Recompute the keyed chain and compare it with the anchor.

    Problems: an edited, deleted, inserted or reordered record (also when the chain was recomputed without the key);
    fewer records than anchored (tail cut off, every row deleted, table dropped); the anchored head not at the anchored
    position; a forged anchor; no anchor under a non-empty log (the first append anchors the empty log before it
    inserts). Records beyond the anchor on the keyed chain are accepted (an append interrupted between its commit and
    its anchor write), and noted.
    """
    key = key or key_from_env()
    path = anchor or anchor_path()
    problems: list[str] = []
    notes: list[str] = []
    # The anchor first: it is written after the log's commit, so a log read after it is never behind it by an append
    # that happened in between.
    try:
        anchored, anchor_problem = read_anchor(key, path), None
    except AuditLogTampered as exc:
        anchored, anchor_problem = None, str(exc)
    with db.connect() as conn:
        table_there = _has_table(conn)
    if not table_there:
        problems.append(f"审计表 {TABLE.name} 不存在 (audit table {TABLE.name} missing: dropped)")
    chain = read_chain(db) if table_there else []
    prev = GENESIS
    for i, rec in enumerate(chain, start=1):
        values = {k: getattr(rec, k) for k in _FIELDS}
        if rec.seq != i:
            problems.append(f"第 {i} 条记录的序号为 {rec.seq}：记录被删除或插入 (seq gap/duplicate: expected {i}, found {rec.seq})")
        if rec.prev_hash != prev:
            problems.append(f"序号 {rec.seq}：prev_hash 与上一条记录不符，链被断开 (chain broken before seq {rec.seq})")
        if not hmac.compare_digest(record_hash(rec.prev_hash, values, key), rec.record_hash):
            problems.append(f"序号 {rec.seq}：记录内容与密钥哈希不符，记录被篡改 (record {rec.seq} was edited, "
                            "or re-chained without the key)")
        prev = rec.record_hash
    head = chain[-1].record_hash if chain else GENESIS
    if anchor_problem:
        problems.append(anchor_problem)
        return Verification(problems, len(chain), head, None, notes)
    n = len(chain)
    if anchored is None:
        if n:
            problems.append(f"审计锚点 {path} 缺失，而日志有 {n} 条 (audit anchor missing: deleted, or the log was "
                            "moved here from elsewhere)")
    elif n == 0 and anchored.count:
        problems.append(f"审计日志为空，而锚点记录了 {anchored.count} 条 (audit log empty but {anchored.count} records "
                        "anchored: every row deleted, or the table dropped)")
    elif n < anchored.count:
        problems.append(f"审计日志只有 {n} 条，锚点记录了 {anchored.count} 条 (audit log truncated: {n} records, "
                        f"{anchored.count} anchored)")
    elif anchored.count:
        if not hmac.compare_digest(chain[anchored.count - 1].record_hash, anchored.head_hash):
            problems.append(f"序号 {anchored.count} 的哈希与锚点不符 (record {anchored.count} differs from the anchored "
                            "head: the log was edited or re-chained)")
        if n > anchored.count:
            notes.append(f"{n - anchored.count} record(s) after the anchor, on the keyed chain: an append was "
                         "interrupted between its commit and its anchor write; the next append anchors them")
    return Verification(problems, n, head, anchored, notes)


def verify_chain(db: sa.Engine, key: AuditKey | None = None, anchor: Path | None = None) -> list[str]:
    """Problems found in the log against its key and anchor (empty when intact); see ``verify``."""
    return verify(db, key, anchor).problems


def printable(value: str | None) -> str:
    """A logged value for display: control characters (newlines, escapes) shown escaped, so a requester's input can
    never forge or hide a line of the log's listing."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in (value or ""))
