"""登记 (Art. 17): registration records of data resources (datasets), data products and data services, kept as data in
the operational DB (``registrations`` and ``registration_events`` in zqdata.opdb), never in a warehouse file.

Procedure (national registration measures, 2025): 申请 applied → 受理 accepted → 形式审核 formal_review → 公示
public_notice → 赋码 code_assigned, or 驳回 rejected at any step before the code. Record types: 首次 first, 变更 change,
更正 correction, 注销 cancellation. Each record stores the registered version — canonical JSON of a dataset's fields
with their classification, or of a product's output columns (dbt manifest) — and its SHA-256. Every state change is an
event with who and when.

- ``sync_registrations`` (asset ``governance/registrations``): imports the registry's registration codes as first records
  in state code_assigned, applies for subjects that have none, and files a 变更 change record when a dataset's fields or
  a product's output columns differ from the subject's latest record. A rerun creates nothing.
- Bootstrap: the registry carries the codes of what was registered before this register existed (``registration:`` in
  ``registry/datasets/<code>.yaml``, ``product_registration:`` per scenario). Until a sync imported them,
  ``subject_status`` reads them from the registry, so deliveries work on a fresh operational DB.
- ``delivery_refusal``: a product without an assigned code, or whose registration is cancelled, is not delivered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from zqdata import opdb
from zqdata.governance.procedure import Procedure, ProcedureError, default_actor, event_time
from zqdata.opdb import registration_events as events_t
from zqdata.opdb import registrations as reg_t
from zqdata.registry import Dataset, Registry
from zqdata.registry import Registration as InitialRegistration
from zqdata.settings import repo_root

KINDS = ("dataset", "product", "service")
KIND_CN = {"dataset": "数据资源", "product": "数据产品", "service": "数据服务"}
_KIND_CODE = {"dataset": "ZY", "product": "CP", "service": "FW"}  # 资源 / 产品 / 服务, the middle part of a code
CODE_PREFIX = "ZQSJ"
RECORD_TYPES = ("first", "change", "correction", "cancellation")
RECORD_TYPE_CN = {"first": "首次登记", "change": "变更登记", "correction": "更正登记", "cancellation": "注销登记"}
STATES = ("applied", "accepted", "formal_review", "public_notice", "code_assigned", "rejected")
STATE_CN = {"applied": "申请", "accepted": "受理", "formal_review": "形式审核", "public_notice": "公示",
            "code_assigned": "赋码", "rejected": "驳回"}
NEXT_STATE = {"applied": "accepted", "accepted": "formal_review", "formal_review": "public_notice",
              "public_notice": "code_assigned"}
FINAL = ("code_assigned", "rejected")
MANIFEST_PATH = repo_root() / "dbt_project" / "target" / "manifest.json"
PRODUCT_MODELS = "models/ops/"  # the scenario products' dbt models


class RegistrationError(ProcedureError):
    """An unknown record, or a state change or application the procedure does not allow."""


REGISTRATIONS = Procedure(reg_t, events_t, "registration_id", FINAL, STATE_CN, RegistrationError, "登记记录",
                          "registration record", "registration")


@dataclass(frozen=True)
class RegistrationRecord:
    registration_id: str
    subject_kind: str
    subject: str
    seq: int
    record_type: str
    state: str
    code: str | None
    registered_on: dt.date | None
    version: dict[str, Any]
    version_hash: str
    previous_hash: str | None
    origin: str  # registry | sync | cli
    note: str | None
    applied_by: str
    applied_at: dt.datetime
    updated_at: dt.datetime

    def line(self) -> str:
        """One line for listings."""
        return (f"{self.registration_id}  {KIND_CN[self.subject_kind]} {self.subject:<26} "
                f"{RECORD_TYPE_CN[self.record_type]} {STATE_CN[self.state]}({self.state})  "
                f"{self.code or '-'}  版本 {self.version_hash[:12]}  {self.applied_at:%Y-%m-%d %H:%M}")


@dataclass(frozen=True)
class SubjectStatus:
    """Where a subject's registration stands: its code (None: not assigned), cancelled or not, pending records."""

    kind: str
    subject: str
    code: str | None
    registered_on: dt.date | None
    cancelled: bool
    state: str  # the latest record's state; "unregistered" without any record
    pending: tuple[str, ...]  # records still in the procedure
    source: str  # opdb | registry (code from the registry, not imported yet) | none

    @property
    def deliverable(self) -> bool:
        return self.code is not None and not self.cancelled

    @property
    def label(self) -> str:
        if self.cancelled:
            return "已注销 cancelled"
        if self.code:
            return "已登记 registered" + ("（有在办登记 pending change）" if self.pending else "")
        return "未赋码 no code" + (f"（{STATE_CN.get(self.state, self.state)}）" if self.state in STATE_CN else "")


