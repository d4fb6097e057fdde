"""Quarterly operations report (Art. 28: 运营机构按季度报送运营工作情况报告), per operator and scenario.

Sources, each named in the report:

- scenarios, operators, fee class and registered consumers: the registry (``registry/scenarios.yaml``,
  ``consumers.yaml``). The registry records the scenario's kind (public interest / commercial, Art. 26) but no fee
  schedule: the report says so instead of inventing one;
- deliveries, rows and refused attempts: the delivery audit log (operational DB, ``audit_deliveries``, Art. 25);
- quality-gate holds of the scenario's input datasets: ``quality.gate_decisions`` (gov DuckDB);
- leak and boundary blocks: the gate results are not stored in a table, only as asset check evaluations in the Dagster
  event log (``no_personal_data_leak`` / ``exclusions_respected`` on ``ops/desensitized/desensitized_<dataset>``,
  ``no_personal_data_leak`` / ``authorization_in_force`` / ``reads_only_own_scenario`` on ``ops/products/<product>``);
- input quality: ``quality.scores`` of the scenario's datasets (records-weighted, per Art. 20 dimension);
- demand requests (Art. 18): the demand register, read through a guarded import; "无记录" when it does not exist yet.

Reproducible: facts are those of the quarter's partitions and timestamps, read as of the quarter's end plus 6 hours.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import sqlalchemy as sa

from zqdata import asset_keys
from zqdata.governance.reporting import (SETTLE, Report, Section, Table, as_of_for, bar_chart, iso, line_chart,
                                         number, rate, rounded)
from zqdata.quality.dimensions import DIMENSION_KEYS, cn_name
from zqdata.registry import Registry, Scenario
from zqdata.settings import TZ

KIND = "quarterly"
FEE_CLASS = {
    "public_interest": "公益：免费或有条件免费（第二十六条）public interest: free or conditionally free (Art. 26)",
    "commercial": "经营性：按国家政策定价（第二十六条）commercial: priced per national policy (Art. 26)",
}
NO_FEE_SCHEDULE = "登记中未载明收费标准 (no fee schedule in the registry)"
NO_RECORDS = "无记录"
DATASET_CHECKS = ("no_personal_data_leak", "exclusions_respected")  # on ops/desensitized/desensitized_<dataset>
PRODUCT_CHECKS = ("no_personal_data_leak", "authorization_in_force", "reads_only_own_scenario")  # on ops/products/<p>


def quarter_bounds(partition_key: str) -> tuple[dt.date, dt.date, str]:
    """(first day, first day of the next quarter, label 'YYYY-Qn') of the quarter starting on ``partition_key``."""
    start = dt.date.fromisoformat(partition_key)
    if start.day != 1 or start.month not in (1, 4, 7, 10):
        raise ValueError(f"季度分区须为季度首日 (a quarter starts on 1 Jan/Apr/Jul/Oct), got {partition_key!r}")
    end = dt.date(start.year + (start.month == 10), (start.month + 2) % 12 + 1, 1)
    return start, end, f"{start.year}-Q{(start.month - 1) // 3 + 1}"


def previous_quarter_start(day: dt.date) -> dt.date:
    """The first day of the quarter before the one ``day`` is in (the report due on the quarter's first day)."""
    month = ((day.month - 1) // 3) * 3 + 1 - 3
    return dt.date(day.year - (month < 1), month + 12 * (month < 1), 1)


def quarter_cutoff(end: dt.date) -> dt.datetime:
    return dt.datetime.combine(end, dt.time(0), tzinfo=TZ) + SETTLE


# --------------------------------------------------------------------------------------------- facts

@dataclass
class ScenarioQuarter:
    scenario: Scenario
    registered_consumers: list[str]
    deliveries: int = 0
    rows: int = 0
    refused: int = 0
    consumers_served: list[str] = field(default_factory=list)
    monthly: dict[str, int] = field(default_factory=dict)  # 'YYYY-MM' -> deliveries
    gate_holds: list[tuple[str, str, str]] = field(default_factory=list)  # (dataset, day, reason)
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # 'asset :: check' -> {partitions, evaluations}
    quality: dict[str, tuple[int, int]] = field(default_factory=dict)  # dimension -> (checked, failed)
    quality_by_dataset: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    demand: list[dict[str, Any]] | None = None  # None: the register does not exist

    def pass_rate(self, dimension: str) -> float | None:
        checked, failed = self.quality.get(dimension, (0, 0))
        return None if checked == 0 else max(0.0, 1 - failed / checked)

    @property
    def blocked_partitions(self) -> int:
        return sum(len(b["partitions"]) for b in self.blocks.values())


@dataclass
class QuarterlyReport:
    label: str
    start: dt.date
    end: dt.date
    as_of: dt.datetime
    provisional: bool
    scenarios: list[ScenarioQuarter]
    sources: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _has_table(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(con.execute("select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                            [schema, table]).fetchone()[0])


def audit_facts(db: sa.Engine | None, registry: Registry, start: dt.date, end: dt.date, as_of: dt.datetime
                ) -> dict[str, dict[str, Any]]:
    """Per scenario: delivered count, rows, consumers served, refused attempts, deliveries per month."""
    from zqdata.audit import read_chain

    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"delivered": 0, "rows": 0, "refused": 0,
                                                          "consumers": set(), "monthly": Counter()})
    if db is None:
        return {}
    lo = dt.datetime.combine(start, dt.time(0), tzinfo=TZ)
    hi = min(dt.datetime.combine(end, dt.time(0), tzinfo=TZ), as_of)
    for rec in read_chain(db):
        at = dt.datetime.fromisoformat(rec.delivered_at).astimezone(TZ)
        if not lo <= at < hi:
            continue
        scenario = rec.scenario
        if not scenario:  # refused before the product was resolved (unknown consumer, wrong credential)
            try:
                scenario = registry.scenario_for_product(rec.product).code
            except KeyError:
                scenario = ""
        agg = out[scenario]
        if rec.outcome == "delivered":
            agg["delivered"] += 1
            agg["rows"] += int(rec.row_count)
            agg["consumers"].add(rec.consumer)
            agg["monthly"][at.strftime("%Y-%m")] += 1
        else:
            agg["refused"] += 1
    return dict(out)


def gate_holds(gov_con: duckdb.DuckDBPyConnection, start: dt.date, end: dt.date
               ) -> dict[str, list[tuple[str, str]]]:
    """dataset -> [(day, reason)] held back by the quality gate in the quarter (quality.gate_decisions)."""
    if not _has_table(gov_con, "quality", "gate_decisions"):
        return {}
    out: dict[str, list] = defaultdict(list)
    for ds, day, reason in gov_con.execute(
            """select dataset, partition_date, coalesce(reason, '') from quality.gate_decisions
               where partition_date >= ? and partition_date < ? and not passed order by dataset, partition_date""",
            [start, end]).fetchall():
        out[ds].append((day.isoformat(), reason))
    return dict(out)


def input_quality(gov_con: duckdb.DuckDBPyConnection, start: dt.date, end: dt.date
                  ) -> dict[str, dict[str, tuple[int, int]]]:
    """dataset -> dimension -> (records checked, records failed) over the quarter (quality.scores)."""
    if not _has_table(gov_con, "quality", "scores"):
        return {}
    out: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for ds, dim, checked, failed in gov_con.execute(
            """select dataset, dimension, sum(records_checked), sum(records_failed) from quality.scores
               where partition_date >= ? and partition_date < ? group by all order by all""", [start, end]).fetchall():
        out[ds][dim] = (int(checked), int(failed))
    return dict(out)


def _demand_module():
    """``zqdata.governance.demand`` (Art. 18), built separately: None when it (or its API) is not there yet."""
    try:
        from zqdata.governance import demand as demand_module
    except ImportError:
        return None
    return demand_module if callable(getattr(demand_module, "list_demands", None)) else None


def demand_facts(db: sa.Engine | None, registry: Registry, start: dt.date, end: dt.date, as_of: dt.datetime
                 ) -> dict[str, list[dict[str, Any]]] | None:
    """scenario code ('' for none registered) -> demand requests raised by the end of the quarter, each in its state at
    ``as_of`` (rebuilt from its events); None when the demand register does not exist (module or table)."""
    module = _demand_module()
    if db is None or module is None:
        return None
    try:
        requests = module.list_demands(db)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # the table was never created
        return None
    state_cn = getattr(module, "STATE_CN", {})
    events = getattr(module, "demand_events", None)
    until = min(dt.datetime.combine(end, dt.time(0), tzinfo=TZ), as_of)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for req in requests:
        raised = getattr(req, "requested_at", None)
        if raised is not None and raised >= until:
            continue  # raised after the quarter
        state = getattr(req, "state", "")
        if callable(events):  # the state it was in at the cutoff, not today's
            past = [e for e in events(db, req.demand_id) if e.get("event_at") is not None and e["event_at"] <= as_of]
            state = past[-1]["to_state"] if past else state
        scenario = str(getattr(req, "scenario", "") or "")
        out[scenario if scenario in registry.scenarios else ""].append({
            "id": req.demand_id, "title": getattr(req, "reason", "") or "",
            "datasets": list(getattr(req, "datasets", []) or []), "agency": getattr(req, "agency", ""),
            "status": f"{state_cn.get(state, '')} {state}".strip(), "raised_at": iso(raised), "scenario": scenario})
    for lst in out.values():
        lst.sort(key=lambda r: (r["raised_at"] or "", r["id"]))
    return dict(out)


def build_quarterly(gov_con: duckdb.DuckDBPyConnection | None, db: sa.Engine | None, registry: Registry,
                    partition_key: str, instance=None, now: dt.datetime | None = None) -> QuarterlyReport:
    """The quarter's facts per scenario from the registry, the audit log, the gov DB and the Dagster event log."""
    from zqdata.governance.compliance import failed_check_partitions

    start, end, label = quarter_bounds(partition_key)
    as_of, provisional = as_of_for(quarter_cutoff(end), now)
    audit = audit_facts(db, registry, start, end, as_of)
    holds = gate_holds(gov_con, start, end) if gov_con is not None else {}
    quality = input_quality(gov_con, start, end) if gov_con is not None else {}
    demand = demand_facts(db, registry, start, end, as_of)
    notes: list[str] = []
    if gov_con is None:
        notes.append("未读取市政务大数据平台数据库，门禁与输入质量未计入 (gov DB not read)")
    if db is None:
        notes.append("未读取运营数据库，交付与拒绝未计入 (operational DB not read)")
    if instance is None:
        notes.append("未读取 Dagster 事件日志，泄露与出域闸门拦截未计入 (Dagster event log not read)")
    unattributed = audit.get("", {})
    if unattributed.get("refused"):
        notes.append(f"另有 {unattributed['refused']} 次拒绝无法归属到场景（未登记的使用方或产品） "
                     "(refused attempts not attributable to a scenario)")
    out = []
    for code in sorted(registry.scenarios):
        sc = registry.scenarios[code]
        q = ScenarioQuarter(sc, sorted(c.code for c in registry.consumers.values() if code in c.scenarios))
        a = audit.get(code)
        if a:
            q.deliveries, q.rows, q.refused = a["delivered"], a["rows"], a["refused"]
            q.consumers_served = sorted(a["consumers"])
            q.monthly = dict(sorted(a["monthly"].items()))
        datasets = sorted(sc.authorized_fields)
        q.gate_holds = [(ds, day, reason) for ds in datasets for day, reason in holds.get(ds, [])]
        q.quality_by_dataset = {ds: quality.get(ds, {}) for ds in datasets}
        q.quality = {dim: (sum(quality.get(ds, {}).get(dim, (0, 0))[0] for ds in datasets),
                           sum(quality.get(ds, {}).get(dim, (0, 0))[1] for ds in datasets)) for dim in DIMENSION_KEYS}
        if instance is not None:
            keys = [(asset_keys.key_string("desensitized", ds), check) for ds in datasets for check in DATASET_CHECKS]
            keys += [(f"ops/products/{sc.product}", check) for check in PRODUCT_CHECKS]
            for asset, check in keys:
                failed = failed_check_partitions(instance, asset, check, start, end, as_of)
                if failed["evaluations"]:
                    q.blocks[f"{asset} :: {check}"] = failed
        if demand is not None:
            q.demand = demand.get(code, [])
        out.append(q)
    sources = {
        "scenarios": "registry/scenarios.yaml, registry/consumers.yaml",
        "deliveries": "运营数据库 audit_deliveries（交付审计日志 delivery audit log）",
        "gate_holds": "gov quality.gate_decisions",
        "leak_blocks": "Dagster 事件日志 event log: asset check evaluations（闸门结果未存表 gate results are not stored "
                       "in a table）",
        "input_quality": "gov quality.scores",
        "demand": ("需求登记 demand register (operational DB)" if demand is not None
                   else f"{NO_RECORDS}：需求登记尚不存在 (no demand register yet)"),
    }
    if demand is not None and demand.get(""):
        notes.append(f"另有 {len(demand[''])} 项需求未指定场景 (demand requests not tied to a scenario)")
    return QuarterlyReport(label, start, end, as_of, provisional, out, sources, notes)


# --------------------------------------------------------------------------------------------- the report

def quarterly_data(r: QuarterlyReport) -> dict[str, Any]:
    scenarios = []
    for q in r.scenarios:
        sc = q.scenario
        scenarios.append({
            "scenario": sc.code, "name": sc.name, "operator": sc.operator, "developer": sc.developer,
            "kind": sc.kind, "fee_class": FEE_CLASS[sc.kind], "fee_schedule": None, "status": sc.status,
            "valid_from": sc.valid_from.isoformat(), "valid_to": sc.valid_to.isoformat(), "product": sc.product,
            "registered_consumers": q.registered_consumers, "consumers_served": q.consumers_served,
            "deliveries": q.deliveries, "rows": q.rows, "refused": q.refused, "monthly_deliveries": q.monthly,
            "gate_holds": [{"dataset": d, "day": day, "reason": reason} for d, day, reason in q.gate_holds],
            "blocks": q.blocks,
            "input_quality": {dim: {"records_checked": c, "records_failed": f, "pass_rate": rounded(q.pass_rate(dim))}
                              for dim, (c, f) in q.quality.items()},
            "input_quality_by_dataset": {ds: {dim: {"records_checked": c, "records_failed": f}
                                              for dim, (c, f) in dims.items()}
                                         for ds, dims in q.quality_by_dataset.items()},
            "demand": q.demand,
        })
    return {"quarter": r.label, "start": r.start.isoformat(), "end": r.end.isoformat(), "scenarios": scenarios,
            "sources": r.sources, "notes": r.notes}


def _demand_text(q: ScenarioQuarter) -> str:
    if q.demand is None or not q.demand:
        return NO_RECORDS
    counts = Counter(d["status"] or "未知 unknown" for d in q.demand)
    return "；".join(f"{s} {n}" for s, n in sorted(counts.items()))


def build_quarterly_report(r: QuarterlyReport, generated_at: dt.datetime | None = None) -> Report:
    by_operator: dict[str, list[ScenarioQuarter]] = defaultdict(list)
    for q in r.scenarios:
        by_operator[q.scenario.operator].append(q)
    summary = [
        f"运营机构 {len(by_operator)} 家，场景 {len(r.scenarios)} 个 (operators, scenarios)",
        f"交付 deliveries {sum(q.deliveries for q in r.scenarios)} 次，共 {sum(q.rows for q in r.scenarios):,} 行；"
        f"拒绝 refused {sum(q.refused for q in r.scenarios)} 次",
        f"质量门禁留置 quality-gate holds {sum(len(q.gate_holds) for q in r.scenarios)} 个数据集日；"
        f"泄露/出域/授权闸门拦截 gate blocks {sum(q.blocked_partitions for q in r.scenarios)} 个分区",
        f"收费：{NO_FEE_SCHEDULE}，仅登记了场景类型（公益/经营性）",
        *r.notes,
    ]
    sections = []
    for operator in sorted(by_operator):
        qs = by_operator[operator]
        sec = Section(f"运营机构 Operator：{operator}")
        sec.tables.append(Table.of(
            ["场景 scenario", "类型与收费 fee class", "授权期 authorization", "使用方（登记/本季）consumers",
             "交付 deliveries", "行数 rows", "拒绝 refused", "门禁留置 gate holds", "闸门拦截 blocks",
             "输入质量 input quality", "需求 demand"],
            [[f"{q.scenario.name}（{q.scenario.code}）", f"{FEE_CLASS[q.scenario.kind]}；{NO_FEE_SCHEDULE}",
              f"{q.scenario.status} {q.scenario.valid_from}–{q.scenario.valid_to}",
              f"{len(q.registered_consumers)} / {len(q.consumers_served)}", q.deliveries, number(q.rows), q.refused,
              len(q.gate_holds), q.blocked_partitions, rate(_overall(q)), _demand_text(q)] for q in qs]))
        sections.append(sec)

    trend = Section("交付趋势 Deliveries per month", ["来源 source: " + r.sources["deliveries"]])
    months = _months(r.start, r.end)
    rows = [{"month": m, "scenario": q.scenario.name, "deliveries": q.monthly.get(m, 0)}
            for q in r.scenarios for m in months]
    chart = line_chart("quarterly-deliveries", "月度交付次数 Deliveries per month", rows, "month", "deliveries",
                       series="scenario", y_title="交付次数 deliveries", x_title="月份 month", y_format="d")
    trend.charts += [chart] if chart else []
    trend.tables.append(Table.of(["场景 scenario", *months],
                                 [[q.scenario.name, *[q.monthly.get(m, 0) for m in months]] for q in r.scenarios]))

    quality = Section("输入数据质量 Input quality of each scenario's datasets", [
        "各场景授权数据集在本季度的第二十条维度通过率（按记录数加权）。来源 source: " + r.sources["input_quality"]])
    rows = [{"dimension": cn_name(d), "scenario": q.scenario.name, "rate": q.pass_rate(d)}
            for q in r.scenarios for d in DIMENSION_KEYS]
    chart = bar_chart("quarterly-input-quality", "输入数据各维度通过率 Input pass rate per dimension", rows, "dimension",
                      "rate", "通过率 pass rate", "维度 dimension", group="scenario",
                      sort=[cn_name(d) for d in DIMENSION_KEYS])
    quality.charts += [chart] if chart else []
    quality.tables.append(Table.of(
        ["场景 scenario", "数据集 dataset", *[cn_name(d) for d in DIMENSION_KEYS]],
        [[q.scenario.name, ds, *[rate(None if dims.get(d, (0, 0))[0] == 0 else
                                      max(0.0, 1 - dims[d][1] / dims[d][0])) for d in DIMENSION_KEYS]]
         for q in r.scenarios for ds, dims in q.quality_by_dataset.items()]))

    gates = Section("门禁与闸门 Gate holds and blocks", [
        "质量门禁留置来源 " + r.sources["gate_holds"] + "；闸门拦截来源 " + r.sources["leak_blocks"] + "。"])
    gates.tables.append(Table.of(["场景 scenario", "数据集 dataset", "分区日 day", "原因 reason"],
                                 [[q.scenario.name, d, day, reason]
                                  for q in r.scenarios for d, day, reason in q.gate_holds]))
    gates.tables.append(Table.of(
        ["场景 scenario", "检查 check", "拦截分区 blocked partitions", "未通过评估次数 failed evaluations"],
        [[q.scenario.name, key, "、".join(b["partitions"]) or "—（后续重跑已通过 passed on rerun）", b["evaluations"]]
         for q in r.scenarios for key, b in sorted(q.blocks.items())]))

    demand = Section("数据需求 Demand requests (Art. 18)", ["来源 source: " + r.sources["demand"]])
    demand.tables.append(Table.of(
        ["场景 scenario", "编号 id", "需求 request", "状态 state", "提出时间 raised"],
        [[q.scenario.name, d["id"], d["title"], d["status"], d["raised_at"] or "—"]
         for q in r.scenarios for d in (q.demand or [])]))
    if all(not q.demand for q in r.scenarios):
        demand.paragraphs.append(NO_RECORDS)

    return Report(kind=KIND, period=r.label,
                  title=f"{r.label} 公共数据资源运营工作情况季度报告 Quarterly operations report (Art. 28)",
                  as_of=r.as_of, provisional=r.provisional, summary=summary,
                  sections=[*sections, trend, quality, gates, demand], data=quarterly_data(r),
                  generated_at=(generated_at or dt.datetime.now(TZ)).astimezone(TZ).replace(microsecond=0))


def _overall(q: ScenarioQuarter) -> float | None:
    checked = sum(c for c, _ in q.quality.values())
    return None if checked == 0 else max(0.0, 1 - sum(f for _, f in q.quality.values()) / checked)


def _months(start: dt.date, end: dt.date) -> list[str]:
    out, d = [], start
    while d < end:
        out.append(d.strftime("%Y-%m"))
        d = dt.date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return out


def numeric_metadata(r: QuarterlyReport) -> Mapping[str, int]:
    return {"scenarios": len(r.scenarios), "deliveries": sum(q.deliveries for q in r.scenarios),
            "rows_delivered": sum(q.rows for q in r.scenarios), "refused": sum(q.refused for q in r.scenarios),
            "gate_holds": sum(len(q.gate_holds) for q in r.scenarios),
            "blocked_partitions": sum(q.blocked_partitions for q in r.scenarios)}
