"""Quality scores per partition × agency × dataset × Art. 20 dimension, and the publication gate.

Scores are computed in DuckDB SQL from ``quality.findings`` (every tool's failed rules), ``meta.deliveries``
(records delivered) and ``quality.rule_catalog`` (every rule evaluated, passing or not).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from zqdata.display import mask_text
from zqdata.quality.dimensions import DIMENSION_KEYS, cn_name
from zqdata.quality.model_failures import model_failure_reasons
from zqdata.registry import Registry
from zqdata.warehouse import relation_columns

DEFAULT_MAX_ERROR_RATE = 0.05

_DDL = [
    "create schema if not exists quality",
    """create table if not exists quality.findings (
        partition_date DATE, agency VARCHAR, dataset VARCHAR, tool VARCHAR, rule VARCHAR, dimension VARCHAR,
        severity VARCHAR, delivery_file VARCHAR, row_number INTEGER, lineage_id VARCHAR, field VARCHAR, detail VARCHAR)""",
    """create table if not exists quality.rule_catalog (
        partition_date DATE, dataset VARCHAR, tool VARCHAR, rule VARCHAR, dimension VARCHAR, severity VARCHAR)""",
    """create table if not exists quality.scores (
        partition_date DATE, agency VARCHAR, dataset VARCHAR, dimension VARCHAR, records_checked BIGINT,
        records_failed BIGINT, rules_evaluated BIGINT, rules_failed BIGINT, pass_rate DOUBLE)""",
    """create table if not exists quality.gate_decisions (
        partition_date DATE, agency VARCHAR, dataset VARCHAR, passed BOOLEAN, error_rate DOUBLE,
        max_error_rate DOUBLE, reason VARCHAR, decided_at TIMESTAMPTZ)""",
]


def ensure_quality_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the quality schema tables if absent (layout of docs/ARCHITECTURE.md)."""
    for stmt in _DDL:
        con.execute(stmt)


@dataclass(frozen=True)
class RuleRef:
    dataset: str
    tool: str
    rule: str
    dimension: str
    severity: str


def register_rules(con: duckdb.DuckDBPyConnection, partition_date: dt.date, tool: str, rules: Iterable[RuleRef]) -> int:
    """Replace the partition's catalog of rules evaluated by ``tool`` (passing rules count in rules_evaluated)."""
    ensure_quality_tables(con)
    rows = [{"partition_date": partition_date, "dataset": r.dataset, "tool": tool, "rule": r.rule,
             "dimension": r.dimension, "severity": r.severity} for r in set(rules)]
    con.execute("delete from quality.rule_catalog where partition_date = ? and tool = ?", [partition_date, tool])
    if rows:
        tbl = pa.Table.from_pylist(rows, schema=pa.schema([
            ("partition_date", pa.date32()), ("dataset", pa.string()), ("tool", pa.string()), ("rule", pa.string()),
            ("dimension", pa.string()), ("severity", pa.string())]))
        con.register("_zq_rules", tbl)
        try:
            con.execute("insert into quality.rule_catalog select * from _zq_rules")
        finally:
            con.unregister("_zq_rules")
    return len(rows)


def dataset_of_model(model_name: str, registry: Registry) -> str | None:
    """Registry dataset of a dbt model named ``stg_<agency>__<dataset>`` or ``int_<dataset>[...]``."""
    if "__" in model_name:
        candidate = model_name.split("__", 1)[1]
        return candidate if candidate in registry.datasets else None
    name = model_name.removeprefix("int_")
    for code in sorted(registry.datasets, key=len, reverse=True):
        if name == code or name.startswith(code + "_") or name.endswith("_" + code):
            return code
    return None


def dbt_rules_from_manifest(manifest: dict, registry: Registry) -> list[RuleRef]:
    """Every dbt test tagged with meta {dimension, severity, rule} on a gov model, as rule catalog entries."""
    out: list[RuleRef] = []
    for node in manifest.get("nodes", {}).values():
        if node.get("resource_type") != "test":
            continue
        meta = {**(node.get("config", {}).get("meta") or {}), **(node.get("meta") or {})}
        if meta.get("dimension") not in DIMENSION_KEYS:
            continue
        parents = [n for n in node.get("depends_on", {}).get("nodes", []) if n.startswith("model.")]
        for parent in parents[:1]:  # the tested model; relationship tests also list the referenced one
            ds = dataset_of_model(parent.split(".")[-1], registry)
            if ds:
                out.append(RuleRef(ds, "dbt", str(meta.get("rule") or node.get("name")), meta["dimension"],
                                   str(meta.get("severity", "error"))))
    return out


