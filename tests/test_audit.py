"""The hash-chained delivery log: intact chains verify; any edit, deletion or insertion is detected."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pytest

from zqdata.audit import GENESIS, append_delivery, read_chain, record_hash, verify_chain
from zqdata.settings import TZ


@pytest.fixture
def ops(tmp_path: Path):
    con = duckdb.connect(str(tmp_path / "ops.duckdb"))
    for i in range(4):
        append_delivery(con, consumer=f"c{i}", scenario="sme_credit_profile", product="ops_sme_credit_profile",
                        partition_date=dt.date(2025, 5, 1 + i), outcome="delivered" if i % 2 == 0 else "denied",
                        reason="" if i % 2 == 0 else "wrong credential", row_count=10 * i, file_sha256="ab" * 32,
                        delivered_at=dt.datetime(2025, 5, 2 + i, 1, 0, tzinfo=dt.timezone.utc))
    yield con
    con.close()


def test_chain_links_each_record_to_the_previous_one(ops):
    chain = read_chain(ops)
    assert [r.seq for r in chain] == [1, 2, 3, 4]
    assert chain[0].prev_hash == GENESIS
    for prev, rec in zip(chain, chain[1:]):
        assert rec.prev_hash == prev.record_hash
    assert chain[0].delivered_at == dt.datetime(2025, 5, 2, 9, 0, tzinfo=TZ).isoformat(timespec="microseconds")
    assert verify_chain(ops) == []


@pytest.mark.parametrize("column,value", [("row_count", 999), ("outcome", "delivered"), ("consumer", "someone_else"),
                                          ("file_sha256", "cd" * 32)])
def test_editing_one_record_is_detected(ops, column, value):
    ops.execute(f"UPDATE audit.deliveries SET {column} = ? WHERE seq = 2", [value])
    problems = verify_chain(ops)
    assert problems and all("2" in p for p in problems)
    assert any("edited" in p for p in problems)


def test_deleting_a_record_is_detected(ops):
    ops.execute("DELETE FROM audit.deliveries WHERE seq = 2")
    problems = verify_chain(ops)
    assert any("seq gap" in p for p in problems) and any("chain broken" in p for p in problems)


def test_inserting_a_forged_record_is_detected_even_with_a_valid_own_hash(ops):
    first = read_chain(ops)[0]
    forged = {"seq": 2, "consumer": "intruder", "scenario": "sme_credit_profile", "product": "ops_sme_credit_profile",
              "partition_date": dt.date(2025, 5, 1), "delivered_at": first.delivered_at, "outcome": "delivered",
              "reason": "", "row_count": 1, "file_sha256": ""}
    h = record_hash(first.record_hash, forged)
    ops.execute("UPDATE audit.deliveries SET seq = seq + 1 WHERE seq >= 2")
    ops.execute("INSERT INTO audit.deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [*forged.values(), first.record_hash, h])
    assert any("chain broken before seq 3" in p for p in verify_chain(ops))


def test_appending_after_verification_keeps_the_chain_valid(ops):
    append_delivery(ops, consumer="c9", scenario="", product="p", partition_date=None, outcome="denied",
                    reason="unknown consumer", row_count=0, file_sha256="")
    assert verify_chain(ops) == [] and read_chain(ops)[-1].seq == 5
