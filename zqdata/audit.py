"""Append-only, hash-chained delivery log ``audit.deliveries`` in the ops DB (Art. 25: identity, access, audit trail).

Each record carries ``prev_hash`` (the previous record's hash; 64 zeros for the first) and
``record_hash = sha256(prev_hash + canonical JSON of the record)``, so editing, deleting or inserting a record
breaks the chain and ``verify_chain`` names where.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

import duckdb

from zqdata.settings import TZ

GENESIS = "0" * 64
_FIELDS = ("seq", "consumer", "scenario", "product", "partition_date", "delivered_at", "outcome", "reason",
           "row_count", "file_sha256")

DDL = """
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.deliveries (
    seq BIGINT NOT NULL,
    consumer VARCHAR NOT NULL,
    scenario VARCHAR NOT NULL,
    product VARCHAR NOT NULL,
    partition_date DATE,
    delivered_at VARCHAR NOT NULL,   -- ISO 8601, Asia/Shanghai (+08:00); text so the hashed form is exact
    outcome VARCHAR NOT NULL,        -- delivered | denied
    reason VARCHAR NOT NULL,
    row_count BIGINT NOT NULL,
    file_sha256 VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL,
    record_hash VARCHAR NOT NULL
);
"""


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
    prev_hash: str
    record_hash: str


def canonical(values: dict) -> str:
    """The hashed form of a record: its fields (no hashes) as sorted, compact JSON."""
    doc = {k: (values[k].isoformat() if isinstance(values[k], dt.date) else values[k]) for k in _FIELDS}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_hash(prev_hash: str, values: dict) -> str:
    """sha256(prev_hash + canonical record)."""
    return hashlib.sha256((prev_hash + canonical(values)).encode("utf-8")).hexdigest()


def ensure_audit_table(ops_con: duckdb.DuckDBPyConnection) -> None:
    ops_con.execute(DDL)


def append_delivery(ops_con: duckdb.DuckDBPyConnection, *, consumer: str, scenario: str, product: str,
                    partition_date: dt.date | None, outcome: str, reason: str, row_count: int, file_sha256: str,
                    delivered_at: dt.datetime | None = None) -> AuditRecord:
    """Append one delivery attempt to the chain (its own transaction) and return it."""
    if outcome not in ("delivered", "denied"):
        raise ValueError(f"outcome must be delivered|denied, got {outcome!r}")
    ensure_audit_table(ops_con)
    when = (delivered_at or dt.datetime.now(TZ)).astimezone(TZ).isoformat(timespec="microseconds")
    ops_con.execute("BEGIN TRANSACTION")
    try:
        last = ops_con.execute("SELECT seq, record_hash FROM audit.deliveries ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        values = {"seq": seq, "consumer": consumer, "scenario": scenario, "product": product,
                  "partition_date": partition_date, "delivered_at": when, "outcome": outcome, "reason": reason,
                  "row_count": int(row_count), "file_sha256": file_sha256}
        h = record_hash(prev, values)
        ops_con.execute(
            "INSERT INTO audit.deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [seq, consumer, scenario, product, partition_date, when, outcome, reason, int(row_count), file_sha256,
             prev, h],
        )
        ops_con.execute("COMMIT")
    except Exception:
        ops_con.execute("ROLLBACK")
        raise
    return AuditRecord(**values, prev_hash=prev, record_hash=h)


def read_chain(ops_con: duckdb.DuckDBPyConnection) -> list[AuditRecord]:
    """Every record in chain order (by seq); none when the log does not exist yet (works read-only)."""
    exists = ops_con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'audit' "
                             "AND table_name = 'deliveries' AND table_catalog = current_database()").fetchone()[0]
    if not exists:
        return []
    cols = [*_FIELDS, "prev_hash", "record_hash"]
    rows = ops_con.execute(f"SELECT {', '.join(cols)} FROM audit.deliveries ORDER BY seq, record_hash").fetchall()
    return [AuditRecord(**dict(zip(cols, r))) for r in rows]


def verify_chain(ops_con: duckdb.DuckDBPyConnection) -> list[str]:
    """Problems found in the chain (empty when intact): edited, deleted, inserted or reordered records.

    Deleting the newest records leaves a valid shorter chain; compare the head hash with one kept elsewhere
    (e.g. the last receipt) to detect truncation.
    """
    problems: list[str] = []
    prev = GENESIS
    for i, rec in enumerate(read_chain(ops_con), start=1):
        values = {k: getattr(rec, k) for k in _FIELDS}
        if rec.seq != i:
            problems.append(f"第 {i} 条记录的序号为 {rec.seq}：记录被删除或插入 (seq gap/duplicate: expected {i}, found {rec.seq})")
        if rec.prev_hash != prev:
            problems.append(f"序号 {rec.seq}：prev_hash 与上一条记录不符，链被断开 (chain broken before seq {rec.seq})")
        if record_hash(rec.prev_hash, values) != rec.record_hash:
            problems.append(f"序号 {rec.seq}：记录内容与哈希不符，记录被篡改 (record {rec.seq} was edited)")
        prev = rec.record_hash
    return problems
