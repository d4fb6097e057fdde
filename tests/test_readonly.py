"""The CLI reads a warehouse file that a run is writing: it waits (bounded) instead of failing on DuckDB's lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pytest

from zqdata.readonly import connect_read_only


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True, **kw)


@pytest.fixture
def writer(tmp_path):
    """Another process holding the DuckDB file for writing until told to stop (a line on its stdin)."""
    path = tmp_path / "gov.duckdb"
    proc = _python(f"""
        import duckdb, sys
        con = duckdb.connect({str(path)!r})
        con.execute("create table t as select 42 as x")
        print("ready", flush=True)
        sys.stdin.readline()
        con.close()
    """, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"

    def release():
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=120)

    yield path, release
    release()


def test_waits_for_the_writer_in_another_process_then_reads(writer):
    path, release = writer
    with pytest.raises(duckdb.IOException, match="lock"):
        duckdb.connect(str(path), read_only=True)  # what the CLI did before: fail at once
    reader = _python(f"""
        from zqdata.readonly import connect_read_only
        with connect_read_only({str(path)!r}, wait_seconds=600) as con:
            print(con.execute("select x from t").fetchone()[0], flush=True)
    """, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "等待" in reader.stderr.readline()  # it says it waits (and keeps waiting: the writer still holds the file)
    assert reader.poll() is None
    release()
    out, _ = reader.communicate(timeout=300)
    assert reader.returncode == 0 and out.strip() == "42"


def test_gives_up_with_the_lock_error_after_the_bound(writer):
    path, _ = writer
    with pytest.raises(duckdb.IOException, match="lock"):
        connect_read_only(path, wait_seconds=0.5)