@dataclass
class SyncReport:
    """What ``sync_registrations`` created."""

    imported: list[RegistrationRecord] = field(default_factory=list)  # first records from the registry's codes
    applied: list[RegistrationRecord] = field(default_factory=list)  # first records of subjects without a code
    changed: list[RegistrationRecord] = field(default_factory=list)  # change records: the content differs
    skipped: list[str] = field(default_factory=list)  # products without columns in the manifest

    @property
    def created(self) -> list[RegistrationRecord]:
        return [*self.imported, *self.applied, *self.changed]

    def summary(self) -> str:
        text = (f"登记同步 registration sync: 导入 imported {len(self.imported)}，首次申请 applied {len(self.applied)}，"
                f"变更 change {len(self.changed)}")
        return text + (f"；跳过（清单中无输出列）skipped {', '.join(self.skipped)}" if self.skipped else "")


# --------------------------------------------------------------------------- what is registered


def canonical_json(doc: Any) -> str:
    """The stored form of a registered version: sorted keys, compact, UTF-8 text."""
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def version_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_version(ds: Dataset) -> dict[str, Any]:
    """A dataset as registered: its identity and its fields with their classification (GB/T 43697), by name."""
    fields = [{"name": f.name, "type": f.type, "cn_name": f.cn_name, "required": f.required, "format": f.format,
               "code_table": f.code_table,
               "classification": {"level": f.class_.level, "pi": f.class_.pi, "openness": f.class_.openness,
                                  "confidential": f.class_.confidential}}
              for f in ds.fields]
    return {"dataset": ds.code, "name": ds.name, "agency": ds.agency, "fields": sorted(fields, key=lambda f: f["name"])}


def product_version(product: str, scenario: str, columns: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A product as registered: its scenario and its output columns (name and declared type), by name."""
    cols = [{"name": str(c["name"]), "data_type": c.get("data_type")} for c in columns]
    return {"product": product, "scenario": scenario, "columns": sorted(cols, key=lambda c: c["name"])}


def product_columns_from_manifest(path: Path | str | None = None) -> dict[str, list[dict[str, Any]]]:
    """{model: [{name, data_type, description}]} of the dbt models under models/ops, columns as declared in their yml.

    Reads ``dbt_project/target/manifest.json`` (built by ``make`` / ``python -m assets.dbt_common``); never runs dbt.
    FileNotFoundError when it was not built.
    """
    path = Path(path) if path else MANIFEST_PATH
    doc = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, list[dict[str, Any]]] = {}
    for node in doc.get("nodes", {}).values():
        if node.get("resource_type") != "model" or not str(node.get("original_file_path", "")).startswith(PRODUCT_MODELS):
            continue
        out[node["name"]] = [{"name": c.get("name") or name, "data_type": c.get("data_type"),
                              "description": c.get("description") or ""}
                             for name, c in (node.get("columns") or {}).items()]
    return out


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two versions of a subject, in one line (fields or columns added, removed, changed)."""
    key = "fields" if "fields" in new else "columns" if "columns" in new else None
    if key is None:
        return "登记内容变化 (registered content changed)"
    before = {c["name"]: c for c in old.get(key, [])}
    after = {c["name"]: c for c in new.get(key, [])}
    parts = []
    if added := sorted(after.keys() - before.keys()):
        parts.append(f"新增 added {', '.join(added)}")
    if removed := sorted(before.keys() - after.keys()):
        parts.append(f"删除 removed {', '.join(removed)}")
    if changed := sorted(n for n in after.keys() & before.keys() if after[n] != before[n]):
        parts.append(f"修改 changed {', '.join(changed)}")
    others = sorted(k for k in (old.keys() | new.keys()) - {key} if old.get(k) != new.get(k))
    if others:
        parts.append(f"属性 attributes {', '.join(others)}")
    label = "字段 fields" if key == "fields" else "输出列 columns"
    return f"{label}: " + ("；".join(parts) if parts else "无差异 (no difference)")


@dataclass(frozen=True)
class _Subject:
    kind: str
    name: str
    version: dict[str, Any]
    initial: InitialRegistration | None


def _registry_subjects(registry: Registry, product_columns: Mapping[str, Sequence[Mapping[str, Any]]]
                       ) -> tuple[list[_Subject], list[str]]:
    subjects = [_Subject("dataset", ds.code, dataset_version(ds), ds.registration)
                for ds in sorted(registry.datasets.values(), key=lambda d: d.code)]
    skipped = []
    for sc in sorted(registry.scenarios.values(), key=lambda s: s.product):
        columns = product_columns.get(sc.product)
        if not columns:  # unknown content: nothing to register or compare (the manifest was not built)
            skipped.append(sc.product)
            continue
        subjects.append(_Subject("product", sc.product, product_version(sc.product, sc.code, columns),
                                 sc.product_registration))
    return subjects, skipped


def initial_registration(registry: Registry, kind: str, subject: str) -> InitialRegistration | None:
    """The registration code the registry carries for a subject (None: none)."""
    if kind == "dataset" and subject in registry.datasets:
        return registry.datasets[subject].registration
    if kind == "product":
        try:
            return registry.scenario_for_product(subject).product_registration
        except KeyError:
            return None
    return None


# --------------------------------------------------------------------------- reading


def _record(row: Mapping[str, Any]) -> RegistrationRecord:
    d = dict(row)
    d["version"] = json.loads(d["version"])
    return RegistrationRecord(**d)


def _records(conn: sa.Connection, kind: str, subject: str) -> list[RegistrationRecord]:
    rows = conn.execute(sa.select(reg_t).where(reg_t.c.subject_kind == kind, reg_t.c.subject == subject)
                        .order_by(reg_t.c.seq)).mappings().all()
    return [_record(r) for r in rows]


def list_registrations(engine: sa.Engine, kind: str | None = None, subject: str | None = None,
                       state: str | None = None) -> list[RegistrationRecord]:
    """Registration records, by subject and sequence."""
    q = sa.select(reg_t)
    if kind:
        q = q.where(reg_t.c.subject_kind == kind)
    if subject:
        q = q.where(reg_t.c.subject == subject)
    if state:
        q = q.where(reg_t.c.state == state)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(reg_t.c.subject_kind, reg_t.c.subject, reg_t.c.seq)).mappings().all()
    return [_record(r) for r in rows]


