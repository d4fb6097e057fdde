"""Supervision and risk (Art. 30): the compliance matrix generated from the code, and the risk list.

The matrix maps every article of the measures that asks something of the software (``registry/controls.yaml``, kept
equal to DOMAIN.md's table by a test) to the controls declared for it — the function implementing each, the Dagster
asset checks and assets that prove it at run time, the tests that prove it in CI — and gives each a status from the
latest runs in the Dagster instance:

- ``failed``: a latest check evaluation failed (severity ERROR), or a reference is broken: a check or asset missing from
  the loaded Definitions, a function that does not import, a validation that raises;
- ``not_run``: a referenced check or asset has not run within ``max_age_days`` (or never ran);
- ``passed``: everything referenced ran recently and passed;
- ``tests_only``: the control has no runtime evidence; the test suite proves it;
- ``gap``: (an article) no control implements it.

The risk list: open quality issues past their dataset's SLA, authorizations (scenarios) ending within 30 days,
consumers with refused delivery attempts, gates whose latest evaluation failed.

Reproducible: statuses are taken as of a cutoff (the report day at 06:00 Asia/Shanghai): evaluations, materializations,
issue events and audit records after it are ignored.
"""

from __future__ import annotations

import ast
import datetime as dt
import fnmatch
import importlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zqdata.governance.reporting import (SETTLE, STATUS_CLASS, Report, Section, Table, as_of_for, bar_chart, iso,
                                         rounded)
from zqdata.registry import Registry, RegistryError, registry_dir
from zqdata.settings import TZ, repo_root

KIND = "compliance"
FILE_NAME = "controls.yaml"
STATUS_ORDER = ("failed", "gap", "not_run", "tests_only", "passed")  # worst first
STATUS_CN = {"passed": "通过 passed", "failed": "未通过 failed", "not_run": "未运行 not run",
             "tests_only": "仅测试证明 tests only", "gap": "缺口 gap"}
GATE_CHECKS = ("quality_gate",)  # gates that are not blocking by design (the quality gate decides per dataset)


# --------------------------------------------------------------------------------------------- the controls registry

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Article(_Strict):
    article: int = Field(gt=0)
    requirement: str = Field(min_length=1)


class CheckRef(_Strict):
    asset: str = Field(min_length=1)  # asset key path with '/', fnmatch pattern
    check: str = Field(min_length=1)  # check name, fnmatch pattern

    def label(self) -> str:
        return f"{self.asset} :: {self.check}"


