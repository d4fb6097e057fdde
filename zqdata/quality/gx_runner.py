"""Run the GX suites (``expectations/``) on bounded pandas batches of the staging models, and publish Data Docs.

GX's SQL engine does not work on DuckDB, so each partition is read from DuckDB into a bounded pandas batch: the whole
partition up to ``ZQ_GX_MAX_ROWS`` rows, above that a sample by hash of the primary key (all rows of a key stay
together, so key-uniqueness rates are preserved). The day's row count and the profile used as the next days'
baseline are computed in DuckDB over the full partition.

Data Docs work offline (issue 14): the published site loads nothing from outside the machine (`make_site_offline`), and
each validation carries a run name (`<dataset>-<partition>`) and its data asset (the staging model).
"""

from __future__ import annotations

import datetime as dt
import html
import importlib
import logging
import math
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from zqdata.registry import Registry
from zqdata.settings import TZ

TOOL = "gx"
DEFAULT_MAX_ROWS = 200_000
BASELINE_DAYS = 7
_HASH_BUCKETS = 1_000_003

_DDL = [
    "create schema if not exists quality",
    """create table if not exists quality.gx_profiles (
        partition_date DATE, dataset VARCHAR, metric VARCHAR, value DOUBLE)""",
    """create table if not exists quality.gx_results (
        partition_date DATE, agency VARCHAR, dataset VARCHAR, suite VARCHAR, rule VARCHAR, expectation_type VARCHAR,
        column_name VARCHAR, dimension VARCHAR, severity VARCHAR, success BOOLEAN, observed VARCHAR,
        unexpected_count BIGINT, element_count BIGINT, sampled BOOLEAN, detail VARCHAR)""",
    # one row per dataset and partition: which run validated it and on what batch (lets that run's asset checks
    # report the result instead of validating the same batch a second time)
    """create table if not exists quality.gx_validations (
        partition_date DATE, dataset VARCHAR, run_id VARCHAR, validated_at TIMESTAMPTZ, model_present BOOLEAN,
        day_rows BIGINT, batch_rows BIGINT, sampled BOOLEAN, note VARCHAR)""",
]


@dataclass
class ExpectationOutcome:
    rule: str
    expectation_type: str
    column: str | None
    dimension: str
    severity: str
    success: bool
    observed: str
    unexpected_count: int | None
    element_count: int | None
    detail: str


@dataclass
class DatasetValidation:
    dataset: str
    agency: str
    model: str
    suite: object | None  # gx.ExpectationSuite; None when read back from quality.gx_results
    result: object | None  # ExpectationSuiteValidationResult; None when the model is absent or read back
    day_rows: int = 0
    batch_rows: int = 0
    sampled: bool = False
    note: str = ""
    outcomes: list[ExpectationOutcome] = field(default_factory=list)
    present: bool = True  # the staging model exists (False: nothing could be validated)
    validated_by_run: str | None = None  # set when read back: the run whose validation this is
    day: dt.date | None = None  # the partition validated (set by validate_dataset)

    @property
    def success(self) -> bool:
        return self.present and all(o.success for o in self.outcomes)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]


def staging_model(registry: Registry, dataset: str) -> str:
    """dbt staging model name of a dataset: ``stg_<agency>__<dataset>``."""
    return f"stg_{registry.datasets[dataset].agency}__{dataset}"


def ensure_gx_tables(con: duckdb.DuckDBPyConnection) -> None:
    for stmt in _DDL:
        con.execute(stmt)


def max_rows_from_env() -> int:
    return int(os.environ.get("ZQ_GX_MAX_ROWS", DEFAULT_MAX_ROWS))


def _columns(con: duckdb.DuckDBPyConnection, model: str) -> list[str]:
    from zqdata.warehouse import relation_columns

    return list(relation_columns(con, "staging", model))


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pk_expr(registry: Registry, dataset: str, present: set[str]) -> str:
    ds = registry.datasets[dataset]
    if not all(k in present for k in ds.primary_key):
        return "null::VARCHAR"
    return "concat_ws('|', " + ", ".join(f"{_q(k)}::VARCHAR" for k in ds.primary_key) + ")"


def _select_list(registry: Registry, dataset: str, cols: list[str]) -> list[str]:
    ds = registry.datasets[dataset]
    fields = {f.name: f for f in ds.fields}
    out = []
    for c in cols:
        if c.startswith("_") and c != "_lineage_id":
            continue  # technical columns other than the lineage id are not part of the dataset's meaning
        f = fields.get(c)
        if f is not None and f.type in ("integer", "decimal"):
            out.append(f"try_cast({_q(c)} as DOUBLE) as {_q(c)}")
        elif c == "_lineage_id":
            out.append(_q(c))
        else:
            out.append(f"nullif(trim({_q(c)}::VARCHAR), '') as {_q(c)}")
    return out


def profile_partition(con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str, day: dt.date) -> dict[str, float]:
    """Full-partition metrics in DuckDB: rows, fill rate of optional fields, median of ranged numeric fields."""
    model = staging_model(registry, dataset)
    present = set(_columns(con, model))
    ds = registry.datasets[dataset]
    exprs = ["count(*)::DOUBLE as rows"]
    names = ["rows"]
    for f in ds.fields:
        if f.name not in present:
            continue
        if not f.required:
            exprs.append(f"avg(case when nullif(trim({_q(f.name)}::VARCHAR), '') is null then 0.0 else 1.0 end)")
            names.append(f"nonnull:{f.name}")
        if f.range is not None and f.type in ("integer", "decimal"):
            exprs.append(f"median(try_cast({_q(f.name)} as DOUBLE))")
            names.append(f"median:{f.name}")
    row = con.execute(f"select {', '.join(exprs)} from staging.{_q(model)} where _partition_date = ?", [day]).fetchone()
    return {n: float(v) for n, v in zip(names, row) if v is not None}