def _datasets_table(registry: Registry) -> pa.Table:
    return pa.table({"dataset": list(registry.datasets), "agency": [d.agency for d in registry.datasets.values()]})


# Every record delivered counts (issue 12): the records read (meta.deliveries.rows_delivered: accepted, quarantined and
# duplicate files' records alike) plus, for a file that could not be read at all (status rejected|error), the records
# its manifest declares that were not read. A record failed a dimension when a row-level finding says so, when it was
# quarantined (in the dimension of the quarantine reason: a duplicate file's records in consistency), or when it is an
# unread record of such a file (in the dimension of the file's error-severity delivery rule, default completeness).
_RECORDS_CTES = """
deliveries as (
    select * from {deliveries}
), unread as (
    select d.dataset, d.delivery_file, coalesce(r.dimension, 'completeness') as dimension, d.n
    from (select dataset, delivery_file, greatest(coalesce(manifest_record_count, 0) - coalesce(rows_delivered, 0), 0) as n
          from deliveries where status in ('rejected', 'error')) d
    left join (select distinct dataset, delivery_file, dimension from quality.findings
               where partition_date = $day and severity = 'error' and row_number is null and lineage_id is null
                 and delivery_file is not null) r
      on r.dataset = d.dataset and (r.delivery_file = d.delivery_file
                                    or (r.delivery_file like '%/' and starts_with(d.delivery_file, r.delivery_file)))
    where d.n > 0
), checked as (
    select dataset, sum(n)::BIGINT as n from (
        select dataset, coalesce(rows_delivered, 0) as n from deliveries
        union all select dataset, max(n) from unread group by dataset, delivery_file
    ) group by dataset
), failed_records as (
    select dataset, dimension, severity, coalesce(lineage_id, delivery_file || '#' || row_number::VARCHAR) as record
    from quality.findings where partition_date = $day and (row_number is not null or lineage_id is not null)
    union all
    select dataset, dimension, 'error' as severity, record from {quarantined}
)"""

_SCORES_SQL = """
with grid as (
    select d.agency, d.dataset, k.dimension from _zq_datasets d cross join (select unnest($dims) as dimension) k
), f as (
    select * from quality.findings where partition_date = $day
), """ + _RECORDS_CTES.strip() + """, failed as (
    select coalesce(x.dataset, u.dataset) as dataset, coalesce(x.dimension, u.dimension) as dimension,
           coalesce(x.n, 0) + coalesce(u.n, 0) as n
    from (select dataset, dimension, count(distinct record) as n from failed_records group by all) x
    full join (select dataset, dimension, sum(n) as n from unread group by all) u
      on x.dataset = u.dataset and x.dimension = u.dimension
), rules as (
    select dataset, dimension, rule from quality.rule_catalog where partition_date = $day
    union select dataset, dimension, rule from f
), evaluated as (
    select dataset, dimension, count(distinct rule) as n from rules group by all
), rules_failed as (
    select dataset, dimension, count(distinct rule) as n from f group by all
)
select $day::DATE as partition_date, g.agency, g.dataset, g.dimension,
       coalesce(c.n, 0) as records_checked, coalesce(fl.n, 0) as records_failed,
       coalesce(e.n, 0) as rules_evaluated, coalesce(rf.n, 0) as rules_failed,
       case when coalesce(c.n, 0) > 0 then greatest(0.0, 1.0 - coalesce(fl.n, 0) / c.n)
            when coalesce(rf.n, 0) > 0 then 0.0
            when coalesce(e.n, 0) > 0 then 1.0 end as pass_rate
from grid g
left join checked c using (dataset)
left join failed fl on fl.dataset = g.dataset and fl.dimension = g.dimension
left join evaluated e on e.dataset = g.dataset and e.dimension = g.dimension
left join rules_failed rf on rf.dataset = g.dataset and rf.dimension = g.dimension
order by g.agency, g.dataset, g.dimension
"""


