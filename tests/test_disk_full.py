"""A full disk: the error names its cause, and nothing is half-written (issue 17, finding 5 and the disk-full fault).

The gov DuckDB lives on a small tmpfs mounted for the test (needs root and mount; skipped with the reason otherwise).
"""

from __future__ import annotations

import datetime as dt
import subprocess

import duckdb
import pytest

from zqdata.ingest import ingest_delivery
from zqdata.simulator import simulate_day
from zqdata.txn import rollback_keeping_cause, transaction

DAY = dt.date(2025, 6, 1)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_ingestion_names_the_cause_and_leaves_the_partition_untouched(small_disk, store, reg):
    simulate_day(store, reg, DAY, 200_000, 1)
    db = small_disk / "gov.duckdb"
    with duckdb.connect(str(db)) as con:
        small = ingest_delivery(con, store, reg, "subject_consent", DAY)  # fits
        assert small.status != "rejected"
        before = con.execute("select count(*) from ods.subject_consent").fetchone()[0]
        with pytest.raises(duckdb.Error) as err:
            ingest_delivery(con, store, reg, "bus_card_swipes", DAY)  # does not fit
    text = str(err.value) + "".join(getattr(err.value, "__notes__", []))
    assert "No space left on device" in text
    assert "cannot rollback" not in str(err.value)
    with duckdb.connect(str(db), read_only=True) as con:  # the file opens; the failed partition is not there
        assert con.execute("select count(*) from ods.subject_consent").fetchone()[0] == before > 0
        tables = {t for (t,) in con.execute("select table_name from information_schema.tables "
                                            "where table_schema = 'ods'").fetchall()}
        if "bus_card_swipes" in tables:
            assert con.execute("select count(*) from ods.bus_card_swipes").fetchone()[0] == 0


class _FailingCommit:
    """A connection whose COMMIT fails like a full disk and whose ROLLBACK then fails like DuckDB's after it."""

    def __init__(self):
        self.calls = []

    def execute(self, sql, *args):
        self.calls.append(sql)
        if sql == "commit":
            raise duckdb.IOException('IO Error: Could not write file "gov.duckdb": No space left on device')
        if sql == "rollback":
            raise duckdb.TransactionException("TransactionContext Error: cannot rollback - no transaction is active")
        return self


def test_a_failed_rollback_never_replaces_the_first_error():
    con = _FailingCommit()
    with pytest.raises(duckdb.IOException, match="No space left on device") as err:
        with transaction(con):
            con.execute("insert into t values (1)")
    assert any("cannot rollback" in n for n in err.value.__notes__)
    assert con.calls == ["begin transaction", "insert into t values (1)", "commit", "rollback"]
    exc = ValueError("first")
    rollback_keeping_cause(con, exc)
    assert "rollback also failed" in exc.__notes__[0]