def store_profile(con: duckdb.DuckDBPyConnection, dataset: str, day: dt.date, metrics: dict[str, float]) -> None:
    ensure_gx_tables(con)
    con.execute("delete from quality.gx_profiles where partition_date = ? and dataset = ?", [day, dataset])
    if metrics:
        con.executemany("insert into quality.gx_profiles values (?, ?, ?, ?)",
                        [[day, dataset, k, v] for k, v in metrics.items()])


def load_baseline(con: duckdb.DuckDBPyConnection, dataset: str, day: dt.date, days: int = BASELINE_DAYS):
    """Median of each metric over the previous ``days`` partitions' profiles (not the day itself)."""
    from expectations.suites import Baseline

    ensure_gx_tables(con)
    rows = con.execute(
        """select metric, median(value), count(distinct partition_date) from quality.gx_profiles
           where dataset = ? and partition_date < ? and partition_date >= ? and (metric <> 'rows' or value > 0)
           group by metric""",
        [dataset, day, day - dt.timedelta(days=days)]).fetchall()
    if not rows:
        return Baseline()
    metrics = {m: v for m, v, _ in rows}
    return Baseline(
        days=max(n for _, _, n in rows),
        rows=metrics.get("rows"),
        nonnull={k.split(":", 1)[1]: v for k, v in metrics.items() if k.startswith("nonnull:")},
        median={k.split(":", 1)[1]: v for k, v in metrics.items() if k.startswith("median:")},
    )


def _history_ratios(registry: Registry, dataset: str, present: set[str], rel: str, day: dt.date
                    ) -> tuple[str, str, list[str], list]:
    """(with clause, join clause, select items, parameters) adding each plausibility field's ratio to the entity's
    median over the previous ``HISTORY_DAYS`` partitions (expectations.suites.history_plausibility). Bounded: one
    aggregate over the dataset's last days in DuckDB, joined to the day by the entity; only in-range values make the
    median, and no history (or a median of 0) leaves the ratio NULL, which GX does not judge."""
    from expectations.suites import HISTORY_DAYS, history_plausibility, history_ratio_column

    ds = registry.datasets[dataset]
    entity, fields = history_plausibility(ds)
    if not fields:
        return "", "", [], []
    if not set(entity + fields) <= present:
        return "", "", [f"null::DOUBLE as {_q(history_ratio_column(f))}" for f in fields], []
    medians = []
    for i, name in enumerate(fields):
        rng = ds.field(name).range
        value = f"try_cast({_q(name)} as DOUBLE)"
        bounds = [f"{value} >= {float(rng.min)!r}" if rng.min is not None else f"{value} is not null"]
        if rng.max is not None:
            bounds.append(f"{value} <= {float(rng.max)!r}")
        medians.append(f"median({value}) filter (where {' and '.join(bounds)}) as _zq_m{i}")
    keys = [f"{_q(c)}::VARCHAR as _zq_k{i}" for i, c in enumerate(entity)]
    with_sql = (f"with _zq_history as (select {', '.join(keys + medians)} from {rel}"
                f" where _partition_date >= ? and _partition_date < ? group by all) ")
    join_sql = "left join _zq_history on " + " and ".join(
        f"{_q(c)}::VARCHAR = _zq_history._zq_k{i}" for i, c in enumerate(entity))
    items = [f"try_cast({_q(name)} as DOUBLE) / nullif(_zq_history._zq_m{i}, 0) as {_q(history_ratio_column(name))}"
             for i, name in enumerate(fields)]
    return with_sql, join_sql, items, [day - dt.timedelta(days=HISTORY_DAYS), day]


def load_batch(con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str, day: dt.date,
               max_rows: int | None = None) -> tuple[pd.DataFrame, int, bool]:
    """The partition's staging rows as a bounded pandas batch; returns (frame, rows in the day, sampled?)."""
    model = staging_model(registry, dataset)
    cols = _columns(con, model)
    limit = max_rows or max_rows_from_env()
    rel = f"staging.{_q(model)}"
    day_rows = con.execute(f"select count(*) from {rel} where _partition_date = ?", [day]).fetchone()[0]
    pk = _pk_expr(registry, dataset, set(cols))
    with_sql, join_sql, ratios, params = _history_ratios(registry, dataset, set(cols), rel, day)
    select = ", ".join([*_select_list(registry, dataset, cols), f"{pk} as _pk", f"{day_rows}::BIGINT as _day_rows",
                        *ratios])
    where = f"{rel}._partition_date = ?"
    sampled = day_rows > limit
    if sampled:
        keep = math.ceil(limit / day_rows * _HASH_BUCKETS)
        where += f" and hash({pk}) % {_HASH_BUCKETS} < {keep}"
    # `.df()`, not `.fetch_arrow_table().to_pandas()`: the Arrow route validated the seven suites at 1 M rows in ~0.9 s
    # instead of 1.57 s, but grew the process's malloc heap by ~290 MB of address space per validated day (never
    # returned; RSS stayed small), and a year's range run then failed to fork dbt at its ops step: ENOMEM, the kernel
    # refusing to commit 51 GB (bench/notes.md 18). With `.df()` the heap stays ~90 MB over 30 days.
    frame = con.execute(f"{with_sql}select {select} from {rel} {join_sql} where {where}", [*params, day]).df()
    if frame.empty:
        # GX needs a row to evaluate the day's volume: one placeholder row carries it, every other column null.
        frame = pd.DataFrame({c: [None] for c in frame.columns}).assign(_day_rows=day_rows)
    return frame, day_rows, sampled