def get_registration(engine: sa.Engine | sa.Connection, registration_id: str) -> RegistrationRecord:
    """One record; RegistrationError when there is none."""
    return _record(REGISTRATIONS.row(engine, registration_id))


def registration_events(engine: sa.Engine, registration_id: str) -> list[dict[str, Any]]:
    """The record's state changes, oldest first: event, from_state, to_state, actor, note, event_at."""
    return REGISTRATIONS.history(engine, registration_id)


def _status_of(kind: str, subject: str, records: Sequence[RegistrationRecord],
               initial: InitialRegistration | None) -> SubjectStatus:
    if not records:
        if initial is not None:
            return SubjectStatus(kind, subject, initial.code, initial.registered_on, False, "code_assigned", (),
                                 "registry")
        return SubjectStatus(kind, subject, None, None, False, "unregistered", (), "none")
    firsts = [r for r in records if r.record_type == "first" and r.state == "code_assigned"]
    first = firsts[-1] if firsts else None
    cancelled = first is not None and any(r.record_type == "cancellation" and r.state == "code_assigned"
                                          and r.seq > first.seq for r in records)
    pending = tuple(r.registration_id for r in records if r.state not in FINAL)
    return SubjectStatus(kind, subject, first.code if first else None, first.registered_on if first else None,
                         cancelled, records[-1].state, pending, "opdb")


def subject_status(engine: sa.Engine, registry: Registry, kind: str, subject: str) -> SubjectStatus:
    """The subject's registration: from its records in the operational DB, else from the code the registry carries."""
    with engine.connect() as conn:
        records = _records(conn, kind, subject)
    return _status_of(kind, subject, records, initial_registration(registry, kind, subject))


