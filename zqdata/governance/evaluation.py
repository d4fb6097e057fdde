"""Annual evaluation of source agencies (Art. 22: 数源机构年度成效评价) from what the platform stored.

Per agency and calendar year:

- quality on each Art. 20 dimension, weighted by records: ``1 - Σ records_failed / Σ records_checked`` over the
  year's rows of ``quality.scores`` (gov DuckDB), and the same per month (the trend);
- deliveries against the dataset's SLA: every day the platform evaluated a registered dataset of the agency is an
  expected delivery (``quality.scores`` / ``meta.deliveries``); it is *missing* when no file arrived, *late* when the
  latest arrival (``meta.deliveries.arrived_at``, the object store's time; else the manifest's ``delivered_at``) is
  after the end of the day plus ``sla_hours``, or when the nightly timeliness check recorded ``delivery.late``;
- issue handling from the operational DB's register (``quality_issues`` and its ``issue_events``): issues raised about
  the year's data, median hours to acknowledgement and to the first verified fix, issues reopened;
- a composite score with the weights of ``registry/evaluation.yaml`` and a ranking.

Reproducible: everything is read as of a cutoff, 1 March of the following year 06:00 Asia/Shanghai (issues of December
have January and February to be fixed; schedules run at 06:30); issue states are rebuilt from the events up to it.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import sqlalchemy as sa

from zqdata.governance.reporting import (Report, Section, Table, as_of_for, bar_chart, iso, line_chart, number, rate,
                                         rounded)
from zqdata.governance.weights import COMPONENTS, EvaluationConfig
from zqdata.quality.dimensions import DIMENSION_KEYS, cn_name
from zqdata.quality.timeliness import RULE_LATE, delivery_deadline
from zqdata.registry import Registry
from zqdata.settings import TZ

KIND = "evaluation"
LISTED_ITEMS = 20  # late/missing deliveries listed per agency in the HTML (all of them are in the JSON)


def period_bounds(year: int) -> tuple[dt.date, dt.date]:
    """[1 January, next 1 January) of ``year``."""
    return dt.date(year, 1, 1), dt.date(year + 1, 1, 1)


def evaluation_cutoff(year: int) -> dt.datetime:
    """When the year's evaluation closes: 1 March of the next year, 06:00 Asia/Shanghai."""
    return dt.datetime(year + 1, 3, 1, 6, 0, tzinfo=TZ)


# --------------------------------------------------------------------------------------------- facts

@dataclass
class DeliveryRecord:
    expected: int = 0
    on_time: int = 0
    late: int = 0
    missing: int = 0
    pending: int = 0  # not delivered, deadline after the cutoff: not judged
    late_items: list[tuple[str, str]] = field(default_factory=list)  # (dataset, day)
    missing_items: list[tuple[str, str]] = field(default_factory=list)

    def score(self, late_credit: float) -> float | None:
        judged = self.on_time + self.late + self.missing
        return None if judged == 0 else (self.on_time + late_credit * self.late) / judged


@dataclass
class IssueHandling:
    raised: int = 0
    acknowledged: int = 0
    ack_within_target: int = 0
    verified: int = 0
    fixed_within_target: int = 0
    superseded: int = 0
    reopened_issues: int = 0
    reopen_events: int = 0
    ack_hours: list[float] = field(default_factory=list)
    fix_hours: list[float] = field(default_factory=list)

    @property
    def median_ack_hours(self) -> float | None:
        return statistics.median(self.ack_hours) if self.ack_hours else None

    @property
    def median_fix_hours(self) -> float | None:
        return statistics.median(self.fix_hours) if self.fix_hours else None

    def score(self) -> float:
        """A third each: acknowledged in time, fix verified in time, not reopened; 1 when no issue was raised."""
        if self.raised == 0:
            return 1.0
        not_reopened = self.raised - self.reopened_issues
        return (self.ack_within_target + self.fixed_within_target + not_reopened) / (3 * self.raised)