# What a night's quality steps import from Great Expectations (GX's import is ~2.7-4 s, once per process; a run of the
# embedded default is a new process every night), in the order they first need it.
PREFETCH_MODULES = (
    "great_expectations",
    "great_expectations.data_context.types.base",
    "great_expectations.execution_engine.pandas_execution_engine",
    "expectations.suites",
    "zqdata.quality.scores",
    "great_expectations.core.run_identifier",
    "great_expectations.data_context.types.resource_identifiers",
    "great_expectations.render.view.view",
)
PREFETCH_THREAD = "zq-prefetch-gx"
_prefetch_lock = threading.Lock()
_prefetch: threading.Thread | None = None


def prefetch_gx() -> threading.Thread | None:
    """Import what the GX steps need (`PREFETCH_MODULES`) in a background thread, so that the import is paid while
    this process waits for something else (issue 15: the gov dbt step starts it, then waits ~5-90 s for dbt, which
    runs in its own process; the findings step after it then finds GX imported).

    Returns the thread started, or None when there is nothing to do (already imported, or already started). Only
    imports: an import that fails in the thread is left to fail again, with its error, where the module is used."""
    global _prefetch
    with _prefetch_lock:
        if _prefetch is not None or all(m in sys.modules for m in PREFETCH_MODULES):
            return None
        _prefetch = threading.Thread(target=_import_all, args=(PREFETCH_MODULES,), name=PREFETCH_THREAD, daemon=True)
        _prefetch.start()
        return _prefetch


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the step importing it reports the error
            return


def ephemeral_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    from great_expectations.execution_engine import pandas_execution_engine

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX hashes every pandas batch below HASH_THRESHOLD bytes for an informational batch-marker fingerprint, twice per
    # validation (get_batch, then validate): 4.4 of the 10.9 s the seven suites took on a 10 M-row day. The batch is
    # identified by dataset, partition and the sampling note instead, so the fingerprint is switched off.
    pandas_execution_engine.HASH_THRESHOLD = 0
    # No temporary Data Docs site: validation runs render nothing (Data Docs come from render_data_docs only).
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _outcomes(result) -> list[ExpectationOutcome]:
    out = []
    for r in result.results:
        cfg = r.expectation_config
        meta = cfg.meta or {}
        res = r.result or {}
        raised = bool(r.exception_info and r.exception_info.get("raised_exception"))
        observed = res.get("observed_value")
        if observed is None and res.get("unexpected_percent") is not None:
            observed = f"{res['unexpected_percent']:.3f}% unexpected"
        column = cfg.kwargs.get("column")
        if raised:
            detail = f"期望无法执行 (expectation raised): {_short(r.exception_info.get('exception_message'))}"
        else:
            bounds = {k: cfg.kwargs.get(k) for k in ("min_value", "max_value", "mostly") if cfg.kwargs.get(k) is not None}
            detail = f"{meta.get('notes', cfg.type)}；观测值 observed={_short(observed)}；界限 {bounds}"
        out.append(ExpectationOutcome(
            rule=str(meta.get("rule", cfg.type)), expectation_type=cfg.type, column=column,
            dimension=str(meta.get("dimension", "accuracy")), severity=str(meta.get("severity", "warn")),
            success=bool(r.success) and not raised, observed=_short(observed),
            unexpected_count=res.get("unexpected_count"), element_count=res.get("element_count"), detail=detail))
    return out


def validate_dataset(con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str, day: dt.date,
                     max_rows: int | None = None, ctx=None) -> DatasetValidation:
    """Validate one dataset's staging partition against its suite (ephemeral GX context, nothing persisted)."""
    from expectations.suites import build_suite

    ds = registry.datasets[dataset]
    model = staging_model(registry, dataset)
    baseline = load_baseline(con, dataset, day)
    if not _columns(con, model):
        return DatasetValidation(dataset, ds.agency, model, build_suite(registry, dataset, baseline), None, present=False,
                                 note=f"标准化模型 staging.{model} 不存在，未能执行 GX 校验 (staging model missing)",
                                 day=day)
    frame, day_rows, sampled = load_batch(con, registry, dataset, day, max_rows)
    suite = build_suite(registry, dataset, baseline, partition_rows=day_rows)
    ctx = ctx or ephemeral_context()
    source_name = f"gov_staging_{dataset}"
    source = ctx.data_sources.add_or_update_pandas(source_name)
    try:
        asset = source.add_dataframe_asset(name=model)
        batch = asset.add_batch_definition_whole_dataframe(f"{model}_{day}").get_batch(
            batch_parameters={"dataframe": frame})
        # Counts and percentages only: no unexpected values in results or Data Docs, which are shown to people outside
        # the gov platform's data (a record's value is shown only masked by its field's classification, zqdata/display.py).
        result = batch.validate(suite, result_format=GX_RESULT_FORMAT)
    finally:
        # The frame is not kept: GX's project manager holds the last context made for the life of the process, and its
        # data source would hold this frame (its strings in Arrow memory) until the dataset's next validation; the seven
        # sampled frames were ~280 MB of a 10 M-row night's process from its checks to its end (bench/notes.md item 26).
        ctx.data_sources.delete(source_name)
    label_result(result, dataset, model, day)
    note = f"抽样 sampled {len(frame)}/{day_rows} 行（按主键哈希）" if sampled else f"全量 {day_rows} 行"
    return DatasetValidation(dataset, ds.agency, model, suite, result, day_rows, len(frame), sampled, note,
                             _outcomes(result), day=day)


GX_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 0}


