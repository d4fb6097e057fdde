"""The delivery log in the operational DB, HMAC-chained and anchored outside it: intact logs verify; any edit, deletion,
insertion, truncation, drop or re-chaining without the key is detected; every refused request is logged."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import stat

import pytest
import sqlalchemy as sa

from zqdata.audit import GENESIS, append_delivery, canonical, read_chain, record_hash, verify_chain
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


# -- keyed chain and anchors outside the operational DB (issue 11, finding 9) ----------------------------------------

WRONG_KEY = "an-attackers-own-key-not-the-platforms-0123456789"


def _rechain(db: sa.Engine, hasher, edit: dict) -> None:
    """What an attacker with write access to the DB (but not the key) can do: edit record 2, then recompute every hash
    after it with ``hasher(prev_hash, values)``."""
    from zqdata.audit import _FIELDS

    chain = read_chain(db)
    prev = chain[0].record_hash
    stmts = []
    for rec in chain[1:]:
        values = {k: getattr(rec, k) for k in _FIELDS} | (edit if rec.seq == 2 else {})
        h = hasher(prev, values)
        stmts.append(sa.update(T).where(T.c.seq == rec.seq).values(**values, prev_hash=prev, record_hash=h))
        prev = h
    _execute(db, *stmts)


def _verify_cli(capsys) -> tuple[int, str]:
    from zqdata.cli import main

    capsys.readouterr()
    rc = main(["audit", "verify"])
    return rc, capsys.readouterr().out


def test_an_untouched_log_verifies_against_its_anchor(chain_db, capsys):
    from zqdata.audit import anchor_path

    anchor = json.loads(anchor_path().read_text(encoding="utf-8"))
    assert (anchor["count"], anchor["head_hash"]) == (4, read_chain(chain_db)[-1].record_hash)
    assert anchor["updated_at"].endswith("+08:00") and len(anchor["mac"]) == 64
    assert stat.S_IMODE(anchor_path().stat().st_mode) == 0o600
    rc, out = _verify_cli(capsys)
    assert rc == 0 and "4 records" in out and "anchor" in out


def test_truncating_the_tail_is_detected(chain_db, capsys):
    _execute(chain_db, sa.delete(T).where(T.c.seq >= 3))
    assert [r.seq for r in read_chain(chain_db)] == [1, 2]  # a valid shorter chain
    problems = verify_chain(chain_db)
    assert any("truncated" in p and "2" in p and "4" in p for p in problems), problems
    rc, out = _verify_cli(capsys)
    assert rc == 1 and "truncated" in out


def test_deleting_every_row_is_detected(chain_db, capsys):
    _execute(chain_db, sa.delete(T))
    problems = verify_chain(chain_db)
    assert any("empty" in p and "4" in p for p in problems), problems
    rc, out = _verify_cli(capsys)
    assert rc == 1 and "no audit log yet" not in out


def test_dropping_the_table_is_detected(chain_db, capsys):
    from zqdata import opdb as opdb_module

    T.drop(chain_db)
    try:
        problems = verify_chain(chain_db)
        assert any("audit_deliveries" in p and "missing" in p for p in problems), problems
        rc, out = _verify_cli(capsys)
        assert rc == 1 and "missing" in out and "no audit log yet" not in out
    finally:
        opdb_module.metadata.create_all(chain_db)  # the engine is cached per process: give the next tests their table
    problems = verify_chain(chain_db)  # a fresh, empty table (what a new process would create) is no better
    assert any("empty" in p for p in problems), problems


def test_an_edit_with_the_plain_sha256_chain_recomputed_is_detected(chain_db, capsys):
    _rechain(chain_db, lambda prev, values: hashlib.sha256((prev + canonical(values)).encode("utf-8")).hexdigest(),
             {"consumer": "someone_else"})
    problems = verify_chain(chain_db)
    assert any("record 2 was edited" in p for p in problems), problems
    assert any("anchor" in p for p in problems), problems  # the head differs from the anchored one
    rc, out = _verify_cli(capsys)
    assert rc == 1 and "record 2 was edited" in out


def test_an_edit_rechained_with_a_wrong_key_is_detected(chain_db):
    from zqdata.audit import AuditKey

    wrong = AuditKey.from_secret(WRONG_KEY)
    _rechain(chain_db, lambda prev, values: record_hash(prev, values, wrong), {"row_count": 999})
    problems = verify_chain(chain_db)
    assert any("record 2 was edited" in p for p in problems) and any("anchor" in p for p in problems), problems
    assert verify_chain(chain_db, key=wrong) != []  # and the chain is not valid under that key either: record 1


def test_a_deleted_anchor_under_a_log_is_detected(chain_db):
    from zqdata.audit import anchor_path

    anchor_path().unlink()
    assert any("anchor" in p and "missing" in p for p in verify_chain(chain_db))


def test_a_forged_anchor_is_detected(chain_db):
    from zqdata.audit import anchor_path

    chain = read_chain(chain_db)
    _execute(chain_db, sa.delete(T).where(T.c.seq >= 3))
    doc = json.loads(anchor_path().read_text(encoding="utf-8"))
    anchor_path().write_text(json.dumps(doc | {"count": 2, "head_hash": chain[1].record_hash}), encoding="utf-8")
    assert any("anchor" in p and "forged" in p for p in verify_chain(chain_db))


def test_appends_are_refused_on_a_truncated_log_and_the_anchor_is_kept(chain_db):
    from zqdata.audit import AuditLogTampered, anchor_path

    before = anchor_path().read_bytes()
    _execute(chain_db, sa.delete(T))
    with pytest.raises(AuditLogTampered, match="truncated"):
        append_delivery(chain_db, consumer="c9", scenario="", product="p", partition_date=None, outcome="denied",
                        reason="x", row_count=0, file_sha256="")
    assert anchor_path().read_bytes() == before and read_chain(chain_db) == []


def test_a_crash_between_commit_and_anchor_write_is_not_reported_as_tampering(chain_db, monkeypatch):
    """The anchor is written after the commit, under the same lock: a crash in between leaves the anchor one record
    behind; rows beyond the anchor are accepted when they are on the keyed chain, the next append anchors them all."""
    from zqdata import audit

    real = audit._write_anchor
    monkeypatch.setattr(audit, "_write_anchor", lambda *a, **k: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError, match="power cut"):
        append_delivery(chain_db, consumer="c9", scenario="", product="p", partition_date=None, outcome="denied",
                        reason="x", row_count=0, file_sha256="")
    assert len(read_chain(chain_db)) == 5 and verify_chain(chain_db) == []
    monkeypatch.setattr(audit, "_write_anchor", real)
    append_delivery(chain_db, consumer="c10", scenario="", product="p", partition_date=None, outcome="denied",
                    reason="x", row_count=0, file_sha256="")
    assert json.loads(audit.anchor_path().read_text(encoding="utf-8"))["count"] == 6 and verify_chain(chain_db) == []


def test_the_key_is_required_and_long_enough(opdb, monkeypatch):
    from zqdata.audit import KEY_ENV, AuditKey, AuditKeyError

    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(AuditKeyError, match="ZQ_AUDIT_KEY"):
        append_delivery(opdb, consumer="c", scenario="", product="p", partition_date=None, outcome="denied",
                        reason="", row_count=0, file_sha256="")
    with pytest.raises(AuditKeyError, match="ZQ_AUDIT_KEY"):
        verify_chain(opdb)
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(AuditKeyError, match="32"):
        verify_chain(opdb)
    assert "short" not in repr(AuditKey.from_secret("x" * 32))


def test_cli_verify_without_the_key_is_a_configuration_error(chain_db, monkeypatch, capsys):
    monkeypatch.delenv("ZQ_AUDIT_KEY", raising=False)
    from zqdata.cli import main

    assert main(["audit", "verify"]) == 2
    assert "ZQ_AUDIT_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("argv,reason", [
    (["--consumer", "zq_rural_bank", "--product", "no_such_product", "--date", "2025-05-01"], "unknown product"),
    (["--consumer", "zq_rural_bank", "--product", "ops_sme_credit_profile", "--date", "2025-13-45\x1b[2J"], "bad date"),
    (["--consumer", "nobody\x1b[31m", "--product", "ops_sme_credit_profile", "--date", "2025-05-01"],
     "unknown consumer"),
    (["--consumer", "zq_transit_planning", "--product", "ops_sme_credit_profile", "--date", "2025-05-01"],
     "not registered for the scenario"),
    (["--consumer", "zq_rural_bank", "--date", "2025-05-01"], "missing"),
    (["--consumer", "zq_rural_bank", "--product", "ops_sme_credit_profile", "--date"], "rejected arguments"),
    (["--consumer", "zq_rural_bank", "--product", "ops_sme_credit_profile", "--date", "2025-05-01", "--as-admin"],
     "unrecognized arguments: --as-admin"),
])
def test_every_refused_delivery_request_is_logged_and_listed_safely(opdb, data_dir, tmp_path, monkeypatch, capsys,
                                                                      argv, reason):
    from zqdata.cli import main
    from zqdata.settings import repo_root

    consumer = argv[1]
    demo = dict(re.findall(r"^\| `(zq_[a-z_]+)` \|[^|]*\|[^|]*\| `([^`]+)` \|",  # as in docs/security.md
                           (repo_root() / "docs" / "security.md").read_text(encoding="utf-8"), flags=re.M))
    monkeypatch.setenv("ZQ_CONSUMER_CREDENTIAL", demo.get(consumer, "whatever"))
    try:
        rc = main(["deliver", *argv, "--out", str(tmp_path / "out")] if argv[-1] != "--date"
                  else ["deliver", "--out", str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse's own refusal
        rc = exc.code
    assert rc in (2, 3)
    (record,) = read_chain(opdb)
    assert record.outcome == "denied" and reason in record.reason, record
    assert record.consumer == consumer
    assert not (tmp_path / "out").exists()
    assert verify_chain(opdb) == []
    capsys.readouterr()
    assert main(["audit", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and "\x1b" not in listed[0] and reason in listed[0]


def test_odd_values_are_logged_within_the_columns(opdb):
    """A requester's value longer than the column, with a NUL or undecodable bytes, is still logged (PostgreSQL
    refuses NUL and over-long values), shortened and escaped."""
    rec = append_delivery(opdb, consumer="x" * 500 + "\x00", scenario="", product="p\udcff", partition_date=None,
                          outcome="denied", reason="r\x00", row_count=0, file_sha256="")
    (stored,) = read_chain(opdb)
    assert stored == rec and len(stored.consumer) <= 128 and "\x00" not in stored.reason
    assert verify_chain(opdb) == []


def test_a_log_cut_to_its_first_record_with_its_anchor_deleted_is_detected_and_refuses_appends(chain_db):
    """Whoever can write the operational DB and delete the anchor file (no key needed) cut the log to its first record:
    `verify` took that for the first append's crash window and the next append anchored the cut log (found in
    review). The first append anchors the empty log before it inserts, so a record without an anchor is tampering."""
    from zqdata.audit import AuditLogTampered, anchor_path

    assert len(read_chain(chain_db)) > 1 and verify_chain(chain_db) == []
    anchor_path().unlink()
    _execute(chain_db, sa.delete(T).where(T.c.seq > 1))
    assert any("anchor" in p and "missing" in p for p in verify_chain(chain_db))
    with pytest.raises(AuditLogTampered, match="anchor missing"):
        append_delivery(chain_db, consumer="zq_rural_bank", scenario="sme_credit_profile",
                        product="ops_sme_credit_profile", partition_date=dt.date(2025, 6, 1), outcome="delivered",
                        reason="", row_count=1, file_sha256="ab" * 32)
    assert len(read_chain(chain_db)) == 1 and any("missing" in p for p in verify_chain(chain_db))


def test_the_first_append_anchors_the_empty_log_before_it_inserts(opdb, monkeypatch):
    """A crash between the first record's commit and its anchor leaves an anchor of the empty log, not none."""
    from zqdata import audit
    from zqdata.audit import anchor_path, read_anchor

    written = []
    real = audit._write_anchor

    def crash_after_the_commit(path, key, count, head):
        written.append(count)
        if count:
            raise OSError("crash before the anchor of the first record")
        real(path, key, count, head)

    monkeypatch.setattr(audit, "_write_anchor", crash_after_the_commit)
    with pytest.raises(OSError):
        append_delivery(opdb, consumer="c", scenario="s", product="p", partition_date=None, outcome="denied",
                        reason="", row_count=0, file_sha256="")
    assert written == [0, 1]
    assert read_anchor(audit.key_from_env(), anchor_path()).count == 0
    monkeypatch.setattr(audit, "_write_anchor", real)
    assert verify_chain(opdb) == []  # one record beyond the anchor, on the keyed chain: accepted (and noted)
    append_delivery(opdb, consumer="c", scenario="s", product="p", partition_date=None, outcome="denied", reason="",
                    row_count=0, file_sha256="")
    assert len(read_chain(opdb)) == 2 and verify_chain(opdb) == []