@dataclass
class AgencyScorecard:
    agency: str
    name: str
    datasets: list[str]
    quality: dict[str, tuple[int, int]] = field(default_factory=dict)  # dimension -> (checked, failed)
    monthly: dict[str, tuple[int, int]] = field(default_factory=dict)  # 'YYYY-MM' -> (checked, failed), 6 dims
    delivery: DeliveryRecord = field(default_factory=DeliveryRecord)
    issues: IssueHandling = field(default_factory=IssueHandling)
    components: dict[str, float | None] = field(default_factory=dict)
    composite: float | None = None
    left_out: list[str] = field(default_factory=list)
    rank: int | None = None

    def pass_rate(self, dimension: str) -> float | None:
        checked, failed = self.quality.get(dimension, (0, 0))
        return None if checked == 0 else max(0.0, 1.0 - failed / checked)

    @property
    def has_data(self) -> bool:
        return any(c for c, _ in self.quality.values()) or self.delivery.expected > 0


@dataclass
class Evaluation:
    year: int
    as_of: dt.datetime
    provisional: bool
    config: EvaluationConfig
    scorecards: list[AgencyScorecard]  # ranked first (by rank), then agencies without data
    notes: list[str] = field(default_factory=list)


def _has_table(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(con.execute("select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                            [schema, table]).fetchone()[0])


def _aware(t: Any) -> dt.datetime | None:
    if not isinstance(t, dt.datetime):
        return None
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t


def quality_facts(gov_con: duckdb.DuckDBPyConnection, start: dt.date, end: dt.date
                  ) -> tuple[dict[tuple[str, str], tuple[int, int]], dict[tuple[str, str], tuple[int, int]]]:
    """({(agency, dimension): (checked, failed)}, {(agency, 'YYYY-MM'): (checked, failed) over the six dimensions})."""
    if not _has_table(gov_con, "quality", "scores"):
        return {}, {}
    by_dim = {(a, d): (int(c), int(f)) for a, d, c, f in gov_con.execute(
        """select agency, dimension, sum(records_checked), sum(records_failed) from quality.scores
           where partition_date >= ? and partition_date < ? group by all order by all""", [start, end]).fetchall()}
    by_month = {(a, m): (int(c), int(f)) for a, m, c, f in gov_con.execute(
        """select agency, strftime(partition_date, '%Y-%m') as month, sum(records_checked), sum(records_failed)
           from quality.scores where partition_date >= ? and partition_date < ? group by all order by all""",
        [start, end]).fetchall()}
    return by_dim, by_month


def delivery_facts(gov_con: duckdb.DuckDBPyConnection, registry: Registry, start: dt.date, end: dt.date,
                   as_of: dt.datetime) -> dict[str, DeliveryRecord]:
    """Per agency: every (registered dataset, evaluated day) judged on time, late, missing or pending vs its SLA."""
    sources = []
    if _has_table(gov_con, "quality", "scores"):
        sources.append("select dataset, partition_date from quality.scores where partition_date >= $start and "
                       "partition_date < $end")
    has_deliveries = _has_table(gov_con, "meta", "deliveries")
    if has_deliveries:
        sources.append("select dataset, partition_date from meta.deliveries where partition_date >= $start and "
                       "partition_date < $end")
    if not sources:
        return {}
    cols = set()
    if has_deliveries:
        cols = {c for (c,) in gov_con.execute("select column_name from information_schema.columns "
                                              "where table_schema = 'meta' and table_name = 'deliveries'").fetchall()}
    arrival = "coalesce(arrived_at, delivered_at)" if "arrived_at" in cols else "delivered_at"
    delivered = (f"""select dataset, partition_date, max({arrival}) as arrival, count(*) as files from meta.deliveries
                     where partition_date >= $start and partition_date < $end and coalesce(status, '') <> 'missing'
                     group by all""" if has_deliveries else
                 "select null::VARCHAR as dataset, null::DATE as partition_date, null::TIMESTAMPTZ as arrival, "
                 "0 as files where false")
    late = ("""select distinct dataset, partition_date from quality.findings where partition_date >= $start and
               partition_date < $end and tool = 'delivery' and rule = $late_rule"""
            if _has_table(gov_con, "quality", "findings") else
            "select null::VARCHAR as dataset, null::DATE as partition_date where false")
    rows = gov_con.execute(
        f"""with days as ({' union '.join(sources)}), delivered as ({delivered}), late as ({late})
            select d.dataset, d.partition_date, dl.arrival, dl.files is not null, l.dataset is not null
            from days d left join delivered dl using (dataset, partition_date)
            left join late l using (dataset, partition_date)
            order by d.dataset, d.partition_date""",
        {"start": start, "end": end, **({"late_rule": RULE_LATE} if "late_rule" in late else {})}).fetchall()
    out: dict[str, DeliveryRecord] = defaultdict(DeliveryRecord)
    for dataset, day, arrived, is_delivered, late_finding in rows:
        ds = registry.datasets.get(dataset)
        if ds is None:
            continue  # no longer registered: no SLA to judge it by
        rec = out[ds.agency]
        rec.expected += 1
        deadline = delivery_deadline(day, ds.delivery.sla_hours)
        arrived = _aware(arrived)
        if is_delivered and arrived is not None and arrived > as_of:
            is_delivered = False  # arrived after the cutoff: not delivered as of it
        if not is_delivered:
            if as_of > deadline:
                rec.missing += 1
                rec.missing_items.append((dataset, day.isoformat()))
            else:
                rec.pending += 1
        elif late_finding or (arrived is not None and arrived > deadline):
            rec.late += 1
            rec.late_items.append((dataset, day.isoformat()))
        else:
            rec.on_time += 1
    return dict(out)


def issue_facts(db: sa.Engine | None, start: dt.date, end: dt.date, as_of: dt.datetime,
                config: EvaluationConfig) -> dict[str, IssueHandling]:
    """Per agency: issues about the period's data raised by ``as_of``, their handling rebuilt from ``issue_events``."""
    from zqdata.opdb import issue_events, quality_issues

    if db is None:
        return {}
    with db.connect() as conn:
        issues = conn.execute(
            sa.select(quality_issues.c.fingerprint, quality_issues.c.agency, quality_issues.c.first_seen_at)
            .where(quality_issues.c.partition_date >= start, quality_issues.c.partition_date < end)
            .order_by(quality_issues.c.fingerprint)).all()
        events: dict[str, list[tuple[str, dt.datetime]]] = defaultdict(list)
        fps = [i.fingerprint for i in issues]
        for chunk in (fps[i:i + 500] for i in range(0, len(fps), 500)):
            for fp, event, at in conn.execute(
                    sa.select(issue_events.c.fingerprint, issue_events.c.event, issue_events.c.event_at)
                    .where(issue_events.c.fingerprint.in_(chunk)).order_by(issue_events.c.event_id)):
                if at <= as_of:
                    events[fp].append((event, at))
    targets = config.issue_handling
    out: dict[str, IssueHandling] = defaultdict(IssueHandling)
    for fp, agency, first_seen in issues:
        evs = events.get(fp, [])
        opened = next((at for e, at in evs if e == "opened"), first_seen if first_seen <= as_of else None)
        if opened is None:
            continue  # raised after the cutoff
        h = out[agency]
        h.raised += 1
        acked = next((at for e, at in evs if e == "acknowledged"), None)
        verified = next((at for e, at in evs if e == "verified"), None)
        reopens = sum(1 for e, _ in evs if e == "reopened")
        if acked is not None:
            hours = (acked - opened).total_seconds() / 3600
            h.acknowledged += 1
            h.ack_hours.append(hours)
            h.ack_within_target += hours <= targets.ack_target_hours
        if verified is not None:
            hours = (verified - opened).total_seconds() / 3600
            h.verified += 1
            h.fix_hours.append(hours)
            h.fixed_within_target += hours <= targets.fix_target_hours
        h.superseded += any(e == "superseded" for e, _ in evs)
        h.reopen_events += reopens
        h.reopened_issues += reopens > 0
    return dict(out)


# --------------------------------------------------------------------------------------------- scoring

def score(card: AgencyScorecard, config: EvaluationConfig) -> None:
    """Fill the card's components and composite (weights of the components with data, scaled to sum to 1)."""
    comps: dict[str, float | None] = {d: card.pass_rate(d) for d in DIMENSION_KEYS}
    comps["delivery"] = card.delivery.score(config.delivery.late_credit)
    comps["issue_handling"] = card.issues.score() if card.has_data else None
    card.components = comps
    card.left_out = [c for c in COMPONENTS if comps[c] is None]
    if not card.has_data:
        card.composite = None
        return
    weights = {c: config.weights.of(c) for c in COMPONENTS if comps[c] is not None}
    total = sum(weights.values())
    card.composite = None if total == 0 else sum(w * comps[c] for c, w in weights.items()) / total


def rank(cards: list[AgencyScorecard]) -> list[AgencyScorecard]:
    """Ranked by composite (4 decimals, equal scores share a rank), then agency code; agencies without data last."""
    scored = [c for c in cards if c.composite is not None]
    keyed = {c.agency: round(c.composite, 4) for c in scored}
    for c in scored:
        c.rank = 1 + sum(1 for v in keyed.values() if v > keyed[c.agency])
    return (sorted(scored, key=lambda c: (-keyed[c.agency], c.agency))
            + sorted((c for c in cards if c.composite is None), key=lambda c: c.agency))


def evaluate_agencies(gov_con: duckdb.DuckDBPyConnection, db: sa.Engine | None, registry: Registry,
                      config: EvaluationConfig, year: int, now: dt.datetime | None = None) -> Evaluation:
    """The year's scorecards of every registered agency (and any agency found in the scores), ranked."""
    start, end = period_bounds(year)
    as_of, provisional = as_of_for(evaluation_cutoff(year), now)
    by_dim, by_month = quality_facts(gov_con, start, end)
    deliveries = delivery_facts(gov_con, registry, start, end, as_of)
    issues = issue_facts(db, start, end, as_of, config)
    agencies = sorted(set(registry.agencies) | {a for a, _ in by_dim} | set(issues))
    cards = []
    for code in agencies:
        agency = registry.agencies.get(code)
        card = AgencyScorecard(code, agency.name if agency else code,
                               sorted(d.code for d in registry.datasets.values() if d.agency == code))
        card.quality = {d: by_dim.get((code, d), (0, 0)) for d in DIMENSION_KEYS}
        card.monthly = {m: v for (a, m), v in by_month.items() if a == code}
        card.delivery = deliveries.get(code, DeliveryRecord())
        card.issues = issues.get(code, IssueHandling())
        score(card, config)
        cards.append(card)
    notes = [] if db is not None else ["未读取运营数据库，问题整改未计入 (operational DB not read: issue handling left out)"]
    return Evaluation(year, as_of, provisional, config, rank(cards), notes)


# --------------------------------------------------------------------------------------------- the report

def _component_label(c: str) -> str:
    return {"delivery": "按时交付 delivery", "issue_handling": "问题整改 issue handling"}.get(c) or f"{cn_name(c)} {c}"


def evaluation_data(ev: Evaluation) -> dict[str, Any]:
    """The evaluation for machines (JSON): every number behind the scorecard."""
    cards = []
    for c in ev.scorecards:
        d, i = c.delivery, c.issues
        cards.append({
            "rank": c.rank, "agency": c.agency, "name": c.name, "datasets": c.datasets,
            "composite": rounded(c.composite), "components": {k: rounded(v) for k, v in c.components.items()},
            "left_out": c.left_out,
            "quality": {dim: {"records_checked": ch, "records_failed": f, "pass_rate": rounded(c.pass_rate(dim))}
                        for dim, (ch, f) in c.quality.items()},
            "monthly": [{"month": m, "records_checked": ch, "records_failed": f,
                         "pass_rate": rounded(None if ch == 0 else max(0.0, 1 - f / ch))}
                        for m, (ch, f) in sorted(c.monthly.items())],
            "deliveries": {"expected": d.expected, "on_time": d.on_time, "late": d.late, "missing": d.missing,
                           "pending": d.pending, "late_items": d.late_items, "missing_items": d.missing_items},
            "issues": {"raised": i.raised, "acknowledged": i.acknowledged, "ack_within_target": i.ack_within_target,
                       "median_hours_to_acknowledge": rounded(i.median_ack_hours, 3), "verified": i.verified,
                       "fixed_within_target": i.fixed_within_target,
                       "median_hours_to_verified_fix": rounded(i.median_fix_hours, 3), "superseded": i.superseded,
                       "reopened_issues": i.reopened_issues, "reopen_events": i.reopen_events},
        })
    cfg = ev.config
    return {"year": ev.year, "scorecards": cards, "notes": ev.notes,
            "weights": {c: cfg.weights.of(c) for c in COMPONENTS},
            "late_credit": cfg.delivery.late_credit,
            "ack_target_hours": cfg.issue_handling.ack_target_hours,
            "fix_target_hours": cfg.issue_handling.fix_target_hours}


def build_evaluation_report(ev: Evaluation, generated_at: dt.datetime | None = None) -> Report:
    """The scorecard as a report: ranking, Art. 20 dimensions, monthly trend, deliveries, issue handling, method."""
    cards = ev.scorecards
    ranked = [c for c in cards if c.composite is not None]
    label = {c.agency: f"{c.name}" for c in cards}
    summary = [f"参评数源机构 {len(ranked)} 个 (agencies evaluated)；无评价数据 {len(cards) - len(ranked)} 个 (no data)"]
    if ranked:
        summary.append(f"第一名 top: {ranked[0].name}（{ranked[0].agency}）综合得分 {ranked[0].composite * 100:.2f}")
        summary.append(f"末位 lowest: {ranked[-1].name}（{ranked[-1].agency}）综合得分 {ranked[-1].composite * 100:.2f}")
    summary.append(f"逾期交付 late deliveries {sum(c.delivery.late for c in cards)}，未交付 missing "
                   f"{sum(c.delivery.missing for c in cards)}；质量问题 issues raised {sum(c.issues.raised for c in cards)}，"
                   f"重新打开 reopened {sum(c.issues.reopened_issues for c in cards)}")
    summary += ev.notes

    rank_rows = [{"agency": label[c.agency], "score": c.composite} for c in ranked]
    ranking = Section("综合排名 Ranked scorecard", [
        "综合得分为各分项得分（0–1）的加权平均，权重见 registry/evaluation.yaml；某分项无数据时不计入，其余权重按比例放大。"
        "Composite = weighted mean of the component scores; a component without data is left out and the other weights "
        "scaled up."])
    chart = bar_chart("evaluation-ranking", "综合得分 Composite score", rank_rows, "agency", "score", "综合得分 score",
                      "数源机构 agency", sort=[r["agency"] for r in rank_rows])
    ranking.charts += [chart] if chart else []
    ranking.tables.append(Table.of(
        ["排名 rank", "数源机构 agency", "代码 code", "综合得分 composite", "质量（六维平均）quality",
         "按时交付 delivery", "问题整改 issues", "未计入 left out"],
        [[c.rank if c.rank is not None else "—", c.name, c.agency,
          "—" if c.composite is None else f"{c.composite * 100:.2f}",
          rate(_mean([c.components.get(d) for d in DIMENSION_KEYS])), rate(c.components.get("delivery")),
          rate(c.components.get("issue_handling")),
          ("无评价数据 no data" if c.composite is None else "、".join(_component_label(x) for x in c.left_out) or "—")]
         for c in cards]))

    dims = Section("第二十条质量维度 Quality by Art. 20 dimension", [
        "各维度通过率 = 1 − 全年问题记录数之和 ÷ 检查记录数之和（quality.scores，按记录数加权）。"
        "Pass rate = 1 − Σ records failed / Σ records checked over the year (weighted by records)."])
    dim_rows = [{"dimension": f"{cn_name(d)}", "agency": label[c.agency], "rate": c.pass_rate(d)}
                for c in ranked for d in DIMENSION_KEYS]
    chart = bar_chart("evaluation-dimensions", "各维度通过率 Pass rate per dimension", dim_rows, "dimension", "rate",
                      "通过率 pass rate", "维度 dimension", group="agency", sort=[cn_name(d) for d in DIMENSION_KEYS])
    dims.charts += [chart] if chart else []
    dims.tables.append(Table.of(
        ["数源机构 agency", *[f"{cn_name(d)} {d}" for d in DIMENSION_KEYS], "检查记录 records checked"],
        [[c.name, *[rate(c.pass_rate(d)) for d in DIMENSION_KEYS],
          number(max((ch for ch, _ in c.quality.values()), default=0))] for c in cards]))

    trend = Section("月度趋势 Monthly trend", [
        "每月六个维度合计的通过率（1 − Σ问题记录 ÷ Σ检查记录）。Monthly pass rate over the six dimensions."])
    trend_rows = [{"month": m, "agency": label[c.agency], "rate": None if ch == 0 else max(0.0, 1 - f / ch)}
                  for c in cards for m, (ch, f) in sorted(c.monthly.items())]
    chart = line_chart("evaluation-trend", "月度通过率 Monthly pass rate", trend_rows, "month", "rate", series="agency",
                       y_title="通过率 pass rate", x_title="月份 month")
    trend.charts += [chart] if chart else []
    months = sorted({r["month"] for r in trend_rows})
    trend.tables.append(Table.of(["数源机构 agency", *months], [
        [c.name, *[rate(None if c.monthly.get(m, (0, 0))[0] == 0 else
                        max(0.0, 1 - c.monthly[m][1] / c.monthly[m][0])) for m in months]]
        for c in cards if c.monthly]))

    deliveries = Section("按时交付 Deliveries vs SLA", [
        "平台评估过的每个数据集 × 日为一次应交付；无交付文件为未交付；最晚到达时间（对象存储时间，否则清单时间）晚于分区日结束后 "
        "sla_hours，或夜间时效检查记录了 delivery.late，为逾期。截止时间在评价截止之后的未交付为待定，不计分。"
        f"得分 = (按时 + {ev.config.delivery.late_credit} × 逾期) ÷ 已判定。"])
    deliveries.tables.append(Table.of(
        ["数源机构 agency", "应交付 expected", "按时 on time", "逾期 late", "未交付 missing", "待定 pending", "得分 score"],
        [[c.name, c.delivery.expected, c.delivery.on_time, c.delivery.late, c.delivery.missing, c.delivery.pending,
          rate(c.components.get("delivery"))] for c in cards]))
    items = [[c.name, kind, ds, day] for c in cards
             for kind, lst in (("逾期 late", c.delivery.late_items), ("未交付 missing", c.delivery.missing_items))
             for ds, day in lst[:LISTED_ITEMS]]
    deliveries.tables.append(Table.of(["数源机构 agency", "类型 kind", "数据集 dataset", "分区日 day"], items))

    handling = Section("问题整改 Issue handling", [
        "质量问题登记（运营数据库）中关于本年度数据的问题；确认与整改用时从问题登记起算，整改以首次复核通过（verified）为准。"
        f"得分 = (按时确认 ≤{ev.config.issue_handling.ack_target_hours:g}h + 按时整改 ≤"
        f"{ev.config.issue_handling.fix_target_hours:g}h + 未重新打开) ÷ (3 × 问题数)；无问题为 1。"])
    handling.tables.append(Table.of(
        ["数源机构 agency", "问题 raised", "已确认 acknowledged", "确认用时中位数 h", "复核通过 verified",
         "整改用时中位数 h", "记录已不存在 superseded", "重新打开 reopened", "得分 score"],
        [[c.name, c.issues.raised, c.issues.acknowledged, number(c.issues.median_ack_hours), c.issues.verified,
          number(c.issues.median_fix_hours), c.issues.superseded, c.issues.reopened_issues,
          rate(c.components.get("issue_handling"))] for c in cards]))

    method = Section("评分方法 Method and weights", [
        f"数据截至 {iso(ev.as_of)}（次年 3 月 1 日 06:00 北京时间截止；问题状态按截止前的事件重建）。"
        "Data as of the cutoff; issue states are rebuilt from the events up to it."])
    method.tables.append(Table.of(["分项 component", "权重 weight"],
                                  [[_component_label(c), f"{ev.config.weights.of(c):.2f}"] for c in COMPONENTS]))

    return Report(kind=KIND, period=str(ev.year),
                  title=f"{ev.year} 年度数源机构公共数据资源运营成效评价 Annual evaluation of source agencies (Art. 22)",
                  as_of=ev.as_of, provisional=ev.provisional, summary=summary,
                  sections=[ranking, dims, trend, deliveries, handling, method], data=evaluation_data(ev),
                  generated_at=(generated_at or dt.datetime.now(TZ)).astimezone(TZ).replace(microsecond=0))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def numeric_metadata(ev: Evaluation) -> Mapping[str, float | int]:
    """Numbers for the Dagster UI (plotted over partitions)."""
    ranked = [c for c in ev.scorecards if c.composite is not None]
    return {"agencies_ranked": len(ranked),
            "top_composite": round(ranked[0].composite, 4) if ranked else 0.0,
            "lowest_composite": round(ranked[-1].composite, 4) if ranked else 0.0,
            "late_deliveries": sum(c.delivery.late for c in ev.scorecards),
            "missing_deliveries": sum(c.delivery.missing for c in ev.scorecards),
            "issues_raised": sum(c.issues.raised for c in ev.scorecards),
            "issues_reopened": sum(c.issues.reopened_issues for c in ev.scorecards)}
