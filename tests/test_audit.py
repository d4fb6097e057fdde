"""The hash-chained delivery log in the operational DB: intact chains verify; any edit, deletion or insertion is detected."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from zqdata.audit import GENESIS, append_delivery, read_chain, record_hash, verify_chain
from zqdata.opdb import audit_deliveries as T
from zqdata.settings import TZ


@pytest.fixture
def chain_db(opdb):
    for i in range(4):
        append_delivery(opdb, consumer=f"c{i}", scenario="sme_credit_profile", product="ops_sme_credit_profile",
                        partition_date=dt.date(2025, 5, 1 + i), outcome="delivered" if i % 2 == 0 else "denied",
                        reason="" if i % 2 == 0 else "wrong credential", row_count=10 * i, file_sha256="ab" * 32,
                        snapshot=f"products/ops_sme_credit_profile/2025-05-0{1 + i}/{'0' * 16}/data.parquet"
                        if i % 2 == 0 else "",
                        delivered_at=dt.datetime(2025, 5, 2 + i, 1, 0, tzinfo=dt.timezone.utc))
    return opdb


def _execute(db: sa.Engine, *statements) -> None:
    with db.begin() as conn:
        for stmt in statements:
            conn.execute(stmt)


def test_chain_links_each_record_to_the_previous_one(chain_db):
    chain = read_chain(chain_db)
    assert [r.seq for r in chain] == [1, 2, 3, 4]
    assert chain[0].prev_hash == GENESIS
    for prev, rec in zip(chain, chain[1:]):
        assert rec.prev_hash == prev.record_hash
    assert chain[0].delivered_at == dt.datetime(2025, 5, 2, 9, 0, tzinfo=TZ).isoformat(timespec="microseconds")
    assert chain[0].partition_date == dt.date(2025, 5, 1)
    assert chain[0].snapshot.endswith("/data.parquet") and chain[1].snapshot == ""
    assert verify_chain(chain_db) == []


@pytest.mark.parametrize("column,value", [("row_count", 999), ("outcome", "delivered"), ("consumer", "someone_else"),
                                          ("file_sha256", "cd" * 32), ("snapshot", "products/x/2025-05-02/f/data.parquet"),
                                          ("partition_date", dt.date(2025, 6, 1))])
def test_editing_one_record_is_detected(chain_db, column, value):
    _execute(chain_db, sa.update(T).where(T.c.seq == 2).values({column: value}))
    problems = verify_chain(chain_db)
    assert problems and all("2" in p for p in problems)
    assert any("edited" in p for p in problems)


def test_deleting_a_record_is_detected(chain_db):
    _execute(chain_db, sa.delete(T).where(T.c.seq == 2))
    problems = verify_chain(chain_db)
    assert any("seq gap" in p for p in problems) and any("chain broken" in p for p in problems)


def test_inserting_a_forged_record_is_detected_even_with_a_valid_own_hash(chain_db):
    first = read_chain(chain_db)[0]
    forged = {"seq": 2, "consumer": "intruder", "scenario": "sme_credit_profile", "product": "ops_sme_credit_profile",
              "partition_date": dt.date(2025, 5, 1), "delivered_at": first.delivered_at, "outcome": "delivered",
              "reason": "", "row_count": 1, "file_sha256": "", "snapshot": ""}
    h = record_hash(first.record_hash, forged)
    _execute(chain_db,  # shift in two steps: seq is the primary key, checked row by row
             sa.update(T).where(T.c.seq >= 2).values(seq=T.c.seq + 1000),
             sa.update(T).where(T.c.seq >= 1000).values(seq=T.c.seq - 999),
             sa.insert(T).values(**forged, prev_hash=first.record_hash, record_hash=h))
    assert [r.seq for r in read_chain(chain_db)] == [1, 2, 3, 4, 5]
    assert any("chain broken before seq 3" in p for p in verify_chain(chain_db))


def test_appending_after_verification_keeps_the_chain_valid(chain_db):
    append_delivery(chain_db, consumer="c9", scenario="", product="p", partition_date=None, outcome="denied",
                    reason="unknown consumer", row_count=0, file_sha256="")
    assert verify_chain(chain_db) == [] and read_chain(chain_db)[-1].seq == 5
    assert read_chain(chain_db)[-1].partition_date is None


def test_an_empty_log_verifies(opdb):
    assert read_chain(opdb) == [] and verify_chain(opdb) == []


def test_outcome_and_zone_are_checked(opdb):
    with pytest.raises(ValueError, match="delivered|denied"):
        append_delivery(opdb, consumer="c", scenario="", product="p", partition_date=None, outcome="maybe",
                        reason="", row_count=0, file_sha256="")
    with pytest.raises(ValueError, match="naive"):
        append_delivery(opdb, consumer="c", scenario="", product="p", partition_date=None, outcome="denied",
                        reason="", row_count=0, file_sha256="", delivered_at=dt.datetime(2025, 5, 2, 9, 0))
    assert read_chain(opdb) == []