class Control(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    articles: list[int] = Field(min_length=1)
    implemented_by: list[str] = Field(min_length=1)
    checks: list[CheckRef] = Field(default_factory=list)
    assets: list[str] = Field(default_factory=list)
    validations: list[str] = Field(default_factory=list)
    tests: list[str] = Field(default_factory=list)
    max_age_days: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _references_well_formed(self) -> "Control":
        bad = [r for r in [*self.implemented_by, *self.validations] if r.count(":") != 1 or not all(r.split(":"))]
        bad += [t for t in self.tests if "::" not in t or not t.split("::")[0].endswith(".py")]
        if bad:
            raise ValueError(f"control {self.id}: 引用格式错误 malformed references (module:function, "
                             f"tests/<file>.py::<test>): {', '.join(bad)}")
        return self


class RiskSettings(_Strict):
    expiry_days: int = Field(default=30, gt=0)
    window_days: int = Field(default=90, gt=0)


class ControlsRegistry(_Strict):
    max_age_days: int = Field(default=7, gt=0)
    risk: RiskSettings = Field(default_factory=RiskSettings)
    articles: list[Article]
    controls: list[Control]

    @model_validator(mode="after")
    def _consistent(self) -> "ControlsRegistry":
        numbers = [a.article for a in self.articles]
        problems = []
        if len(set(numbers)) != len(numbers):
            problems.append("articles 重复 duplicated")
        ids = [c.id for c in self.controls]
        if len(set(ids)) != len(ids):
            problems.append("control ids 重复 duplicated")
        for c in self.controls:
            unknown = sorted(set(c.articles) - set(numbers))
            if unknown:
                problems.append(f"control {c.id}: 条款不在 articles 中 unknown articles {unknown}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def max_age(self, control: Control) -> int:
        return control.max_age_days or self.max_age_days


def load_controls(directory: Path | None = None) -> ControlsRegistry:
    """``registry/controls.yaml`` (or ``<directory>/controls.yaml``), validated; RegistryError naming the problem."""
    path = (Path(directory) if directory else registry_dir()) / FILE_NAME
    try:
        with open(path, encoding="utf-8") as fh:
            return ControlsRegistry.model_validate(yaml.safe_load(fh) or {})
    except (OSError, yaml.YAMLError, ValidationError, ValueError, TypeError) as exc:
        raise RegistryError(f"控制登记无效 controls registry at {path} is invalid: {exc}") from exc


def domain_articles(domain_md: str) -> set[int]:
    """The article numbers of DOMAIN.md's table "What each article asks of the software" (``| 6, 24 | ...`` rows)."""
    out: set[int] = set()
    in_table = False
    for line in domain_md.splitlines():
        if line.startswith("## "):
            in_table = "asks of the software" in line
            continue
        if in_table and line.startswith("|"):
            first = line.strip("|").split("|")[0].strip()
            if first and all(p.strip().isdigit() for p in first.split(",")):
                out |= {int(p) for p in first.split(",")}
    return out


# --------------------------------------------------------------------------------------------- what the code declares

@dataclass(frozen=True)
class DefinitionsInventory:
    """The asset keys and asset check keys of a Definitions object, and which checks gate (blocking)."""

    assets: frozenset[str]  # 'gov/quality/scores'
    checks: frozenset[tuple[str, str]]  # ('gov/quality/scores', 'quality_gate')
    gating: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, defs) -> "DefinitionsInventory":
        graph = defs.resolve_asset_graph()
        checks, gating = set(), set()
        for key in graph.asset_check_keys:
            ref = (key.asset_key.to_user_string(), key.name)
            checks.add(ref)
            if graph.get_check_spec(key).blocking or key.name in GATE_CHECKS:
                gating.add(ref)
        return cls(frozenset(k.to_user_string() for k in graph.get_all_asset_keys()), frozenset(checks),
                   frozenset(gating))

    def matching(self, ref: CheckRef) -> list[tuple[str, str]]:
        return sorted(c for c in self.checks if fnmatch.fnmatchcase(c[0], ref.asset) and
                      fnmatch.fnmatchcase(c[1], ref.check))


def resolve(reference: str) -> Any:
    """The object named ``module:attr[.attr]``; ImportError/AttributeError when it does not exist."""
    module, attr = reference.split(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def reference_problems(control: Control, inventory: DefinitionsInventory, root: Path | None = None,
                       run_validations: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes) of a control's references: checks and assets in the Definitions, functions that import,
    validations that pass, tests that exist (when the tests folder is shipped)."""
    root = root or repo_root()
    problems, notes = [], []
    for ref in control.checks:
        if not inventory.matching(ref):
            problems.append(f"检查不存在 check not in the definitions: {ref.label()}")
    for asset in control.assets:
        if asset not in inventory.assets:
            problems.append(f"资产不存在 asset not in the definitions: {asset}")
    for ref in control.implemented_by:
        try:
            resolve(ref)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            problems.append(f"实现无法导入 implementation does not import: {ref} ({type(exc).__name__}: {exc})")
    if run_validations:
        for ref in control.validations:
            try:
                resolve(ref)()
            except Exception as exc:  # noqa: BLE001 - the validation failing is the finding
                problems.append(f"校验未通过 validation failed: {ref} ({type(exc).__name__}: {str(exc)[:200]})")
    cache: dict[Path, set[str]] = {}
    for test in control.tests:
        file, name = test.split("::", 1)
        path = root / file
        if not (root / "tests").is_dir():
            notes.append("测试未随部署提供，未核对 (tests not shipped here; not verified)")
            break
        if not path.is_file():
            problems.append(f"测试文件不存在 test file missing: {file}")
            continue
        if path not in cache:
            cache[path] = _test_names(path)
        if name.split("[")[0] not in cache[path]:
            problems.append(f"测试不存在 test missing: {test}")
    return problems, notes


def validate_controls(controls: ControlsRegistry, defs, root: Path | None = None) -> list[str]:
    """Every broken reference of the controls registry against ``defs`` (empty when all resolve)."""
    inventory = DefinitionsInventory.of(defs)
    return [f"{c.id}: {p}" for c in controls.controls for p in reference_problems(c, inventory, root)[0]]


# --------------------------------------------------------------------------------------------- the latest runs

@dataclass(frozen=True)
class Evaluation:
    passed: bool
    error: bool  # severity ERROR (a failed WARN check does not fail a control)
    at: dt.datetime
    partition: str | None
    run_id: str


def _check_key(asset: str, check: str):
    import dagster as dg

    return dg.AssetCheckKey(dg.AssetKey(asset.split("/")), check)


def _evaluations(instance, asset: str, check: str, as_of: dt.datetime, page: int = 200) -> Iterable[Evaluation]:
    """Completed evaluations of a check up to ``as_of``, newest first (the instance's event log storage)."""
    import dagster as dg
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as S

    key = _check_key(asset, check)
    cursor = None
    run_partitions: dict[str, str | None] = {}
    while True:
        records = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=page, cursor=cursor, status={S.SUCCEEDED, S.FAILED})
        for rec in records:
            event = rec.event
            ts = event.timestamp if event is not None else rec.create_timestamp
            at = dt.datetime.fromtimestamp(ts, TZ)
            if at > as_of:
                continue
            data = event.dagster_event.event_specific_data if event is not None and event.dagster_event else None
            passed = bool(data.passed) if data is not None else rec.status == S.SUCCEEDED
            error = data is None or data.severity == dg.AssetCheckSeverity.ERROR
            partition = rec.partition or (data.partition if data is not None else None)
            if partition is None:  # a check without its own partitions: the partition of the run it ran in
                if rec.run_id not in run_partitions:
                    run_partitions[rec.run_id] = _run_partition(instance, rec.run_id)
                partition = run_partitions[rec.run_id]
            yield Evaluation(passed, error, at, partition, rec.run_id)
        if len(records) < page:
            return
        cursor = records[-1].id


def _run_partition(instance, run_id: str) -> str | None:
    """The partition a run targeted (its ``dagster/partition`` tag, or a one-partition range); None if none/several."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return None
    tags = run.tags
    if tags.get("dagster/partition"):
        return tags["dagster/partition"]
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    return start if start and start == end else None


def latest_evaluation(instance, asset: str, check: str, as_of: dt.datetime) -> Evaluation | None:
    return next(iter(_evaluations(instance, asset, check, as_of)), None)


def failed_check_partitions(instance, asset: str, check: str, start: dt.date, end: dt.date,
                            as_of: dt.datetime) -> dict[str, Any]:
    """For partitions in [start, end): how many evaluations failed (severity ERROR), and the partitions whose latest
    evaluation (as of ``as_of``) failed — the partitions the gate blocked."""
    latest: dict[str, Evaluation] = {}
    failed = 0
    for ev in _evaluations(instance, asset, check, as_of):
        if ev.partition is None or not start.isoformat() <= ev.partition < end.isoformat():
            continue
        latest.setdefault(ev.partition, ev)
        failed += (not ev.passed) and ev.error
    return {"partitions": sorted(p for p, ev in latest.items() if not ev.passed and ev.error), "evaluations": failed}


def latest_materialization(instance, asset: str, as_of: dt.datetime) -> dt.datetime | None:
    import dagster as dg

    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset.split("/")), before_timestamp=as_of.timestamp()), limit=1)
    return dt.datetime.fromtimestamp(result.records[0].timestamp, TZ) if result.records else None


# --------------------------------------------------------------------------------------------- the matrix

@dataclass
class ControlStatus:
    control: Control
    status: str
    details: list[str] = field(default_factory=list)
    checks_matched: int = 0
    last_evidence: dt.datetime | None = None


@dataclass
class ArticleRow:
    article: Article
    status: str
    controls: list[ControlStatus]


def _days(delta: dt.timedelta) -> int:
    return max(0, int(delta.total_seconds() // 86400))


def control_status(control: Control, controls: ControlsRegistry, inventory: DefinitionsInventory, instance,
                   as_of: dt.datetime, root: Path | None = None) -> ControlStatus:
    problems, notes = reference_problems(control, inventory, root)
    out = ControlStatus(control, "passed", details=list(problems))
    max_age = dt.timedelta(days=controls.max_age(control))
    never: list[str] = []
    stale: list[tuple[str, dt.datetime]] = []
    failed: list[str] = []
    times: list[dt.datetime] = []
    keys = [k for ref in control.checks for k in inventory.matching(ref)]
    out.checks_matched = len(keys)
    for asset, check in keys:
        ev = latest_evaluation(instance, asset, check, as_of) if instance is not None else None
        if ev is None:
            never.append(f"{asset} :: {check}")
            continue
        times.append(ev.at)
        if not ev.passed and ev.error:
            failed.append(f"{asset} :: {check}" + (f" [{ev.partition}]" if ev.partition else "") + f" @ {iso(ev.at)}")
        elif as_of - ev.at > max_age:
            stale.append((f"{asset} :: {check}", ev.at))
    for asset in control.assets:
        if asset not in inventory.assets:
            continue
        at = latest_materialization(instance, asset, as_of) if instance is not None else None
        if at is None:
            never.append(asset)
        else:
            times.append(at)
            if as_of - at > max_age:
                stale.append((asset, at))
    out.last_evidence = max(times) if times else None
    if failed:
        out.details.append(f"最近一次评估未通过 latest evaluation failed: {'；'.join(failed[:10])}"
                           + (f" …（共 {len(failed)} 项）" if len(failed) > 10 else ""))
    if never:
        out.details.append(f"{len(never)} 项从未运行 never run: {'、'.join(never[:5])}" + (" …" if len(never) > 5 else ""))
    if stale:
        oldest = min(at for _, at in stale)
        out.details.append(f"{len(stale)} 项超过 {max_age.days} 天未运行，最久 {_days(as_of - oldest)} 天 "
                           f"(not run for {_days(as_of - oldest)} days)")
    out.details += notes
    if problems or failed:
        out.status = "failed"
    elif not (control.checks or control.assets or control.validations):
        out.status = "tests_only"
    elif never or stale:
        out.status = "not_run"
    return out


def worst(statuses: Iterable[str]) -> str:
    present = set(statuses)
    return next((s for s in STATUS_ORDER if s in present), "gap")


def build_matrix(controls: ControlsRegistry, inventory: DefinitionsInventory, instance, as_of: dt.datetime,
                 root: Path | None = None) -> list[ArticleRow]:
    """One row per article (by number): its controls' statuses and the worst of them; ``gap`` when none."""
    statuses = {c.id: control_status(c, controls, inventory, instance, as_of, root) for c in controls.controls}
    rows = []
    for art in sorted(controls.articles, key=lambda a: a.article):
        mine = [statuses[c.id] for c in controls.controls if art.article in c.articles]
        rows.append(ArticleRow(art, worst(s.status for s in mine) if mine else "gap", mine))
    return rows


# --------------------------------------------------------------------------------------------- risks

@dataclass
class Risks:
    overdue_issues: list[dict[str, Any]] = field(default_factory=list)
    expiring_authorizations: list[dict[str, Any]] = field(default_factory=list)
    refused_consumers: list[dict[str, Any]] = field(default_factory=list)
    failed_gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (len(self.overdue_issues) + len(self.expiring_authorizations) + len(self.refused_consumers)
                + len(self.failed_gates))


WAITING = ("open", "notified", "reopened", "acknowledged")  # not yet fixed by the agency


def overdue_issues(db, registry: Registry, as_of: dt.datetime) -> list[dict[str, Any]]:
    """Issues not fixed at ``as_of`` whose dataset SLA has run out since they were (re)opened (state rebuilt from
    the issue events up to ``as_of``)."""
    import sqlalchemy as sa

    from zqdata.opdb import issue_events, quality_issues

    if db is None:
        return []
    state: dict[str, dict[str, Any]] = {}
    with db.connect() as conn:
        info = {r.fingerprint: r for r in conn.execute(sa.select(
            quality_issues.c.fingerprint, quality_issues.c.issue_id, quality_issues.c.agency, quality_issues.c.dataset,
            quality_issues.c.rule, quality_issues.c.partition_date))}
        for fp, event, to_status, at in conn.execute(
                sa.select(issue_events.c.fingerprint, issue_events.c.event, issue_events.c.to_status,
                          issue_events.c.event_at).order_by(issue_events.c.event_id)):
            if at > as_of:
                continue
            s = state.setdefault(fp, {"status": None, "since": None})
            if to_status:
                s["status"] = to_status
            if event in ("opened", "reopened"):
                s["since"] = at
    out = []
    for fp, s in state.items():
        i = info.get(fp)
        ds = registry.datasets.get(i.dataset) if i else None
        if i is None or ds is None or s["status"] not in WAITING or s["since"] is None:
            continue
        due = s["since"] + dt.timedelta(hours=ds.delivery.sla_hours)
        if as_of >= due:
            out.append({"issue_id": i.issue_id, "agency": i.agency, "dataset": i.dataset, "rule": i.rule,
                        "partition_date": i.partition_date.isoformat(), "status": s["status"],
                        "open_since": iso(s["since"]),
                        "overdue_hours": rounded((as_of - due).total_seconds() / 3600, 1)})
    return sorted(out, key=lambda r: (-r["overdue_hours"], r["issue_id"]))


def expiring_authorizations(registry: Registry, as_of: dt.datetime, days: int) -> list[dict[str, Any]]:
    """Active scenarios whose authorization ends within ``days`` (or has ended while still registered active)."""
    today = as_of.astimezone(TZ).date()
    out = []
    for sc in sorted(registry.scenarios.values(), key=lambda s: (s.valid_to, s.code)):
        left = (sc.valid_to - today).days
        if sc.status == "active" and left <= days:
            out.append({"scenario": sc.code, "name": sc.name, "operator": sc.operator,
                        "valid_to": sc.valid_to.isoformat(), "days_left": left})
    return out


def refused_consumers(db, registry: Registry, as_of: dt.datetime, days: int) -> list[dict[str, Any]]:
    """Consumers with refused delivery attempts in the ``days`` before ``as_of`` (delivery audit log)."""
    from zqdata.audit import read_chain

    if db is None:
        return []
    since = as_of - dt.timedelta(days=days)
    agg: dict[str, dict[str, Any]] = defaultdict(lambda: {"refused": 0, "last": None, "reasons": []})
    for rec in read_chain(db):
        at = dt.datetime.fromisoformat(rec.delivered_at).astimezone(TZ)
        if rec.outcome != "denied" or not since < at <= as_of:
            continue
        a = agg[rec.consumer]
        a["refused"] += 1
        a["last"] = max(a["last"], at) if a["last"] else at
        if rec.reason not in a["reasons"] and len(a["reasons"]) < 3:
            a["reasons"].append(rec.reason)
    return [{"consumer": c, "registered": c in registry.consumers, "refused": a["refused"], "last": iso(a["last"]),
             "reasons": a["reasons"]} for c, a in sorted(agg.items(), key=lambda kv: (-kv[1]["refused"], kv[0]))]


def failed_gates(instance, inventory: DefinitionsInventory, as_of: dt.datetime, days: int) -> list[dict[str, Any]]:
    """Gating checks (blocking, and the quality gate) whose latest evaluation in the window failed."""
    if instance is None:
        return []
    since = as_of - dt.timedelta(days=days)
    out = []
    for asset, check in sorted(inventory.gating):
        ev = latest_evaluation(instance, asset, check, as_of)
        if ev is not None and ev.at > since and not ev.passed and ev.error:
            out.append({"asset": asset, "check": check, "partition": ev.partition, "at": iso(ev.at),
                        "run_id": ev.run_id})
    return out


# --------------------------------------------------------------------------------------------- the report

@dataclass
class Compliance:
    day: dt.date
    as_of: dt.datetime
    provisional: bool
    rows: list[ArticleRow]
    risks: Risks
    risk_settings: RiskSettings
    notes: list[str] = field(default_factory=list)


def compliance_cutoff(day: dt.date) -> dt.datetime:
    """The report day's cutoff: 06:00 Asia/Shanghai, after the night's run."""
    return dt.datetime.combine(day, dt.time(0), tzinfo=TZ) + SETTLE


def build_compliance(defs, instance, db, registry: Registry, day: dt.date, controls: ControlsRegistry | None = None,
                     now: dt.datetime | None = None, root: Path | None = None) -> Compliance:
    """The matrix and the risk list as of ``day`` 06:00 (or now, if earlier: provisional)."""
    controls = controls or load_controls()
    as_of, provisional = as_of_for(compliance_cutoff(day), now)
    inventory = DefinitionsInventory.of(defs)
    rows = build_matrix(controls, inventory, instance, as_of, root)
    risks = Risks(overdue_issues(db, registry, as_of),
                  expiring_authorizations(registry, as_of, controls.risk.expiry_days),
                  refused_consumers(db, registry, as_of, controls.risk.window_days),
                  failed_gates(instance, inventory, as_of, controls.risk.window_days))
    notes = []
    if instance is None:
        notes.append("未读取 Dagster 实例：检查与资产状态均为未运行 (no Dagster instance read)")
    if db is None:
        notes.append("未读取运营数据库：问题与拒绝记录未计入 (operational DB not read)")
    return Compliance(day, as_of, provisional, rows, risks, controls.risk, notes)


def compliance_data(c: Compliance) -> dict[str, Any]:
    return {
        "day": c.day.isoformat(),
        "articles": [{"article": r.article.article, "requirement": r.article.requirement, "status": r.status,
                      "controls": [{"id": s.control.id, "title": s.control.title, "status": s.status,
                                    "implemented_by": s.control.implemented_by,
                                    "checks": [ref.label() for ref in s.control.checks],
                                    "checks_matched": s.checks_matched, "assets": s.control.assets,
                                    "validations": s.control.validations, "tests": s.control.tests,
                                    "last_evidence": iso(s.last_evidence), "details": s.details}
                                   for s in r.controls]} for r in c.rows],
        "risks": {"overdue_issues": c.risks.overdue_issues,
                  "expiring_authorizations": c.risks.expiring_authorizations,
                  "refused_consumers": c.risks.refused_consumers, "failed_gates": c.risks.failed_gates},
        "risk_settings": {"expiry_days": c.risk_settings.expiry_days, "window_days": c.risk_settings.window_days},
        "notes": c.notes,
    }


def status_counts(rows: Sequence[ArticleRow]) -> dict[str, int]:
    counts = {s: 0 for s in STATUS_ORDER}
    for r in rows:
        counts[r.status] += 1
    return counts


def build_compliance_report(c: Compliance, generated_at: dt.datetime | None = None) -> Report:
    counts = status_counts(c.rows)
    summary = [
        f"条款 {len(c.rows)} 项：通过 {counts['passed']}，未通过 {counts['failed']}，未运行 {counts['not_run']}，"
        f"仅测试证明 {counts['tests_only']}，缺口 {counts['gap']} (articles: passed/failed/not run/tests only/gap)",
        f"风险 risks {c.risks.total} 项：逾期未整改问题 {len(c.risks.overdue_issues)}，"
        f"{c.risk_settings.expiry_days} 天内到期授权 {len(c.risks.expiring_authorizations)}，"
        f"有拒绝记录的使用方 {len(c.risks.refused_consumers)}，未通过的门禁 {len(c.risks.failed_gates)}",
        *c.notes,
    ]
    matrix = Section("合规矩阵 Compliance matrix", [
        "每项条款 → 实现它的控制（registry/controls.yaml：实现函数、Dagster 检查与资产、测试）→ 最近运行的状态。"
        "Every article → the control implementing it → its status from the latest runs."])
    chart = bar_chart("compliance-status", "条款状态 Articles by status",
                      [{"status": STATUS_CN[s], "articles": n} for s, n in counts.items()], "status", "articles",
                      "条款数 articles", "状态 status", y_format="d", sort=[STATUS_CN[s] for s in STATUS_ORDER])
    matrix.charts += [chart] if chart else []
    table_rows, classes = [], []
    for r in c.rows:
        if not r.controls:
            table_rows.append([f"第{r.article.article}条", r.article.requirement, "—", "—", "—", "—",
                               STATUS_CN["gap"], "无控制实现该条款 no control implements this article"])
            classes.append(STATUS_CLASS["gap"])
        for s in r.controls:
            ctl = s.control
            table_rows.append([
                f"第{r.article.article}条", r.article.requirement, f"{ctl.title}（{ctl.id}）",
                "；".join(ctl.implemented_by),
                "；".join([*(ref.label() for ref in ctl.checks), *ctl.assets, *ctl.validations]) + (
                    f"（{s.checks_matched} 项检查 checks）" if ctl.checks else "") or "—",
                f"{len(ctl.tests)} 项 tests", STATUS_CN[s.status], "；".join(s.details) or
                (f"最近证据 last evidence {iso(s.last_evidence)}" if s.last_evidence else "—")])
            classes.append(STATUS_CLASS[s.status])
    matrix.tables.append(Table.of(["条款 article", "要求 requirement", "控制 control", "实现 implemented by",
                                   "运行证据 runtime evidence", "测试 tests", "状态 status", "说明 detail"],
                                  table_rows, classes))

    r = c.risks
    risks = Section("风险清单 Risk list")
    risks.tables.append(Table.of(
        ["问题 issue", "数源机构 agency", "数据集 dataset", "规则 rule", "分区 partition", "状态 status", "逾期小时 overdue h"],
        [[i["issue_id"], i["agency"], i["dataset"], i["rule"], i["partition_date"], i["status"], i["overdue_hours"]]
         for i in r.overdue_issues]))
    risks.tables.append(Table.of(
        ["场景 scenario", "运营机构 operator", "授权截止 valid to", "剩余天数 days left"],
        [[f"{a['name']}（{a['scenario']}）", a["operator"], a["valid_to"], a["days_left"]]
         for a in r.expiring_authorizations]))
    risks.tables.append(Table.of(
        ["使用方 consumer", "已登记 registered", "拒绝次数 refused", "最近一次 last", "原因 reasons"],
        [[x["consumer"], "是 yes" if x["registered"] else "否 no", x["refused"], x["last"], "；".join(x["reasons"])]
         for x in r.refused_consumers]))
    risks.tables.append(Table.of(
        ["资产 asset", "门禁 gate", "分区 partition", "时间 at"],
        [[g["asset"], g["check"], g["partition"] or "—", g["at"]] for g in r.failed_gates]))
    risks.paragraphs.append(
        f"依次为：逾期未整改的质量问题（超过数据集时限）；{c.risk_settings.expiry_days} 天内到期的场景授权；"
        f"近 {c.risk_settings.window_days} 天有拒绝记录的使用方；近 {c.risk_settings.window_days} 天最近一次评估未通过的门禁。"
        "In order: overdue issues, expiring authorizations, consumers with refused attempts, failed gates.")

    return Report(kind=KIND, period=c.day.isoformat(),
                  title=f"{c.day.isoformat()} 监督与风险报告 Supervision and risk report (Art. 30)",
                  as_of=c.as_of, provisional=c.provisional, summary=summary, sections=[matrix, risks],
                  data=compliance_data(c),
                  generated_at=(generated_at or dt.datetime.now(TZ)).astimezone(TZ).replace(microsecond=0))


def numeric_metadata(c: Compliance) -> Mapping[str, int]:
    counts = status_counts(c.rows)
    return {**{f"articles_{k}": v for k, v in counts.items()}, "risks": c.risks.total,
            "overdue_issues": len(c.risks.overdue_issues), "failed_gates": len(c.risks.failed_gates)}