def gx_rules(validations: list[DatasetValidation]) -> list:
    """Rule catalog entries of every expectation evaluated."""
    from zqdata.quality.scores import RuleRef

    refs = []
    for v in validations:
        for exp in v.suite.expectations:
            m = exp.meta or {}
            refs.append(RuleRef(v.dataset, TOOL, str(m.get("rule")), str(m.get("dimension")), str(m.get("severity"))))
    return refs


def gx_findings(validations: list[DatasetValidation], day: dt.date) -> list[dict]:
    """Dataset-level findings (row_number NULL) for every failed expectation."""
    out = []
    for v in validations:
        for o in v.failed:
            out.append({"partition_date": day, "agency": v.agency, "dataset": v.dataset, "tool": TOOL, "rule": o.rule,
                        "dimension": o.dimension, "severity": o.severity, "delivery_file": None, "row_number": None,
                        "lineage_id": None, "field": o.column,
                        "detail": f"GX {v.suite.name}（{v.note}）：{o.detail}"})
    return out


def run_gx(con: duckdb.DuckDBPyConnection, registry: Registry, day: dt.date,
           max_rows: int | None = None, run_id: str | None = None, ctx=None) -> list[DatasetValidation]:
    """Validate every dataset, store profiles, results and findings (tool 'gx', replacing the partition's).

    ``run_id``: the Dagster run validating; its GX asset checks read the stored results (`stored_validation`).
    ``ctx``: an ephemeral GX context to reuse (a range run validates its days in one; making one takes ~0.2 s).
    """
    from zqdata.quality.scores import ensure_quality_tables, register_rules
    from zqdata.quality.timeliness import write_findings

    ensure_quality_tables(con)
    ensure_gx_tables(con)
    ctx = ctx or ephemeral_context()
    validations = []
    for code in registry.datasets:
        v = validate_dataset(con, registry, code, day, max_rows, ctx)
        validations.append(v)
        if v.present:
            store_profile(con, code, day, profile_partition(con, registry, code, day))
    rows = [{"partition_date": day, "agency": v.agency, "dataset": v.dataset, "suite": v.suite.name, "rule": o.rule,
             "expectation_type": o.expectation_type, "column_name": o.column, "dimension": o.dimension,
             "severity": o.severity, "success": o.success, "observed": o.observed,
             "unexpected_count": o.unexpected_count, "element_count": o.element_count, "sampled": v.sampled,
             "detail": o.detail} for v in validations for o in v.outcomes]
    con.execute("begin")
    try:
        con.execute("delete from quality.gx_results where partition_date = ?", [day])
        if rows:
            con.register("_zq_gx", pa.Table.from_pylist(rows))
            con.execute("insert into quality.gx_results by name select * from _zq_gx")
            con.unregister("_zq_gx")
        con.execute("delete from quality.gx_validations where partition_date = ?", [day])
        con.executemany(
            "insert into quality.gx_validations values (?, ?, ?, now(), ?, ?, ?, ?, ?)",
            [[day, v.dataset, run_id, v.present, v.day_rows, v.batch_rows, v.sampled, v.note] for v in validations])
        con.execute("delete from quality.findings where partition_date = ? and tool = ?", [day, TOOL])
        write_findings(con, gx_findings(validations, day))
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    register_rules(con, day, TOOL, gx_rules(validations))
    return validations


def stored_validation(con: duckdb.DuckDBPyConnection, registry: Registry, dataset: str, day: dt.date,
                      run_id: str) -> DatasetValidation | None:
    """The validation `run_gx` stored for this partition *in run `run_id`* (None: validate afresh).

    Only the same run's result is reused: it validated the staging partition this run built, so it is current.
    """
    ensure_gx_tables(con)
    head = con.execute(
        """select model_present, day_rows, batch_rows, sampled, note from quality.gx_validations
           where partition_date = ? and dataset = ? and run_id = ?""", [day, dataset, run_id]).fetchone()
    if head is None:
        return None
    present, day_rows, batch_rows, sampled, note = head
    rows = con.execute(
        """select rule, expectation_type, column_name, dimension, severity, success, observed, unexpected_count,
                  element_count, detail
           from quality.gx_results where partition_date = ? and dataset = ? order by rule""", [day, dataset]).fetchall()
    ds = registry.datasets[dataset]
    return DatasetValidation(dataset, ds.agency, staging_model(registry, dataset), None, None, day_rows, batch_rows,
                             sampled, note, [ExpectationOutcome(*r) for r in rows], present=present,
                             validated_by_run=run_id)


def run_name(dataset: str, day: dt.date) -> str:
    """GX run name of a dataset's validation for one partition, shown on its Data Docs page and in the index."""
    return f"{dataset}-{day.isoformat()}"


_RUN_DAY = re.compile(r"-(\d{4}-\d{2}-\d{2})$")  # the partition day at the end of a `run_name`


def run_identifier(dataset: str, day: dt.date):
    """The GX `RunIdentifier` of a dataset's validation; its time is the partition's start, so a rerun of the partition
    overwrites its page instead of adding one."""
    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name=run_name(dataset, day), run_time=dt.datetime.combine(day, dt.time(0), tzinfo=TZ))


def label_result(result, dataset: str, model: str, day: dt.date) -> None:
    """Give a validation result the run and data asset names Data Docs show (else "Run Name __none__", "Data asset:
    None"): `batch.validate` sets neither, unlike a checkpoint run (`ValidationDefinition.run(run_id=...)`)."""
    result.meta["run_id"] = run_identifier(dataset, day)
    result.meta["validation_time"] = result.meta["run_id"].run_time
    # the page reads the data asset from the batch spec; a fluent pandas asset keeps it in the batch definition only
    batch_spec = result.meta.get("batch_spec")
    result.meta["batch_spec"] = {**(batch_spec if isinstance(batch_spec, dict) else {}), "data_asset_name": model}