def catalogue(engine: sa.Engine, registry: Registry) -> list[SubjectStatus]:
    """Every registry dataset and product and every registered service, with its registration status."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(reg_t).order_by(reg_t.c.subject_kind, reg_t.c.subject, reg_t.c.seq)).mappings()
        by_subject: dict[tuple[str, str], list[RegistrationRecord]] = {}
        for row in rows:
            rec = _record(row)
            by_subject.setdefault((rec.subject_kind, rec.subject), []).append(rec)
    subjects = {("dataset", d) for d in registry.datasets} | {("product", s.product) for s in registry.scenarios.values()}
    subjects |= set(by_subject)
    return [_status_of(k, s, by_subject.get((k, s), []), initial_registration(registry, k, s))
            for k, s in sorted(subjects, key=lambda x: (KINDS.index(x[0]), x[1]))]


def delivery_refusal(engine: sa.Engine, registry: Registry, product: str) -> str | None:
    """Why ``product`` may not be delivered for want of registration (Art. 17), in Chinese; None when it may."""
    status = subject_status(engine, registry, "product", product)
    if status.cancelled:
        return (f"产品 {product} 的登记（登记编码 {status.code}）已注销，不予交付 "
                f"(product registration cancelled, Art. 17)")
    if status.code is None:
        where = f"，当前登记状态：{STATE_CN[status.state]}" if status.state in STATE_CN else "，尚未申请登记"
        return (f"产品 {product} 未完成登记赋码{where}，不予交付 "
                f"(product has no registration code, Art. 17)")
    return None


# --------------------------------------------------------------------------- writing


def registration_id_of(kind: str, subject: str, seq: int) -> str:
    return "RG-" + hashlib.sha256(f"{kind}|{subject}|{seq}".encode()).hexdigest()[:12]


def _insert(conn: sa.Connection, *, kind: str, subject: str, seq: int, record_type: str, state: str,
            version: Mapping[str, Any], origin: str, actor: str, at: dt.datetime, note: str | None,
            code: str | None = None, registered_on: dt.date | None = None, previous_hash: str | None = None,
            event: str = "applied") -> RegistrationRecord:
    text = canonical_json(version)
    values = dict(registration_id=registration_id_of(kind, subject, seq), subject_kind=kind, subject=subject, seq=seq,
                  record_type=record_type, state=state, code=code, registered_on=registered_on, version=text,
                  version_hash=version_hash(text), previous_hash=previous_hash, origin=origin, note=note,
                  applied_by=actor, applied_at=at, updated_at=at)
    conn.execute(sa.insert(reg_t).values(**values))
    _event(conn, values["registration_id"], event, None, state, actor, note, at)
    return _record({**values, "version": text})


def _event(conn: sa.Connection, registration_id: str, event: str, from_state: str | None, to_state: str, actor: str,
           note: str | None, at: dt.datetime) -> None:
    conn.execute(sa.insert(events_t).values(registration_id=registration_id, event=event, from_state=from_state,
                                            to_state=to_state, actor=actor, note=note, event_at=at))


def sync_registrations(engine: sa.Engine, registry: Registry,
                       product_columns: Mapping[str, Sequence[Mapping[str, Any]]], actor: str | None = None,
                       now: dt.datetime | None = None) -> SyncReport:
    """Bring the register up to date with the registry and the products' output columns; return what was created.

    Per dataset and scenario product: without any record, the registry's code is imported as a first record in state
    code_assigned (or, without a code, a first record is applied for); with records, a version that differs from the
    latest record's (registered or still in the procedure) files a change record — a first record while the subject
    has no code yet. A cancelled subject gets nothing. ``product_columns``: ``product_columns_from_manifest()``;
    products missing from it are skipped. One transaction, serialized with other writers of the register.
    """
    actor = default_actor(actor)
    at = event_time(now)
    subjects, skipped = _registry_subjects(registry, product_columns)
    report = SyncReport(skipped=skipped)
    with opdb.transaction(engine) as conn:
        opdb.lock_for_append(conn, reg_t)
        for s in subjects:
            records = _records(conn, s.kind, s.name)
            if not records:
                if s.initial is not None:
                    report.imported.append(_insert(
                        conn, kind=s.kind, subject=s.name, seq=1, record_type="first", state="code_assigned",
                        version=s.version, origin="registry", actor=actor, at=at, code=s.initial.code,
                        registered_on=s.initial.registered_on, event="imported",
                        note=f"自登记目录导入：登记编码 {s.initial.code}，{s.initial.registered_on} 赋码 "
                             "(imported from the registry)"))
                else:
                    report.applied.append(_insert(
                        conn, kind=s.kind, subject=s.name, seq=1, record_type="first", state="applied",
                        version=s.version, origin="sync", actor=actor, at=at,
                        note="登记目录中尚无登记编码，自动提交首次登记申请 (no registration code yet: first registration "
                             "applied for)"))
                continue
            latest = records[-1]
            status = _status_of(s.kind, s.name, records, None)
            text = canonical_json(s.version)
            if status.cancelled or latest.version_hash == version_hash(text):
                continue
            record_type = "change" if status.code else "first"
            report.changed.append(_insert(
                conn, kind=s.kind, subject=s.name, seq=latest.seq + 1, record_type=record_type, state="applied",
                version=s.version, origin="sync", actor=actor, at=at, previous_hash=latest.version_hash,
                note=describe_change(latest.version, s.version)))
    return report


def _codes_in_use(conn: sa.Connection, registry: Registry | None) -> dict[str, tuple[str, str]]:
    """code -> (kind, subject) of every code assigned in the register or carried by the registry."""
    used = {r.code: (r.subject_kind, r.subject) for r in conn.execute(
        sa.select(reg_t.c.code, reg_t.c.subject_kind, reg_t.c.subject).where(reg_t.c.code.is_not(None)))}
    if registry is not None:
        for ds in registry.datasets.values():
            if ds.registration:
                used.setdefault(ds.registration.code, ("dataset", ds.code))
        for sc in registry.scenarios.values():
            if sc.product_registration:
                used.setdefault(sc.product_registration.code, ("product", sc.product))
    return used


def next_code(used: Sequence[str], kind: str, year: int) -> str:
    """The next free code of a kind and year: ``ZQSJ-<ZY|CP|FW>-<year>-<NNNN>``."""
    prefix = f"{CODE_PREFIX}-{_KIND_CODE[kind]}-{year}-"
    numbers = [int(c[len(prefix):]) for c in used if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return f"{prefix}{max(numbers, default=0) + 1:04d}"


_CODE_RE = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$")
_SUBJECT_RE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")


def advance(engine: sa.Engine, registration_id: str, *, to: str | None = None, reject: bool = False,
            actor: str | None = None, note: str | None = None, code: str | None = None,
            registry: Registry | None = None, now: dt.datetime | None = None) -> RegistrationRecord:
    """Move a record to its next procedure state (``to`` names it, optionally), or reject it (驳回).

    Reaching code_assigned, a first record gets ``code`` or the next free ``ZQSJ-<kind>-<year>-<NNNN>`` (unique among
    the register and the registry's codes); a change, correction or cancellation keeps the subject's code. Anything
    else raises RegistrationError with a one-line reason.
    """
    actor = default_actor(actor)
    at = event_time(now)
    with opdb.transaction(engine) as conn:
        opdb.lock_for_append(conn, reg_t)
        row = REGISTRATIONS.open_row(conn, registration_id)
        rec = _record(row)
        nxt = NEXT_STATE[rec.state]
        target = "rejected" if reject else (to or nxt)
        if target not in (nxt, "rejected"):
            shown = STATE_CN.get(target, target)
            raise RegistrationError(
                f"登记记录 {registration_id} 处于「{STATE_CN[rec.state]}」，只能推进到「{STATE_CN[nxt]}」或驳回，"
                f"不能到「{shown}」 (invalid transition {rec.state} → {target}: next is {nxt}, or rejected)")
        if code is not None and target != "code_assigned":
            raise RegistrationError(f"--code 只在赋码时使用 (a code is given only when the record reaches code_assigned)")
        updates: dict[str, Any] = {"state": target, "updated_at": at}
        if target == "code_assigned":
            updates["code"] = _code_for(conn, rec, code, registry, at)
            updates["registered_on"] = at.date()
        conn.execute(sa.update(reg_t).where(reg_t.c.registration_id == registration_id).values(**updates))
        _event(conn, registration_id, "rejected" if target == "rejected" else "advanced", rec.state, target, actor,
               note, at)
        return _record({**row, **updates})


def _code_for(conn: sa.Connection, rec: RegistrationRecord, code: str | None, registry: Registry | None,
              at: dt.datetime) -> str:
    used = _codes_in_use(conn, registry)
    if rec.record_type != "first":
        status = _status_of(rec.subject_kind, rec.subject, _records(conn, rec.subject_kind, rec.subject), None)
        if status.code is None:
            raise RegistrationError(f"{rec.subject} 的首次登记尚未赋码，{RECORD_TYPE_CN[rec.record_type]}不能赋码 "
                                    f"(the subject has no code: its first registration is not complete)")
        if code is not None and code != status.code:
            raise RegistrationError(f"{RECORD_TYPE_CN[rec.record_type]}沿用登记编码 {status.code}，不能改为 {code} "
                                    f"(a {rec.record_type} record keeps the subject's code)")
        return status.code
    if code is None:
        return next_code(list(used), rec.subject_kind, at.year)
    if not _CODE_RE.match(code) or len(code) > 64:
        raise RegistrationError(f"登记编码格式无效 {code!r}，应如 ZQSJ-CP-2025-0001 (invalid registration code)")
    holder = used.get(code)
    if holder is not None and holder != (rec.subject_kind, rec.subject):
        raise RegistrationError(f"登记编码 {code} 已由 {KIND_CN[holder[0]]} {holder[1]} 使用 (code already in use)")
    return code


def apply(engine: sa.Engine, kind: str, subject: str, record_type: str, *, actor: str | None = None,
          note: str | None = None, now: dt.datetime | None = None) -> RegistrationRecord:
    """Apply for a registration by hand: a correction (更正) or cancellation (注销) of a registered subject, or a first
    registration of a service, or again of a subject whose first application was rejected or whose registration was
    cancelled. Changes are filed by
    ``sync_registrations``. The record starts in state applied and registers the subject's latest version."""
    actor = default_actor(actor)
    at = event_time(now)
    if kind not in KINDS:
        raise RegistrationError(f"未知登记对象类型 {kind!r}，应为 {'/'.join(KINDS)} (unknown subject kind)")
    if record_type not in RECORD_TYPES:
        raise RegistrationError(f"未知登记类型 {record_type!r}，应为 {'/'.join(RECORD_TYPES)} (unknown record type)")
    if not _SUBJECT_RE.match(subject):
        raise RegistrationError(f"登记对象名无效 {subject!r}：小写字母开头，仅含小写字母、数字与下划线 (invalid subject name)")
    if record_type == "change":
        raise RegistrationError("变更登记由登记同步根据字段或输出列的变化自动提交 (change records are filed by the "
                                "registration sync when fields or output columns change)")
    with opdb.transaction(engine) as conn:
        opdb.lock_for_append(conn, reg_t)
        records = _records(conn, kind, subject)
        status = _status_of(kind, subject, records, None)
        open_same = [r.registration_id for r in records if r.state not in FINAL and r.record_type == record_type]
        if open_same:
            raise RegistrationError(f"{subject} 已有在办的{RECORD_TYPE_CN[record_type]} {open_same[0]} "
                                    f"(a {record_type} record is already in the procedure)")
        if record_type == "first":
            if status.code is not None and not status.cancelled:
                raise RegistrationError(f"{subject} 已登记（{status.code}），不能再次首次登记 (already registered)")
            if records:
                version = records[-1].version
            elif kind == "service":
                if not (note or "").strip():
                    raise RegistrationError("数据服务首次登记需用 --note 说明服务内容 (describe the service with --note)")
                version = {"service": subject, "description": note.strip()}
            else:
                raise RegistrationError(f"{KIND_CN[kind]} {subject} 的首次登记由登记同步自动提交 (first registrations "
                                        "of datasets and products are filed by the registration sync)")
        else:
            if status.code is None:
                raise RegistrationError(f"{subject} 尚未赋码，不能{RECORD_TYPE_CN[record_type]} (no registration code)")
            if status.cancelled:
                raise RegistrationError(f"{subject} 的登记已注销 (registration already cancelled)")
            version = records[-1].version
        seq = records[-1].seq + 1 if records else 1
        previous = records[-1].version_hash if records else None
        return _insert(conn, kind=kind, subject=subject, seq=seq, record_type=record_type, state="applied",
                       version=version, origin="cli", actor=actor, at=at, note=note, previous_hash=previous)


def markdown_table(records: Sequence[RegistrationRecord]) -> str:
    """Records as a Markdown table (asset metadata, summaries); a line saying so when there are none."""
    if not records:
        return "（本次未新增登记记录 no record created）"
    lines = ["| 记录 record | 对象 subject | 类型 type | 状态 state | 登记编码 code | 版本 version | 说明 note |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        note = (r.note or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.registration_id} | {KIND_CN[r.subject_kind]} {r.subject} | {RECORD_TYPE_CN[r.record_type]} | "
                     f"{STATE_CN[r.state]} | {r.code or '-'} | {r.version_hash[:12]} | {note} |")
    return "\n".join(lines)
