"""Append-only, hash-chained delivery log (Art. 25: identity, access, audit trail) in the operational database.

The table is ``opdb.audit_deliveries`` (SQLite WAL by default, PostgreSQL by ``ZQ_OPDB_URL``), never a DuckDB file, so a
delivery can be logged while the nightly run holds the warehouse files. Each record carries ``prev_hash`` (the previous
record's hash; 64 zeros for the first) and ``record_hash = sha256(prev_hash + canonical JSON of the record)``, so
editing, deleting or inserting a record breaks the chain and ``verify_chain`` names where.

Appenders in several processes keep one chain: each append is one transaction that first takes the append lock
(``opdb.lock_for_append``: SQLite's ``BEGIN IMMEDIATE`` write lock, a table lock on PostgreSQL), then reads the head and
inserts after it; ``seq`` is the primary key, so a second record with the same ``seq`` could never be stored anyway.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

import sqlalchemy as sa

from zqdata import opdb
from zqdata.settings import TZ

GENESIS = "0" * 64
_FIELDS = ("seq", "consumer", "scenario", "product", "partition_date", "delivered_at", "outcome", "reason",
           "row_count", "file_sha256", "snapshot")
TABLE = opdb.audit_deliveries


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


def canonical(values: dict) -> str:
    """The hashed form of a record: its fields (no hashes) as sorted, compact JSON."""
    doc = {k: (values[k].isoformat() if isinstance(values[k], dt.date) else values[k]) for k in _FIELDS}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_hash(prev_hash: str, values: dict) -> str:
    """sha256(prev_hash + canonical record)."""
    return hashlib.sha256((prev_hash + canonical(values)).encode("utf-8")).hexdigest()


def append_delivery(db: sa.Engine, *, consumer: str, scenario: str, product: str, partition_date: dt.date | None,
                    outcome: str, reason: str, row_count: int, file_sha256: str, snapshot: str = "",
                    delivered_at: dt.datetime | None = None) -> AuditRecord:
    """Append one delivery attempt to the chain (one transaction, under the append lock) and return it."""
    if outcome not in ("delivered", "denied"):
        raise ValueError(f"outcome must be delivered|denied, got {outcome!r}")
    when = delivered_at or dt.datetime.now(TZ)
    if when.tzinfo is None:
        raise ValueError(f"naive delivered_at {when!r}: audit times carry their zone")
    when_text = when.astimezone(TZ).isoformat(timespec="microseconds")
    with opdb.transaction(db) as conn:
        opdb.lock_for_append(conn, TABLE)
        last = conn.execute(sa.select(TABLE.c.seq, TABLE.c.record_hash).order_by(TABLE.c.seq.desc()).limit(1)).first()
        seq, prev = (int(last.seq) + 1, last.record_hash) if last else (1, GENESIS)
        values = {"seq": seq, "consumer": consumer, "scenario": scenario, "product": product,
                  "partition_date": partition_date, "delivered_at": when_text, "outcome": outcome, "reason": reason,
                  "row_count": int(row_count), "file_sha256": file_sha256, "snapshot": snapshot}
        h = record_hash(prev, values)
        conn.execute(sa.insert(TABLE).values(**values, prev_hash=prev, record_hash=h))
    return AuditRecord(**values, prev_hash=prev, record_hash=h)


def read_chain(db: sa.Engine) -> list[AuditRecord]:
    """Every record in chain order (by seq); empty when nothing was logged yet."""
    cols = [*_FIELDS, "prev_hash", "record_hash"]
    with db.connect() as conn:
        rows = conn.execute(sa.select(*(TABLE.c[c] for c in cols)).order_by(TABLE.c.seq, TABLE.c.record_hash)).all()
    return [AuditRecord(**dict(zip(cols, r))) for r in rows]


def verify_chain(db: sa.Engine) -> list[str]:
    """Problems found in the chain (empty when intact): edited, deleted, inserted or reordered records.

    Deleting the newest records leaves a valid shorter chain; compare the head hash with one kept elsewhere
    (e.g. the last receipt) to detect truncation.
    """
    problems: list[str] = []
    prev = GENESIS
    for i, rec in enumerate(read_chain(db), start=1):
        values = {k: getattr(rec, k) for k in _FIELDS}
        if rec.seq != i:
            problems.append(f"第 {i} 条记录的序号为 {rec.seq}：记录被删除或插入 (seq gap/duplicate: expected {i}, found {rec.seq})")
        if rec.prev_hash != prev:
            problems.append(f"序号 {rec.seq}：prev_hash 与上一条记录不符，链被断开 (chain broken before seq {rec.seq})")
        if record_hash(rec.prev_hash, values) != rec.record_hash:
            problems.append(f"序号 {rec.seq}：记录内容与哈希不符，记录被篡改 (record {rec.seq} was edited)")
        prev = rec.record_hash
    return problems


def printable(value: str | None) -> str:
    """A logged value for display: control characters (newlines, escapes) shown escaped, so a requester's input can
    never forge or hide a line of the log's listing."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in (value or ""))