# The index lists the validations of the latest DATA_DOCS_INDEX_DAYS days (per dataset validated): GX reads every
# result it lists, so an unbounded index costs more each day of history. Older pages stay, linked from their checks.
DATA_DOCS_INDEX_DAYS = 31
# Results older than the index's days leave GX's result store for this folder (beside the store, under
# gx/uncommitted): GX lists and parses every stored key on each build (issue 15).
RESULT_ARCHIVE = "validations_archive"


_TEMPLATE_BYTECODE: list = []  # this process's jinja2.BytecodeCache for GX's views (`share_template_bytecode`)


def share_template_bytecode():  # -> jinja2.BytecodeCache
    """Make GX's Data Docs views compile their templates once per process: GX builds a Jinja environment for each view
    it renders (~15 a night) and parsed and compiled its ~50 templates again in each, 0.33 of the 0.98 s a night's Data
    Docs took on the bench machine (bench/notes.md 19). Each view's environment gets this process's bytecode cache
    (`jinja2.BytecodeCache`: an entry per template, used only while the template's source is unchanged); templates,
    filters and output stay GX's own. Idempotent; returns the cache."""
    if _TEMPLATE_BYTECODE:
        return _TEMPLATE_BYTECODE[0]
    import jinja2
    from great_expectations.render.view.view import DefaultJinjaView

    class MemoryBytecodeCache(jinja2.BytecodeCache):
        def __init__(self) -> None:
            self.codes: dict[str, bytes] = {}

        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            code = self.codes.get(bucket.key)
            if code is not None:
                bucket.bytecode_from_string(code)  # ignored by Jinja when the source's checksum differs

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            self.codes[bucket.key] = bucket.bytecode_to_string()

    cache = MemoryBytecodeCache()
    original = DefaultJinjaView.__init__

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN001 - GX's own signature
        original(self, *args, **kwargs)
        self.env.bytecode_cache = cache

    DefaultJinjaView.__init__ = __init__
    _TEMPLATE_BYTECODE.append(cache)
    return cache


def render_data_docs(validations: list[DatasetValidation], docs_dir: Path, day: dt.date | None = None) -> Path:
    """Render Data Docs for validation results (each of its own partition, ``v.day``, else ``day``); returns
    ``<docs_dir>/gx/site/index.html``. A range run renders its days at once.

    GX writes its project (stores) and builds the site in place under ``<docs_dir>/gx/project``; the site is then made
    to work offline (`make_site_offline`) and published under ``gx/site`` (`publish_site`): the first time as a copy
    switched atomically (a symlink), then page by page, each replaced whole and the index last, so a reader never sees
    a half-written page nor an index listing a page not yet there.

    The cost does not grow with history (issue 15): only these results' pages and their suites' pages are rendered
    (the others were rendered when their partition ran), the index reads the latest `DATA_DOCS_INDEX_DAYS` days, and
    only the files written by this build are made offline and published (a year of pages is 2,500 files, rewritten
    and copied every night before)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    from great_expectations.execution_engine import pandas_execution_engine

    # GX 1.24 ships no usage-statistics client; the setting is kept off in case a later version brings one back.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX hashes every pandas batch below HASH_THRESHOLD bytes for an informational batch-marker fingerprint, twice per
    # validation (get_batch, then validate): 4.4 of the 10.9 s the seven suites took on a 10 M-row day. The batch is
    # identified by dataset, partition and the sampling note instead, so the fingerprint is switched off.
    pandas_execution_engine.HASH_THRESHOLD = 0
    share_template_bytecode()
    root = Path(docs_dir) / "gx" / "project"
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    sites = ctx.variables.data_docs_sites or {}  # a copy: set back below
    index_limit = DATA_DOCS_INDEX_DAYS * max(1, len({v.dataset for v in validations}))
    if (ctx.variables.analytics_enabled is not False
            or any(_site_settings(s, index_limit) != s for s in sites.values())):
        sites = {name: _site_settings(s, index_limit) for name, s in sites.items()}
        ctx.variables.data_docs_sites = sites
        ctx.enable_analytics(False)  # saves both in the project's great_expectations.yml (analytics_enabled: false)
    rendered: set = set()
    for v in validations:
        v_day = v.day or day
        if v_day is None:
            raise ValueError(f"{v.dataset}: 校验结果没有分区日期 (a validation without its partition day)")
        ctx.suites.add_or_update(gx.ExpectationSuite(name=v.suite.name, expectations=[e.copy() for e in v.suite.expectations],
                                                     meta=dict(v.suite.meta or {})))
        rendered.add(ExpectationSuiteIdentifier(name=v.suite.name))
        if v.result is None:
            continue
        if not v.result.meta.get("run_id"):
            label_result(v.result, v.dataset, v.model, v_day)  # a result not made by validate_dataset
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=v.suite.name),
            run_id=run_identifier(v.dataset, v_day),
            batch_identifier=f"{v.model}-{v_day.isoformat()}",
        )
        ctx.validation_results_store.set(key, v.result)
        rendered.add(key)
    # the site's files before the build (not the whole project: its stores hold a file per result, ~0.5 s to walk
    # after a year), without the page folders of the runs not rendered now (a year's 7,700 files: ~0.25 s for the two
    # walks); any file of the built site that differs is this build's
    base = ((sites.get("local_site") or {}).get("store_backend") or {}).get("base_directory")
    runs = {str(k.run_id.run_name) for k in rendered if isinstance(k, ValidationResultIdentifier)}
    before = _file_stamps(Path(ctx.root_directory) / base if base else root, runs)
    # a set: GX tests each stored key's membership (a list would be compared key by key)
    built_sites = ctx.build_data_docs(resource_identifiers=rendered or None)
    built = Path(built_sites["local_site"].removeprefix("file://"))
    written = {p for p, stamp in _file_stamps(built.parent, runs).items() if before.get(p) != stamp}
    dropped = make_site_offline(built.parent, only=written)
    unexpected = sorted(set(dropped) - EXPECTED_DROPS)
    if unexpected:  # a GX upgrade requests something new: the pages may miss a library (see data_docs_vendor/README)
        logging.getLogger(__name__).warning("Data Docs 离线化删除了未知的外部引用 (unknown external references dropped): %s",
                                            unexpected)
    site = publish_site(built.parent, Path(docs_dir) / "gx", written=written) / built.name
    remove_empty_folders(built.parent / "validations")
    store = Path(ctx.validation_results_store.store_backend.full_base_directory)
    archive_old_results(store, store.parent / RESULT_ARCHIVE, DATA_DOCS_INDEX_DAYS)
    return site


def remove_empty_folders(folder: Path) -> int:
    """Remove the empty folders under `folder` (not `folder` itself); returns how many.

    GX's build removes from the site it builds the pages of results no longer in its store (archived:
    `archive_old_results`) but leaves their folders (`validations/<suite>/<run>/<time>/`): ~5,100 empty folders after
    a year, which every build walked again to list the site's pages (issue 15). The published copy keeps its pages."""
    removed = 0
    for parent, _dirs, files in os.walk(folder, topdown=False):
        if files or Path(parent) == Path(folder):
            continue
        try:
            os.rmdir(parent)  # fails when a subfolder was kept
            removed += 1
        except OSError:
            pass
    return removed


