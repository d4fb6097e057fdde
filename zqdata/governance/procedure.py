"""What the governance procedures kept in the operational DB share — registration (Art. 17, zqdata.governance.registration)
and data demand (Art. 18, zqdata.governance.demand): who acts and when, a record read (or locked for its state change)
by its id, no change out of a final state, and the record's history of state changes (its events table, oldest first).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from zqdata.settings import TZ


class ProcedureError(ValueError):
    """A state change, application or request the procedure does not allow, or an unknown record: a one-line reason
    (Chinese, then English in parentheses) meant for the person who asked."""


def default_actor(actor: str | None = None) -> str:
    """Who acts: ``actor`` when given, else the login of the process (``USER``); cut to the column's 256 characters."""
    return ((actor or "").strip() or os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown")[:256]


def event_time(now: dt.datetime | None = None) -> dt.datetime:
    """When it happens: ``now`` (tests) or the current time, in Asia/Shanghai."""
    return (now or dt.datetime.now(TZ)).astimezone(TZ)


@dataclass(frozen=True)
class Procedure:
    """The records of one procedure: their table (keyed by ``id_column``), their events table (with the same column),
    the final states, the states' Chinese names, and how errors name a record."""

    table: sa.Table
    events: sa.Table
    id_column: str  # demand_id | registration_id
    final: tuple[str, ...]
    state_cn: Mapping[str, str]
    error: type[ProcedureError]
    record_cn: str  # 数据需求 | 登记记录
    record_en: str  # demand request | registration record
    short_en: str  # demand | registration

    def _where(self, record_id: str) -> sa.Select:
        return sa.select(self.table).where(self.table.c[self.id_column] == record_id)

    def _unknown(self, record_id: str) -> ProcedureError:
        return self.error(f"没有{self.record_cn} {record_id} (unknown {self.record_en})")

    def row(self, engine: sa.Engine | sa.Connection, record_id: str) -> Mapping[str, Any]:
        """The record's row; the procedure's error when there is none."""
        if isinstance(engine, sa.Connection):
            row = engine.execute(self._where(record_id)).mappings().first()
        else:
            with engine.connect() as conn:
                row = conn.execute(self._where(record_id)).mappings().first()
        if row is None:
            raise self._unknown(record_id)
        return row

    def open_row(self, conn: sa.Connection, record_id: str) -> Mapping[str, Any]:
        """The record's row locked for a state change (in the caller's transaction); the procedure's error when there
        is none or it is in a final state already."""
        row = conn.execute(self._where(record_id).with_for_update()).mappings().first()
        if row is None:
            raise self._unknown(record_id)
        if row["state"] in self.final:
            raise self.error(f"{self.record_cn} {record_id} 已处于终态「{self.state_cn[row['state']]}」，不能再变更 "
                             f"({self.short_en} {record_id} is {row['state']}: no further transition)")
        return row

    def history(self, engine: sa.Engine, record_id: str) -> list[dict[str, Any]]:
        """The record's state changes, oldest first."""
        with engine.connect() as conn:
            rows = conn.execute(sa.select(self.events).where(self.events.c[self.id_column] == record_id)
                                .order_by(self.events.c.event_id)).mappings().all()
        return [dict(r) for r in rows]
