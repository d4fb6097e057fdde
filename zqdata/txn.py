"""One DuckDB transaction, whole or not at all, whose error is always the first one.

`except: con.execute("rollback"); raise` hides the cause when the rollback fails too (after a failed COMMIT, e.g. a
full disk, DuckDB has already aborted the transaction and says "cannot rollback - no transaction is active"). Here
the rollback's own failure is only added as a note to the original exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb


def rollback_keeping_cause(con: duckdb.DuckDBPyConnection, exc: BaseException) -> None:
    """Roll back; if that fails, note it on ``exc`` (which the caller re-raises) instead of replacing it."""
    try:
        con.execute("rollback")
    except duckdb.Error as rb:
        exc.add_note(f"(回滚亦失败 rollback also failed: {rb})")


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN … COMMIT; on any error a rollback that never hides the error."""
    con.execute("begin transaction")
    try:
        yield con
        con.execute("commit")
    except BaseException as exc:
        rollback_keeping_cause(con, exc)
        raise