def archive_old_results(store: Path, archive: Path, keep_days: int) -> list[Path]:
    """Move the results of partitions older than the newest `keep_days` days out of GX's result store into
    `archive` (same layout: `<suite>/<dataset>-<day>/...`); returns the folders moved.

    GX lists and parses every key of the store on each Data Docs build (its run time through dateutil): ~1 s a night
    after a year of seven datasets. The index shows only the latest days, their pages are already published and
    `quality.gx_results` keeps every outcome, so the older results are kept aside, not deleted; a partition run
    again puts its result back in the store, and the next build moves it out again."""
    folders = [(run, dt.date.fromisoformat(m.group(1)))
               for suite in (store.iterdir() if store.is_dir() else []) if suite.is_dir()
               for run in suite.iterdir() if run.is_dir() and (m := _RUN_DAY.search(run.name))]
    if not folders:
        return []
    first_kept = max(day for _, day in folders) - dt.timedelta(days=keep_days - 1)
    moved = []
    for run, day in folders:
        if day < first_kept:
            dest = archive / run.relative_to(store)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # archived before, then the partition ran again: the newer result replaces it
                shutil.rmtree(dest)
            os.replace(run, dest)
            moved.append(dest)
    return moved


def _file_stamps(folder: Path, runs: set[str] | None = None) -> dict[Path, tuple[int, int]]:
    """{file: (modification time, size)} of every file under `folder`; `runs` given, of the validation pages
    (`validations/<suite>/<run name>/...`) only those of these runs."""
    out = {}
    for parent, dirs, files in os.walk(folder):
        rel = Path(parent).relative_to(folder).parts
        if runs is not None and len(rel) == 2 and rel[0] == "validations":
            dirs[:] = [d for d in dirs if d in runs]
        for name in files:
            st = os.stat(os.path.join(parent, name))
            out[Path(parent) / name] = (st.st_mtime_ns, st.st_size)
    return out


def _site_settings(site: dict, index_limit: int) -> dict:
    """A Data Docs site's settings as this project builds it: no tutorial links (useless offline), an index bounded to
    `index_limit` results, every requested validation page rendered, however old (GX applies the index's limit to the
    pages too unless told otherwise: a re-run of an old partition would get no page), and no profiling section."""
    index = {**(site.get("site_index_builder") or {}), "validation_results_limit": index_limit}
    sections = dict(site.get("site_section_builders") or {})
    sections["validations"] = {**(sections.get("validations") or {}), "validation_results_limit": None}
    sections["profiling"] = "None"  # no profiler runs here; GX's profiling section listed every validation again
    return {**site, "show_how_to_buttons": False, "site_index_builder": index, "site_section_builders": sections}


def data_docs_url(docs_dir: Path | str | None = None, dataset: str | None = None, day: dt.date | None = None,
                  base_url: str | None = None) -> str:
    """URL of the published Data Docs: the index, or with ``dataset`` and ``day`` that validation's page when published.

    Default: a ``file://`` URL through the ``gx/site`` symlink (stays valid across publications). ``base_url``: where
    ``docs_dir`` is served over HTTP (e.g. ``http://docs.gov.internal/published/``); browsers do not follow a
    ``file://`` link from an ``http://`` page such as the Dagster UI, so a served copy is what one click opens.
    """
    if docs_dir is None:
        from zqdata.settings import get_settings

        docs_dir = get_settings().docs_dir
    site = Path(os.path.abspath(docs_dir)) / "gx" / "site"  # not resolve(): the symlink, not the copy it points at now
    page = site / "index.html"
    if dataset is not None and day is not None:
        # validations/<suite>/<run name>/<run time>/<batch id>.html; the run name is unique per dataset and partition
        found = sorted(site.glob(f"validations/*/{run_name(dataset, day)}/*/*.html"))
        page = found[-1] if found else page
    if base_url:
        return base_url.rstrip("/") + "/" + page.relative_to(Path(os.path.abspath(docs_dir))).as_posix()
    return page.as_uri()