def _has_table(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    from zqdata.warehouse import table_exists

    return table_exists(con, schema, table)


def _deliveries_source(con: duckdb.DuckDBPyConnection) -> str:
    if _has_table(con, "meta", "deliveries"):
        cols = set(relation_columns(con, "meta", "deliveries"))
        declared = "manifest_record_count" if "manifest_record_count" in cols else "null::BIGINT"
        return (f"(select dataset, delivery_file, status, rows_delivered, {declared} as manifest_record_count "
                "from meta.deliveries where partition_date = $day)")
    return ("(select null::VARCHAR as dataset, null::VARCHAR as delivery_file, null::VARCHAR as status, "
            "null::BIGINT as rows_delivered, null::BIGINT as manifest_record_count where false)")


def _quarantined_source(con: duckdb.DuckDBPyConnection) -> str:
    """Quarantined records of the partition with the dimension of their reason (zqdata.ingest: quarantine.rows)."""
    if _has_table(con, "quarantine", "rows"):
        return ("(select _dataset as dataset, coalesce(dimension, 'completeness') as dimension, _lineage_id as record "
                "from quarantine.rows where _partition_date = $day)")
    return "(select null::VARCHAR as dataset, null::VARCHAR as dimension, null::VARCHAR as record where false)"


def _records_sql(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    return sql.format(deliveries=_deliveries_source(con), quarantined=_quarantined_source(con))


def compute_scores(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date) -> pa.Table:
    """Replace the partition's rows of quality.scores (kept across days) and return them."""
    ensure_quality_tables(con)
    con.register("_zq_datasets", _datasets_table(registry))
    try:
        sql = _records_sql(con, _SCORES_SQL)
        scores = con.execute(sql, {"day": partition_date, "dims": list(DIMENSION_KEYS)}).fetch_arrow_table()
        con.execute("begin")
        try:
            con.execute("delete from quality.scores where partition_date = ?", [partition_date])
            con.register("_zq_scores", scores)
            con.execute("insert into quality.scores select * from _zq_scores")
            con.unregister("_zq_scores")
            con.execute("commit")
        except Exception:
            con.execute("rollback")
            raise
    finally:
        con.unregister("_zq_datasets")
    return scores


def score_series(scores: pa.Table) -> dict[str, float]:
    """Pass rates weighted by records, per dimension (`score/<dimension>`) and per agency and dimension
    (`score/<agency>/<dimension>`): one number each, as the Dagster UI plots metadata over partitions."""
    sums: dict[str, list[int]] = {}
    for agency, dim, checked, failed in zip(*(scores.column(c).to_pylist() for c in
                                             ("agency", "dimension", "records_checked", "records_failed")), strict=True):
        for key in (f"score/{dim}", f"score/{agency}/{dim}"):
            acc = sums.setdefault(key, [0, 0])
            acc[0] += checked or 0
            acc[1] += failed or 0
    return {k: (1.0 if c == 0 else round(1 - float(f) / float(c), 6)) for k, (c, f) in sorted(sums.items())}


def scores_markdown(scores: pa.Table) -> str:
    """The score table as Markdown, dimensions named in Chinese."""
    lines = ["| 机构 agency | 数据集 dataset | 维度 dimension | 检查记录 checked | 问题记录 failed | 规则数 rules | 未通过规则 failed rules | 通过率 pass rate |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in scores.to_pylist():
        rate = "—" if r["pass_rate"] is None else f"{r['pass_rate']:.2%}"
        lines.append(f"| {r['agency']} | {r['dataset']} | {cn_name(r['dimension'])} | {r['records_checked']} | "
                     f"{r['records_failed']} | {r['rules_evaluated']} | {r['rules_failed']} | {rate} |")
    return "\n".join(lines)


def max_error_rate_from_env() -> float:
    """ZQ_QUALITY_MAX_ERROR_RATE: tolerated share of error-severity failing records per dataset (default 0.05)."""
    from zqdata.settings import env_number

    return env_number("ZQ_QUALITY_MAX_ERROR_RATE", DEFAULT_MAX_ERROR_RATE, minimum=0, maximum=1)


@dataclass
class GateResult:
    """The quality gate of one partition, decided per dataset (issue 12): a dataset with an error-severity
    dataset-level finding or an error-record rate above the tolerance is held back (留置: it does not cross to the
    operations platform and no product reading it is published for the partition); every other dataset passes."""

    passed: bool  # no dataset held back
    partition_date: dt.date
    max_error_rate: float
    failures: list[str] = field(default_factory=list)  # Chinese, one line per failed rule/dataset
    warnings: int = 0
    error_rates: dict[str, float] = field(default_factory=dict)
    held_back: dict[str, str] = field(default_factory=dict)  # dataset -> why (rules and rates, no row values)
    passed_datasets: list[str] = field(default_factory=list)  # registered datasets that may cross

    def description(self) -> str:
        if self.passed:
            return (f"质量门禁通过：{self.partition_date} 无错误级数据集规则失败，各数据集错误记录率均不超过 "
                    f"{self.max_error_rate:.1%}（警告 {self.warnings} 条，不阻断）。")
        return (f"质量门禁未通过：{self.partition_date} 分区留置 {len(self.held_back)} 个数据集（不出域到运营服务平台，"
                f"读取它们的产品本分区不发布）：{'、'.join(sorted(self.held_back))}；"
                f"其余 {len(self.passed_datasets)} 个数据集照常出域 (held back per dataset; the others cross)："
                f"{'、'.join(self.passed_datasets) or '无 none'}。\n"
                + "\n".join(f"- {f}" for f in self.failures))


def _hold(result: GateResult, dataset: str, reason: str) -> None:
    result.passed = False
    result.held_back[dataset] = f"{result.held_back[dataset]}；{reason}" if dataset in result.held_back else reason


def evaluate_gate(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                  max_error_rate: float | None = None) -> GateResult:
    """Hold back each dataset with an error-severity dataset-level finding, an error-record rate above the tolerance,
    or a dbt model that did not build for the partition (quality.model_failures).

    Every record delivered counts (quarantined, duplicate and unreadable files' records included, as in the scores).
    Reads only: runs on a read-only connection once the quality tables exist (the boundary enforces it itself).
    """
    if not _has_table(con, "quality", "findings"):
        ensure_quality_tables(con)
    tol = max_error_rate_from_env() if max_error_rate is None else max_error_rate
    result = GateResult(True, partition_date, tol)
    result.warnings = con.execute(
        "select count(*) from quality.findings where partition_date = ? and severity = 'warn'", [partition_date]
    ).fetchone()[0]
    dataset_level = con.execute(
        """select dataset, tool, rule, dimension, count(*) as n, min(detail) as detail, arg_min(field, detail) as field
           from quality.findings
           where partition_date = ? and severity = 'error' and row_number is null and lineage_id is null
           group by all order by dataset, rule""", [partition_date]).fetchall()
    for dataset, tool, rule, dimension, n, detail, fld in dataset_level:
        name = registry.datasets[dataset].name if dataset in registry.datasets else dataset
        # shown in the gate check's description and metadata: masked by the field's classification (zqdata.display)
        detail = mask_text(registry.datasets.get(dataset), fld, detail, partition_date, row_level=False)
        result.failures.append(f"{name}（{dataset}）错误级数据集规则未通过：{rule}（{tool}，{cn_name(dimension)}）{n} 项：{detail}")
        _hold(result, dataset, f"{rule}（{cn_name(dimension)}）")
    for dataset, reason in model_failure_reasons(con, partition_date).items():  # its dbt models did not build
        name = registry.datasets[dataset].name if dataset in registry.datasets else dataset
        result.failures.append(f"{name}（{dataset}）{reason}")
        _hold(result, dataset, reason)
    rates = con.execute(_records_sql(con, "with " + _RECORDS_CTES.strip() + """, bad as (
                select dataset, count(distinct record) as n from failed_records where severity = 'error' group by dataset
                union all
                select dataset, max(n) from unread group by dataset, delivery_file
            )
            select b.dataset, sum(b.n)::BIGINT, coalesce(any_value(c.n), 0) from bad b left join checked c using (dataset)
            group by b.dataset order by b.dataset"""), {"day": partition_date}).fetchall()
    for dataset, bad, delivered in rates:
        rate = bad / delivered if delivered else 1.0
        result.error_rates[dataset] = rate
        if rate > tol:
            name = registry.datasets[dataset].name if dataset in registry.datasets else dataset
            result.failures.append(f"{name}（{dataset}）错误级记录 {bad}/{delivered} = {rate:.2%}，超过容忍度 {tol:.2%}")
            _hold(result, dataset, f"错误级记录 {bad}/{delivered} = {rate:.2%} > {tol:.2%}")
    result.passed_datasets = sorted(code for code in registry.datasets if code not in result.held_back)
    return result


def held_back_datasets(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date) -> dict[str, str]:
    """The datasets the quality gate holds back for the partition (dataset -> why), evaluated afresh from the gov
    findings (enforce, don't trust); empty when the gov DB has no quality tables at all (nothing was assessed)."""
    if not _has_table(con, "quality", "findings"):
        return {}
    return evaluate_gate(con, registry, partition_date).held_back


def record_gate_decisions(con: duckdb.DuckDBPyConnection, registry: Registry, gate: GateResult,
                          now: dt.datetime | None = None) -> int:
    """Replace the partition's rows of quality.gate_decisions: one per registered dataset, passed or held back."""
    ensure_quality_tables(con)
    now = now or dt.datetime.now(dt.timezone.utc)
    rows = [(gate.partition_date, ds.agency, code, code not in gate.held_back, gate.error_rates.get(code, 0.0),
             gate.max_error_rate, gate.held_back.get(code), now) for code, ds in registry.datasets.items()]
    con.execute("begin")
    try:
        con.execute("delete from quality.gate_decisions where partition_date = ?", [gate.partition_date])
        con.executemany("insert into quality.gate_decisions values (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return len(rows)


def gate_decisions(con: duckdb.DuckDBPyConnection, partition_date: dt.date) -> dict[str, bool] | None:
    """{dataset: passed} recorded for the partition; None when no decision was recorded for it."""
    if not _has_table(con, "quality", "gate_decisions"):
        return None
    rows = con.execute("select dataset, passed from quality.gate_decisions where partition_date = ?",
                       [partition_date]).fetchall()
    return {d: bool(p) for d, p in rows} or None


@dataclass
class FindingsSummary:
    partition_date: dt.date
    delivery_markdown: str = ""
    dbt_findings: int | None = None  # None: no dbt manifest given
    gx_failed: dict[str, list[str]] = field(default_factory=dict)
    gx_notes: dict[str, str] = field(default_factory=dict)
    data_docs: str | None = None
    by_tool: dict[str, int] = field(default_factory=dict)
    validations: list = field(default_factory=list)  # the GX validations (gx_runner.DatasetValidation)


def collect_findings(con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date,
                     manifest: dict | None = None, docs_dir=None, now: dt.datetime | None = None,
                     run_id: str | None = None, dbt_collected: bool = False, gx_context=None) -> FindingsSummary:
    """The partition's findings from every tool run after ingestion: delivery timeliness, dbt tests, GX suites.

    Ingestion has already written its own ('pandera', 'delivery') findings; each tool replaces only its own rows.
    ``docs_dir`` given: Data Docs for the partition's GX results are rendered under ``<docs_dir>/gx``.
    ``dbt_collected``: the partition's dbt findings were collected right after its dbt build (a range run: the next
    day's build replaces the stored test failures), so they are counted here, not collected again.
    ``gx_context``: the ephemeral GX context to validate in (a range run's days share one).
    """
    from zqdata.quality.gx_runner import render_data_docs, run_gx
    from zqdata.quality.timeliness import collect_delivery_findings

    ensure_quality_tables(con)
    summary = FindingsSummary(partition_date)
    summary.delivery_markdown = collect_delivery_findings(con, registry, partition_date, now).as_markdown()
    if manifest is not None:
        from zqdata.quality.dbt_findings import collect_dbt_findings

        summary.dbt_findings = (con.execute("select count(*) from quality.findings where tool = 'dbt' and "
                                            "partition_date = ?", [partition_date]).fetchone()[0]
                                if dbt_collected else collect_dbt_findings(con, manifest, partition_date))
        register_rules(con, partition_date, "dbt", dbt_rules_from_manifest(manifest, registry))
    validations = run_gx(con, registry, partition_date, run_id=run_id, ctx=gx_context)
    summary.validations = validations
    summary.gx_failed = {v.dataset: [o.rule for o in v.failed] for v in validations if v.failed}
    summary.gx_notes = {v.dataset: v.note for v in validations}
    if docs_dir is not None:
        summary.data_docs = str(render_data_docs(validations, docs_dir, partition_date))
    summary.by_tool = dict(con.execute(
        "select tool, count(*) from quality.findings where partition_date = ? group by tool order by tool",
        [partition_date]).fetchall())
    return summary
