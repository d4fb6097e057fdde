"""数据需求 (Art. 18): the operator's unmet data needs, raised with the agency that holds the data and tracked until met.

A request names the scenario, the datasets and fields wanted (a field may not exist yet: that is the need) and why. It is
routed to the agency of its datasets in the registry (datasets of several agencies give one request per agency), and
moves submitted 已提交 → coordinating 协调中 → agreed 已同意 / declined 未同意 → fulfilled 已满足; fulfilled names the
registration record (zqdata.governance.registration) of the dataset change it led to. Every state change is an event
with who and when. Tables ``demand_requests`` and ``demand_events`` of the operational DB (zqdata.opdb).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from zqdata import opdb
from zqdata.governance.procedure import Procedure, ProcedureError, default_actor, event_time
from zqdata.governance.registration import RegistrationError, get_registration
from zqdata.opdb import demand_events as events_t
from zqdata.opdb import demand_requests as demand_t
from zqdata.registry import Registry

STATES = ("submitted", "coordinating", "agreed", "declined", "fulfilled")
STATE_CN = {"submitted": "已提交", "coordinating": "协调中", "agreed": "已同意", "declined": "未同意",
            "fulfilled": "已满足"}
TRANSITIONS = {"submitted": ("coordinating",), "coordinating": ("agreed", "declined"), "agreed": ("fulfilled",)}
FINAL = ("declined", "fulfilled")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DemandError(ProcedureError):
    """An invalid request, an unknown one, or a state change the procedure does not allow."""


DEMANDS = Procedure(demand_t, events_t, "demand_id", FINAL, STATE_CN, DemandError, "数据需求", "demand request",
                    "demand")


@dataclass(frozen=True)
class DemandRequest:
    demand_id: str
    scenario: str
    agency: str
    datasets: list[str]
    fields: list[str]
    reason: str
    state: str
    registration_id: str | None
    requested_by: str
    requested_at: dt.datetime
    updated_at: dt.datetime

    def line(self) -> str:
        return (f"{self.demand_id}  {STATE_CN[self.state]}({self.state})  场景 {self.scenario}  → {self.agency}  "
                f"{', '.join(self.datasets)}  字段 {', '.join(self.fields) or '-'}"
                + (f"  登记 {self.registration_id}" if self.registration_id else ""))


def _demand(row: Mapping[str, Any]) -> DemandRequest:
    d = dict(row)
    d["datasets"] = json.loads(d["datasets"])
    d["fields"] = json.loads(d["fields"])
    return DemandRequest(**d)


def _qualified_fields(datasets: Sequence[str], fields: Iterable[str]) -> list[str]:
    """Fields as ``dataset.field``; a bare name belongs to the only dataset of the request."""
    out = []
    for raw in fields:
        name = raw.strip()
        ds, _, fname = name.rpartition(".")
        if not ds:
            if len(datasets) != 1:
                raise DemandError(f"字段 {name!r} 须写成 数据集.字段 (several datasets: write dataset.field)")
            ds = datasets[0]
        if ds not in datasets:
            raise DemandError(f"字段 {name!r} 的数据集 {ds} 不在本需求的数据集中 (field of a dataset not requested)")
        if not _NAME.match(fname):
            raise DemandError(f"字段名无效 {fname!r}：小写字母开头，仅含小写字母、数字与下划线 (invalid field name)")
        out.append(f"{ds}.{fname}")
    return sorted(set(out))


def add_demand(engine: sa.Engine, registry: Registry, scenario: str, datasets: Sequence[str], fields: Iterable[str],
               reason: str, actor: str | None = None, now: dt.datetime | None = None) -> list[DemandRequest]:
    """Record an unmet data need, routed to the agency of its datasets (one request per agency); returns them."""
    actor = default_actor(actor)
    at = event_time(now)
    scenario, reason = (scenario or "").strip(), (reason or "").strip()
    if not scenario:
        raise DemandError("请说明需求所属场景 (--scenario is required)")
    if not reason:
        raise DemandError("请说明需求理由 (--reason is required)")
    wanted = sorted(set(d.strip() for d in datasets if d.strip()))
    if not wanted:
        raise DemandError("请至少指明一个数据集 (--dataset is required)")
    unknown = [d for d in wanted if d not in registry.datasets]
    if unknown:
        raise DemandError(f"未登记的数据集 {', '.join(unknown)} (unknown dataset; see registry/datasets)")
    qualified = _qualified_fields(wanted, fields)
    by_agency: dict[str, list[str]] = {}
    for d in wanted:
        by_agency.setdefault(registry.datasets[d].agency, []).append(d)
    created = []
    with opdb.transaction(engine) as conn:
        for agency, ds in sorted(by_agency.items()):
            values = dict(demand_id="DR-" + uuid.uuid4().hex[:12], scenario=scenario, agency=agency,
                          datasets=json.dumps(ds, ensure_ascii=False),
                          fields=json.dumps([f for f in qualified if f.split(".", 1)[0] in ds], ensure_ascii=False),
                          reason=reason, state="submitted", registration_id=None, requested_by=actor,
                          requested_at=at, updated_at=at)
            conn.execute(sa.insert(demand_t).values(**values))
            _event(conn, values["demand_id"], None, "submitted", actor, reason, at)
            created.append(_demand(values))
    return created


def _event(conn: sa.Connection, demand_id: str, from_state: str | None, to_state: str, actor: str, note: str | None,
           at: dt.datetime) -> None:
    conn.execute(sa.insert(events_t).values(demand_id=demand_id, from_state=from_state, to_state=to_state,
                                            actor=actor, note=note, event_at=at))


def advance_demand(engine: sa.Engine, demand_id: str, to: str | None = None, *, registration_id: str | None = None,
                   actor: str | None = None, note: str | None = None, now: dt.datetime | None = None) -> DemandRequest:
    """Move a request to its next state (``to`` is needed where there are two: agreed or declined).

    Declining needs a ``note`` (the agency's reason); fulfilled needs ``registration_id``, a registration record (not
    rejected) of one of the request's datasets. Anything else raises DemandError with a one-line reason.
    """
    actor = default_actor(actor)
    at = event_time(now)
    with opdb.transaction(engine) as conn:
        row = DEMANDS.open_row(conn, demand_id)
        req = _demand(row)
        allowed = TRANSITIONS[req.state]
        if to is None:
            if len(allowed) > 1:
                raise DemandError(f"数据需求 {demand_id} 处于「{STATE_CN[req.state]}」，请用 --to 指明 "
                                  f"{' 或 '.join(allowed)} (choose the next state with --to)")
            to = allowed[0]
        if to not in allowed:
            raise DemandError(f"数据需求 {demand_id} 处于「{STATE_CN[req.state]}」，只能变为 "
                              f"{'/'.join(allowed)}，不能到 {to} (invalid transition {req.state} → {to})")
        if to == "declined" and not (note or "").strip():
            raise DemandError("未同意须用 --note 说明理由 (declining needs the reason in --note)")
        if registration_id and to != "fulfilled":
            raise DemandError("--registration 只在需求满足 (fulfilled) 时使用 (a registration is linked on fulfilled)")
        updates: dict[str, Any] = {"state": to, "updated_at": at}
        if to == "fulfilled":
            if not registration_id:
                raise DemandError("需求满足须用 --registration 关联其带来的登记记录 (fulfilled needs --registration <id>)")
            try:
                rec = get_registration(conn, registration_id)
            except RegistrationError as exc:
                raise DemandError(str(exc)) from None
            if rec.subject_kind != "dataset" or rec.subject not in req.datasets:
                raise DemandError(f"登记记录 {registration_id} 属于 {rec.subject}，不是本需求的数据集 "
                                  f"{', '.join(req.datasets)} (registration of another subject)")
            if rec.state == "rejected":
                raise DemandError(f"登记记录 {registration_id} 已驳回，不能作为需求满足的依据 (registration rejected)")
            updates["registration_id"] = registration_id
        conn.execute(sa.update(demand_t).where(demand_t.c.demand_id == demand_id).values(**updates))
        _event(conn, demand_id, req.state, to, actor, note, at)
        return _demand({**row, **updates, "datasets": row["datasets"], "fields": row["fields"]})


def get_demand(engine: sa.Engine, demand_id: str) -> DemandRequest:
    return _demand(DEMANDS.row(engine, demand_id))


def list_demands(engine: sa.Engine, state: str | Sequence[str] | None = None,
                 agency: str | None = None) -> list[DemandRequest]:
    """Demand requests, oldest first."""
    q = sa.select(demand_t)
    if state:
        q = q.where(demand_t.c.state.in_([state] if isinstance(state, str) else list(state)))
    if agency:
        q = q.where(demand_t.c.agency == agency)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(demand_t.c.requested_at, demand_t.c.demand_id)).mappings().all()
    return [_demand(r) for r in rows]


def demand_events(engine: sa.Engine, demand_id: str) -> list[dict[str, Any]]:
    """The request's state changes, oldest first."""
    return DEMANDS.history(engine, demand_id)