# --- offline Data Docs -------------------------------------------------------------------------------------------

VENDOR_DIR = Path(__file__).with_name("data_docs_vendor")
SITE_VENDOR_DIR = "static/vendor"
# file name in the URLs GX 1.24's templates request -> bundled copy in data_docs_vendor/ (same library and version)
VENDORED = {
    "jquery-3.7.1.min.js": "jquery.min.js",
    "popper.min.js": "popper.min.js",
    "bootstrap.min.js": "bootstrap.min.js",
    "bootstrap.min.css": "bootstrap.min.css",
    "bootstrap-table.min.js": "bootstrap-table.min.js",
    "bootstrap-table.min.css": "bootstrap-table.min.css",
    "bootstrap-table-filter-control.min.js": "bootstrap-table-filter-control.min.js",
    "bootstrap-table-filter-control.min.css": "bootstrap-table-filter-control.min.css",
    "bootstrap-table-filter-control.css": "bootstrap-table-filter-control.min.css",
    "bootstrap-datepicker.min.js": "bootstrap-datepicker.min.js",
    "bootstrap-datepicker.min.css": "bootstrap-datepicker.min.css",
}
# what GX 1.24's pages request that is deliberately not bundled (the inline CSS stands in where it matters)
EXPECTED_DROPS = frozenset({
    "https://cdn.jsdelivr.net/npm/vega@5", "https://cdn.jsdelivr.net/npm/vega-lite@5",
    "https://cdn.jsdelivr.net/npm/vega-embed@6",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",
    "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png",
})
# Font Awesome is not bundled: the few icons Data Docs and bootstrap-table use are drawn as Unicode characters.
OFFLINE_CSS = """
.fas, .far, .fab, .fa { font-style: normal; font-weight: 700; display: inline-block; line-height: 1; }
.fa-check-circle::before { content: "\\2714"; }
.fa-times::before { content: "\\2716"; }
.fa-exclamation-triangle::before { content: "\\26A0"; }
.fa-question-circle::before { content: "?"; }
.fa-comment::before { content: "\\2709"; }
.fa-search::before { content: "\\2315"; }
.fa-trash::before, .fa-times-circle::before { content: "\\2715"; }
.fa-angle-left::before { content: "\\2039"; } .fa-angle-right::before { content: "\\203A"; }
.fa-angle-double-left::before { content: "\\00AB"; } .fa-angle-double-right::before { content: "\\00BB"; }
/* the dark theme's logo is a remote image: keep the local one visible in every colour scheme */
.navbar-brand a { background: none !important; }
.navbar-brand a img { visibility: visible !important; }
"""
_OFFLINE_MARK = 'id="zq-offline-data-docs"'

_REMOTE = r"(?:https?:)?//"
_SCRIPT_TAG = re.compile(
    r"<script\b[^>]*?\bsrc\s*=\s*(['\"])(?P<url>" + _REMOTE + r"[^'\"]*)\1[^>]*>\s*</script\s*>", re.I | re.S)
_LINK_TAG = re.compile(r"<link\b[^>]*?\bhref\s*=\s*(['\"])(?P<url>" + _REMOTE + r"[^'\"]*)\1[^>]*>", re.I | re.S)
_IMG_TAG = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*(['\"])(?P<url>" + _REMOTE + r"[^'\"]*)\1[^>]*>", re.I | re.S)
# any other attribute that would load or lead outside (links in GX's prose: its website, newsletter, docs)
_REMOTE_ATTR = re.compile(
    r"\s(?:src|href|srcset|action|formaction|poster|data|background)\s*=\s*(['\"])(?P<url>" + _REMOTE + r"[^'\"]*)\1",
    re.I)
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(?P<url>" + _REMOTE + r"[^'\")]*)\1\s*\)", re.I)
_CSS_IMPORT = re.compile(r"@import\s+(?:url\()?\s*(['\"]?)(?P<url>" + _REMOTE + r"[^'\")]*)\1\s*\)?[^;]*;", re.I)
# a relative path to the site's static/ folder (GX's validation pages point their favicon one level short)
_STATIC_REF = re.compile(r"""(?P<attr>\s(?:src|href)\s*=\s*['"])(?:\./|(?:\.\./)+)static/""", re.I)
_NEWSLETTER_FOOTER = re.compile(r"<footer>(?:(?!</footer>).)*?newsletter(?:(?!</footer>).)*?</footer>", re.I | re.S)


def make_site_offline(site: Path, only: set[Path] | None = None) -> list[str]:
    """Rewrite a built Data Docs site so it loads nothing from outside the machine; returns the URLs dropped.

    The libraries GX's templates take from CDNs are replaced by the copies in ``data_docs_vendor/`` (copied to
    ``static/vendor/``); GX's remote logo, which carries the data context id (a tracking image), by the logo GX copies
    into ``static/images/``; every other external script, stylesheet, image, CSS url() and link is removed. Idempotent.
    ``only``: the files to rewrite (those a build wrote; the others were made offline by the build that wrote them).
    """
    site = Path(site)
    vendor = site / SITE_VENDOR_DIR
    vendor.mkdir(parents=True, exist_ok=True)
    for name in set(VENDORED.values()):
        shutil.copyfile(VENDOR_DIR / name, vendor / name)
    dropped: set[str] = set()

    def files(suffix: str) -> list[Path]:
        # the files a build wrote, without walking the site: after a year it holds ~2,600 pages in 2,500 folders,
        # whose walk grew each night (issue 15)
        if only is None:
            return sorted(site.rglob(f"*{suffix}"))
        return sorted(p for p in only if p.suffix == suffix and p.is_file() and p.is_relative_to(site))

    for page in files(".html"):
        text = page.read_text(encoding="utf-8")
        new = _offline_html(text, os.path.relpath(site, page.parent).replace(os.sep, "/"), site, dropped)
        if new != text:
            page.write_text(new, encoding="utf-8")
    for sheet in files(".css"):
        if sheet.parent == vendor:
            continue
        text = sheet.read_text(encoding="utf-8")
        new = _offline_css(text, dropped)
        if new != text:
            sheet.write_text(new, encoding="utf-8")
    return sorted(dropped)


def _base_name(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _offline_css(text: str, dropped: set[str]) -> str:
    def drop(m: re.Match) -> str:
        dropped.add(m["url"])
        return ""

    def no_url(m: re.Match) -> str:
        dropped.add(m["url"])
        return "none"

    return _CSS_URL.sub(no_url, _CSS_IMPORT.sub(drop, text))


def _offline_html(text: str, to_root: str, site: Path, dropped: set[str]) -> str:
    def local(name: str) -> str:
        return html.escape(f"{to_root}/{SITE_VENDOR_DIR}/{name}", quote=True)

    def script(m: re.Match) -> str:
        name = VENDORED.get(_base_name(m["url"]))
        if name is None or not name.endswith(".js"):
            dropped.add(m["url"])
            return ""
        return f'<script src="{local(name)}"></script>'  # no integrity/crossorigin: a CORS fetch of file:// fails

    def link(m: re.Match) -> str:
        name = VENDORED.get(_base_name(m["url"]))
        if name is None or not name.endswith(".css"):
            dropped.add(m["url"])
            return ""
        return f'<link rel="stylesheet" href="{local(name)}"/>'

    def image(m: re.Match) -> str:
        name = _base_name(m["url"])
        if (site / "static" / "images" / name).is_file():  # GX's logo, without the query that carries the context id
            return m[0].replace(m["url"], html.escape(f"{to_root}/static/images/{name}", quote=True))
        dropped.add(m["url"])
        return ""

    text = _SCRIPT_TAG.sub(script, text)
    text = _LINK_TAG.sub(link, text)
    text = _IMG_TAG.sub(image, text)
    text = _NEWSLETTER_FOOTER.sub("", text)
    text = _REMOTE_ATTR.sub("", text)  # an <a> left without href is plain text
    text = _STATIC_REF.sub(lambda m: f"{m['attr']}{to_root}/static/", text)
    text = _offline_css(text, dropped)  # <style> blocks (GX inlines its default styles) and style attributes
    if _OFFLINE_MARK not in text:
        text = text.replace("</head>", f"<style {_OFFLINE_MARK}>{OFFLINE_CSS}</style>\n</head>", 1)
    return text


def external_references(site: Path) -> list[tuple[str, str]]:
    """(file, URL) of every reference in a site's HTML, CSS and JS files that would make a browser leave the machine:
    src/href-like attributes, CSS url() and @import. Empty for a site `make_site_offline` has processed."""
    from html.parser import HTMLParser

    class Attrs(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.urls: list[str] = []

        def handle_starttag(self, tag, attrs):
            for name, value in attrs:
                if value is None:
                    continue
                if name in ("src", "href", "srcset", "action", "formaction", "poster", "data", "background") and \
                        re.match(_REMOTE, value.strip(), re.I):
                    self.urls.append(value)
                elif name == "style":
                    self.urls += [m["url"] for m in _CSS_URL.finditer(value)]

    site = Path(site)
    out: list[tuple[str, str]] = []
    for path in sorted(p for p in site.rglob("*") if p.suffix in (".html", ".css", ".js") and p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(site).as_posix()
        urls = [m["url"] for m in _CSS_URL.finditer(text)] + [m["url"] for m in _CSS_IMPORT.finditer(text)]
        if path.suffix == ".html":
            parser = Attrs()
            parser.feed(text)
            urls += parser.urls
        else:  # markup built in JS strings
            urls += [m["url"] for m in _REMOTE_ATTR.finditer(text)]
        out += [(rel, u) for u in urls]
    return out


def publish_site(built: Path, root: Path, keep: int = 2, written: set[Path] | None = None) -> Path:
    """Publish a built site at ``root/site`` (a symlink to a copy under ``root/sites``); returns ``root/site``.

    ``written`` None (or nothing published yet): a complete copy is made and the symlink switched to it in one rename;
    the copies beyond ``keep`` are removed (a reader that opened one keeps its files on Linux).

    ``written``: the files of `built` its last build wrote. Only they are published, into the live copy, each written
    beside its place and renamed over it (a reader sees a page whole, old or new), the site's index last (a reader sees
    every page the index lists). A night's publication then costs its own pages: hard-linking a year's 2,500 pages
    into a fresh copy each night, and removing the copy before, took ~1.3 s after a year (issue 15)."""
    import time
    import uuid

    sites = root / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    link = root / "site"
    live = link.resolve() if link.is_symlink() else None
    if written is not None and live is not None and live.is_dir() and live.parent == sites.resolve():
        index = built / "index.html"
        for src in sorted((p for p in written if p.is_file() and p != index), key=str) + (
                [index] if index in written and index.is_file() else []):
            dst = live / src.relative_to(built)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        return link
    tmp = root / f".site-{uuid.uuid4().hex[:8]}"
    target = sites / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # names sort in the order they were made
    shutil.copytree(built, target)
    os.symlink(target.relative_to(root), tmp)
    os.replace(tmp, link)  # atomic: readers see the old site or the new one, never a mix
    for old in sorted((p for p in sites.iterdir() if p.is_dir() and p != target), key=lambda p: p.name)[:-(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return link
