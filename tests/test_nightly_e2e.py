"""End to end: the real `nightly_aggregation` job, in process, on the embedded default (local files + two DuckDB files).

One module-scoped run of a defective day is shared by the tests that only read its outcome; reruns, a second day and a
blocked day are separate runs. Volumes are small: the job's behaviour, not its speed, is under test here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import dagster as dg
import duckdb
import pytest

from zqdata import asset_keys
from zqdata.settings import repo_root

DAY = dt.date(2025, 6, 1)
ROWS_PER_DAY = 3000
# Columns that record when something ran, not what the data is.
RUN_TIME_COLUMNS = {"_ingested_at", "ingested_at", "quarantined_at", "created_at", "updated_at_run"}
# Schemas whose tables are the data path (personal data must not leave gov; reruns must reproduce them exactly).
DATA_SCHEMAS = ("ods", "quarantine", "staging", "intermediate", "desensitized", "products")

pytestmark = pytest.mark.slow


def _env(monkeypatch: pytest.MonkeyPatch, data_dir: Path, *, simulate: bool = True, defect_rate: float = 0.01) -> None:
    monkeypatch.setenv("ZQ_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ZQ_STORE_BACKEND", "local")
    for var in ("ZQ_LANDING_DIR", "ZQ_GOV_DB", "ZQ_OPS_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", "e2e-test-key-not-a-secret-0123456789")
    monkeypatch.setenv("ZQ_SIMULATE", "1" if simulate else "0")
    monkeypatch.setenv("ZQ_SIM_ROWS_PER_DAY", str(ROWS_PER_DAY))
    monkeypatch.setenv("ZQ_SIM_DEFECT_RATE", str(defect_rate))
    monkeypatch.setenv("ZQ_SIM_SEED", "7")


def _run(day: dt.date, instance: dg.DagsterInstance):
    from orchestration.nightly import run_nightly

    return run_nightly(day, instance=instance)


def _snapshot(db: Path) -> dict[str, list[tuple]]:
    """Every data-path table's rows (run-time columns excluded), sorted: equal snapshots mean identical tables."""
    out = {}
    with duckdb.connect(str(db), read_only=True) as con:
        tables = con.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema in (select unnest(?)) or table_schema like 'scenario_%' order by 1, 2",
            [list(DATA_SCHEMAS)],
        ).fetchall()
        for schema, table in tables:
            cols = [c for (c,) in con.execute(
                "select column_name from information_schema.columns where table_schema = ? and table_name = ? "
                "order by ordinal_position", [schema, table]).fetchall() if c not in RUN_TIME_COLUMNS]
            col_list = ", ".join(f'"{c}"' for c in cols)
            out[f"{schema}.{table}"] = con.execute(f'select {col_list} from "{schema}"."{table}" order by all').fetchall()
    return out


@pytest.fixture(scope="module")
def nightly_run(tmp_path_factory: pytest.TempPathFactory):
    """One nightly run of DAY with 1% injected defects; yields (data_dir, instance, result, summary)."""
    mp = pytest.MonkeyPatch()
    data_dir = tmp_path_factory.mktemp("nightly") / "data"
    _env(mp, data_dir)
    from zqdata.quality import gx_runner

    prefetch = gx_runner.prefetch_gx  # recorded with who called it (the gov dbt step, before dbt runs)
    mp.setattr(gx_runner, "prefetch_gx",
               lambda: PREFETCH_CALLS.append([f.name for f in traceback.extract_stack()]) or prefetch())
    with dg.instance_for_test() as instance:
        result, summary = _run(DAY, instance)
        mp.setattr(gx_runner, "prefetch_gx", prefetch)
        # the tables of this undisturbed night, before any test changes them (the kill -9 fault test compares with it)
        PRISTINE.update(_snapshot(data_dir / "warehouse" / "gov_platform.duckdb"))
        PRISTINE.update(_snapshot(data_dir / "warehouse" / "ops_platform.duckdb"))
        yield data_dir, instance, result, summary
    mp.undo()


PRISTINE: dict[str, list[tuple]] = {}
PREFETCH_CALLS: list[list[str]] = []  # the call stacks of gx_runner.prefetch_gx during the module's nightly run


def test_nightly_job_materializes_every_stage(nightly_run):
    data_dir, _, result, summary = nightly_run
    assert result.success, summary.checks_failed
    rows = {table: n for _, table, n in summary.stage_rows}
    for stage in ("ods.resident_population", "staging.stg_psb__resident_population",
                  "intermediate.int_resident_population", "desensitized.bus_card_swipes",
                  "products.ops_sme_credit_profile", "products.ops_transit_ridership"):
        assert rows.get(stage, 0) > 0, f"{stage} is empty after the nightly run: {rows}"
    assert (data_dir / "warehouse" / "gov_platform.duckdb").exists()
    assert (data_dir / "warehouse" / "ops_platform.duckdb").exists()


def test_the_gov_dbt_step_starts_importing_gx_before_it_builds(nightly_run):
    """The night's GX import is started by the gov dbt step (tests/test_gx_prefetch.py: in its own thread), before
    dbt runs, so the findings step after it does not pay it."""
    assert len(PREFETCH_CALLS) == 1
    names = PREFETCH_CALLS[0]
    assert "gov_dbt_models" in names
    assert not {"build_gov_day", "build_gov_range", "build_partition"} & set(names)


def test_dq_audit_keeps_the_failing_rows_of_the_tests_that_found_some_and_no_empty_table(nightly_run):
    """bench/notes.md 18: a gov dbt test that passed leaves no empty dq_audit table (they were ~2/3 of the gov
    catalog, loaded by every connection); each test that found failing rows keeps them, and the quality findings
    hold a finding for each of those rows' tests with a rule."""
    from assets.gov_platform.dbt_models import _manifest
    from zqdata.quality.dbt_findings import dbt_test_meta

    data_dir, _, result, _ = nightly_run
    tests = {n["name"]: n for n in _manifest()["nodes"].values() if n["resource_type"] == "test"}
    gov = [e for e in result.get_asset_check_evaluations() if e.check_name in tests and e.asset_key.path[0] == "gov"]
    failing = {tests[e.check_name].get("alias") or e.check_name for e in gov
               if e.metadata["dagster_dbt/failed_row_count"].value > 0}
    assert failing and len(gov) > 100, "the 1% injected defects fail some of the night's ~140 gov tests"
    with duckdb.connect(str(data_dir / "warehouse" / "gov_platform.duckdb"), read_only=True) as con:
        stored = {t: con.execute(f'select count(*) from dq_audit."{t}"').fetchone()[0] for (t,) in con.execute(
            "select table_name from duckdb_tables() where schema_name = 'dq_audit'").fetchall()}
        rules = {r for (r,) in con.execute("select distinct rule from quality.findings where tool = 'dbt'").fetchall()}
    assert set(stored) == failing and all(n > 0 for n in stored.values()), stored
    assert rules and rules <= {dbt_test_meta(n).get("rule") for n in tests.values()}
    assert rules == {dbt_test_meta(tests[e.check_name]).get("rule") for e in gov if not e.passed
                     and "_lineage_id" in _columns_of(data_dir, tests[e.check_name])} - {None}


def _columns_of(data_dir: Path, node: dict) -> set[str]:
    with duckdb.connect(str(data_dir / "warehouse" / "gov_platform.duckdb"), read_only=True) as con:
        return {c for (c,) in con.execute("select column_name from duckdb_columns() where schema_name = 'dq_audit' "
                                          "and table_name = ?", [node.get("alias") or node["name"]]).fetchall()}


def test_nightly_job_writes_quality_scores_and_publishes_data_docs(nightly_run):
    """Issue 3: the nightly job keeps the partition's scores per agency × dataset × dimension and publishes GX Data Docs."""
    from zqdata.quality.dimensions import DIMENSIONS
    from zqdata.registry import registry

    data_dir = nightly_run[0]
    with duckdb.connect(str(data_dir / "warehouse" / "gov_platform.duckdb"), read_only=True) as con:
        scores = con.execute("select dataset, dimension, records_checked, records_failed, pass_rate "
                             "from quality.scores where partition_date = ?", [DAY]).fetchall()
    assert {d for d, *_ in scores} == set(registry().datasets)
    assert {dim for _, dim, *_ in scores} <= {d.key for d in DIMENSIONS}
    assert any(failed > 0 for *_, failed, _ in scores)  # 1% injected defects show up in the scores
    assert all(0.0 <= rate <= 1.0 for *_, rate in scores)
    index = next((data_dir / "published").rglob("index.html"))
    html = index.read_text(encoding="utf-8")
    for dataset in registry().datasets:
        assert f"zq_{dataset}" in html  # every dataset's suite has its validation result on the site


def test_rows_delivered_equal_accepted_plus_quarantined_per_delivery(nightly_run):
    data_dir = nightly_run[0]
    with duckdb.connect(str(data_dir / "warehouse" / "gov_platform.duckdb"), read_only=True) as con:
        deliveries = con.execute(
            "select dataset, delivery_file, rows_delivered from meta.deliveries "
            "where partition_date = ? and delivery_file is not null", [DAY]).fetchall()
        assert len(deliveries) >= 7
        for dataset, file, delivered in deliveries:
            accepted = con.execute(f'select count(*) from ods."{dataset}" where _delivery_file = ?', [file]).fetchone()[0]
            quarantined = con.execute(
                "select count(distinct _row_number) from quarantine.rows where _delivery_file = ?", [file]).fetchone()[0]
            assert delivered == accepted + quarantined, (dataset, file, delivered, accepted, quarantined)


def test_ops_platform_holds_none_of_the_delivered_ids_or_phones(nightly_run):
    """Acceptance (b): no raw citizen ID or phone number that was delivered exists anywhere in the ops database."""
    data_dir = nightly_run[0]
    con = duckdb.connect()
    con.execute(f"attach '{data_dir / 'warehouse' / 'gov_platform.duckdb'}' as gov (read_only)")
    con.execute(f"attach '{data_dir / 'warehouse' / 'ops_platform.duckdb'}' as ops (read_only)")
    con.execute("""
        create temp table secrets as
        select citizen_id as v from gov.ods.resident_population where citizen_id <> ''
        union select phone from gov.ods.resident_population where phone <> ''
        union select legal_rep_id from gov.ods.enterprise_registry where legal_rep_id <> ''
        union select subject_id from gov.ods.subject_consent where subject_type = 'person'
    """)
    n_secrets = con.execute("select count(*) from secrets").fetchone()[0]
    assert n_secrets > 100
    columns = con.execute(
        "select schema_name, table_name, column_name from duckdb_columns() "
        "where database_name = 'ops' and data_type = 'VARCHAR'").fetchall()
    assert columns, "the ops database has no text columns to scan"
    leaks = []
    for schema, table, column in columns:
        n = con.execute(
            f'select count(*) from ops."{schema}"."{table}" t join secrets s on position(s.v in t."{column}") > 0'
        ).fetchone()[0]
        if n:
            leaks.append((schema, table, column, n))
    assert leaks == []


def test_rerunning_the_partition_reproduces_identical_tables(nightly_run, tmp_path, monkeypatch):
    """Acceptance (d): the same partition twice gives identical tables and no duplicate lineage id."""
    data_dir, instance, _, _ = nightly_run
    gov, ops = data_dir / "warehouse" / "gov_platform.duckdb", data_dir / "warehouse" / "ops_platform.duckdb"
    before = {**_snapshot(gov), **_snapshot(ops)}
    _env(monkeypatch, data_dir)
    result, summary = _run(DAY, instance)
    assert result.success, summary.checks_failed
    after = {**_snapshot(gov), **_snapshot(ops)}
    assert before.keys() == after.keys()
    changed = [t for t in before if before[t] != after[t]]
    assert changed == []
    with duckdb.connect(str(gov), read_only=True) as con:
        for (table,) in con.execute("select table_name from information_schema.tables where table_schema = 'ods'").fetchall():
            dupes = con.execute(
                f'select count(*) - count(distinct _lineage_id) from ods."{table}"').fetchone()[0]
            assert dupes == 0, table


def test_failed_checks_carry_the_trace_in_the_event_log(nightly_run):
    """Issue 4: the check result shown in the UI carries the trace back to the agency, delivery file and rows,
    read back from the instance's event log (what the UI shows)."""
    _, instance, result, _ = nightly_run
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert failed, "1% injected defects should fail some checks"
    stored = []
    for e in failed:
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(e.asset_key, e.check_name), limit=1)
        evaluation = records[0].event.dagster_event.event_specific_data
        trace = {k: v.value for k, v in evaluation.metadata.items() if "trace" in k}
        if trace:
            stored.append((e.check_name, "\n".join(str(v) for v in trace.values())))
    assert stored, f"no failed check carries a trace; failed: {[e.check_name for e in failed][:5]}"
    from zqdata.registry import registry

    agency_names = [a.name for a in registry().agencies.values()]
    for name, text in stored:
        assert "/2025-06-01/" in text, (name, text[:500])  # the delivery file's landing key
        assert any(a in text for a in agency_names), (name, text[:500])  # the responsible agency, by name
        assert "行" in text or "row" in text, (name, text[:500])  # the rows


def test_second_day_keeps_history_and_first_day_untouched(nightly_run, monkeypatch):
    """A backfill goes day by day: a later partition adds its rows and leaves earlier partitions as they were."""
    data_dir, instance, _, _ = nightly_run
    gov = data_dir / "warehouse" / "gov_platform.duckdb"
    with duckdb.connect(str(gov), read_only=True) as con:
        day1 = con.execute("select count(*) from intermediate.int_bus_card_swipes where _partition_date = ?", [DAY]).fetchone()[0]
    _env(monkeypatch, data_dir)
    result, summary = _run(DAY + dt.timedelta(days=1), instance)
    assert result.success, summary.checks_failed
    with duckdb.connect(str(gov), read_only=True) as con:
        per_day = dict(con.execute(
            "select _partition_date, count(*) from intermediate.int_bus_card_swipes group by 1").fetchall())
    assert per_day[DAY] == day1 and per_day[DAY + dt.timedelta(days=1)] > 0
    # the partition reached dbt in the environment, not as --vars: the new night re-parsed nothing of the project
    from assets.dbt_common import DBT_PROJECT_DIR

    logs = [d / "dbt.log" for d in (DBT_PROJECT_DIR / "target").glob(f"*-{result.run_id[:8]}-*")]
    assert len(logs) == 2, logs  # the gov build and the ops products build
    for log in logs:
        text = log.read_text(encoding="utf-8")
        assert "Partial parsing enabled" in text and "Unable to do partial parsing" not in text, log


def _ops_rows(data_dir: Path, table: str, day: dt.date) -> int:
    """Rows of ``table`` for ``day`` in the ops DB; 0 when the table does not exist (nothing ever crossed into it)."""
    schema, name = table.split(".")
    with duckdb.connect(str(data_dir / "warehouse" / "ops_platform.duckdb"), read_only=True) as con:
        if not con.execute("select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                           [schema, name]).fetchone()[0]:
            return 0
        return con.execute(f'select count(*) from "{schema}"."{name}" where _partition_date = ?', [day]).fetchone()[0]


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_per_dataset_gate_and_issue_lifecycle_through_real_redeliveries(tmp_path, monkeypatch):
    """Issues 3 and 12: a water delivery whose manifest disagrees with its content fails the quality gate for water only:
    water is held back (its partition is not on the ops platform, the SME credit profile that reads it is not
    published), while bus swipes and the other datasets cross and the transit product is published. The nightly job
    files the issue itself (operational DB); the agency redelivers a corrected file and the rerun verifies it and
    publishes the SME profile; a bad redelivery after that reopens it and withdraws the SME profile only."""
    from zqdata import issues, opdb, publish
    from zqdata.registry import registry
    from zqdata.simulator import simulate_day
    from zqdata.storage import LocalObjectStore

    data_dir = tmp_path / "data"
    _env(monkeypatch, data_dir, simulate=False)
    for code in registry().agencies:
        monkeypatch.delenv(f"ZQ_WEBHOOK_{code.upper()}", raising=False)
    store = LocalObjectStore(data_dir / "landing")
    db = opdb.get_engine()

    def deliver(defective: bool) -> None:
        simulate_day(store, registry(), DAY, ROWS_PER_DAY, seed=7, defect_rate=0.0,
                     defect_kinds=["manifest_count_mismatch:water_usage"] if defective else [])

    def water_issues() -> dict[str, str]:
        return {i.rule: i.status for i in issues.list_issues(db, partition_date=DAY.isoformat())
                if i.dataset == "water_usage"}

    def served(product: str):
        return publish.current_snapshot(publish.published_store(), product, DAY)

    with dg.instance_for_test() as instance:
        deliver(defective=True)
        result, summary = _run(DAY, instance)
        gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "quality_gate"]
        assert gate and not gate[0].passed and summary.gate_passed is False
        assert gate[0].severity == dg.AssetCheckSeverity.ERROR  # visible as an error in the UI, but not blocking
        assert set(summary.held_back) == {"water_usage"}, summary.held_back
        # the night still succeeds: the other agencies' data crossed and their product was published
        assert result.success, summary.checks_failed
        materialized = _materialized(result)
        assert any(k.startswith("gov/ods/") for k in materialized)
        assert "gov/quality/issues" in materialized  # the issues are filed even (especially) when the gate fails
        assert {"ops/desensitized/desensitized_bus_card_swipes", "ops/published/published_transit_ridership"} <= materialized
        assert "ops/published/published_sme_credit_profile" not in materialized
        assert summary.published == ["ops_transit_ridership"]
        water = instance.get_latest_materialization_event(dg.AssetKey(asset_keys.desensitized("water_usage")))
        assert "record_count" in water.asset_materialization.metadata["held_back"].value
        assert _ops_rows(data_dir, "desensitized.water_usage", DAY) == 0
        assert _ops_rows(data_dir, "scenario_sme_credit_profile.water_usage", DAY) == 0
        assert _ops_rows(data_dir, "desensitized.bus_card_swipes", DAY) > 0
        assert _ops_rows(data_dir, "scenario_sme_credit_profile.enterprise_registry", DAY) > 0  # passed: crossed
        assert served("ops_sme_credit_profile") is None
        assert served("ops_transit_ridership") is not None
        opened = water_issues()
        rule = next(r for r in opened if "count" in r)
        assert opened[rule] in ("open", "notified")
        text = format_summary_text(summary)  # the summary says the gate failed, for which agency, and what was held back
        assert "质量门禁 quality gate: 未通过 FAILED" in text and f"{registry().agencies['water'].name} (water)" in text
        assert "留置 held back" in text and f"{registry().datasets['water_usage'].name}（water_usage）" in text

        # the agency fixes its extract and says so
        issue = next(i for i in issues.list_issues(db, partition_date=DAY.isoformat()) if i.rule == rule)
        issues.resolve(db, issue.issue_id, note="已重新交付正确文件", by="water")
        deliver(defective=False)
        result, summary = _run(DAY, instance)
        assert [e.passed for e in result.get_asset_check_evaluations() if e.check_name == "quality_gate"] == [True]
        assert summary.held_back == {}
        assert water_issues()[rule] == "verified"
        assert _ops_rows(data_dir, "desensitized.water_usage", DAY) > 0
        assert _ops_rows(data_dir, "scenario_sme_credit_profile.water_usage", DAY) > 0
        assert served("ops_sme_credit_profile") is not None and served("ops_transit_ridership") is not None

        deliver(defective=True)  # the same fault comes back
        result, summary = _run(DAY, instance)
        again = issues.get_issue(db, issue.issue_id)
        assert again.reopen_count == 1 and again.status == "notified"  # reopened, and the agency told again
        assert [e["event"] for e in issues.issue_events(db, issue.issue_id)][-2:] == ["reopened", "notified"]
        # the redelivery the agency replaced its data with fails the gate: the earlier publication of the product that
        # reads water is withdrawn and water's partition leaves the ops platform; the transit product stays served
        assert served("ops_sme_credit_profile") is None
        assert served("ops_transit_ridership") is not None
        assert _ops_rows(data_dir, "desensitized.water_usage", DAY) == 0
        assert _ops_rows(data_dir, "scenario_sme_credit_profile.water_usage", DAY) == 0


def test_a_night_with_one_agencys_garbage_delivery_still_publishes_the_other_agencies_data(tmp_path, monkeypatch):
    """Issue 12: the water company delivers a garbage file (not its registered columns: every record quarantined).
    Its scores count every delivered record as failed (not 1.0), the gate holds back water only, and the night crosses
    and publishes the rest: the transit product is published, the SME profile (which reads water) is not."""
    from zqdata import landing, publish
    from zqdata.registry import registry
    from zqdata.simulator import simulate_day
    from zqdata.storage import LocalObjectStore

    data_dir = tmp_path / "data"
    _env(monkeypatch, data_dir, simulate=False)
    for code in registry().agencies:
        monkeypatch.delenv(f"ZQ_WEBHOOK_{code.upper()}", raising=False)
    store = LocalObjectStore(data_dir / "landing")
    simulate_day(store, registry(), DAY, ROWS_PER_DAY, seed=7, defect_rate=0.0)
    manifest = landing.read_manifest(store, "water", "water_usage", DAY)
    garbage = ("垃圾,乱码\n" + "".join(f"???{i},@@@\n" for i in range(120))).encode("utf-8")
    landing.write_delivery(store, "water", "water_usage", DAY, [(manifest.files[0].name, garbage, "csv", "utf-8", 120)],
                           manifest.extracted_at, manifest.delivered_at)

    with dg.instance_for_test() as instance:
        result, summary = _run(DAY, instance)
        assert summary.gate_passed is False and set(summary.held_back) == {"water_usage"}, summary.held_back
        assert result.success, summary.checks_failed
        with duckdb.connect(str(data_dir / "warehouse" / "gov_platform.duckdb"), read_only=True) as con:
            scores = {dim: (checked, failed, rate) for dim, checked, failed, rate in con.execute(
                "select dimension, records_checked, records_failed, pass_rate from quality.scores "
                "where partition_date = ? and dataset = 'water_usage'", [DAY]).fetchall()}
            decisions = dict(con.execute("select dataset, passed from quality.gate_decisions where partition_date = ?",
                                         [DAY]).fetchall())
        assert scores["understandability"] == (120, 120, 0.0), scores
        assert decisions == {code: code != "water_usage" for code in registry().datasets}
        assert summary.published == ["ops_transit_ridership"]
        excluded = {m.asset_key.path[-1] for m in result.get_asset_materialization_events()
                    if getattr(m.materialization.metadata.get("dbt_status"), "value", None) == "excluded"}
        assert excluded == {"ops_sme_credit_profile"}  # the product reading water waits: not built for the partition
        assert _ops_rows(data_dir, "products.ops_sme_credit_profile", DAY) == 0
        assert _ops_rows(data_dir, "products.ops_transit_ridership", DAY) > 0
        assert _ops_rows(data_dir, "desensitized.bus_card_swipes", DAY) > 0
        assert _ops_rows(data_dir, "scenario_transit_ridership.bus_card_swipes", DAY) > 0
        assert _ops_rows(data_dir, "desensitized.water_usage", DAY) == 0
        store_ = publish.published_store()
        assert publish.current_snapshot(store_, "ops_transit_ridership", DAY) is not None
        assert publish.current_snapshot(store_, "ops_sme_credit_profile", DAY) is None


def test_check_evaluations_carry_their_partition_rule_dimension_and_severity(nightly_run):
    """Issue 14: in the UI every check evaluation shows its partition; a dbt rule's evaluation carries its Art. 20
    dimension, the rule's severity (the UI's severity follows it), the agency, records checked / failed and pass rate;
    the scores are numbers of their own (plotted over partitions)."""
    from dagster._core.events import DagsterEventType

    _, instance, result, _ = nightly_run
    records = instance.get_records_for_run(result.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION,
                                           limit=100_000).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    assert evaluations and {e.partition for e in evaluations} == {DAY.isoformat()}
    rules = [e for e in evaluations if e.metadata.get("rule_severity") is not None]
    assert {e.asset_key.path[1] for e in rules} >= {"ods", "staging", "intermediate", "products"}
    for e in rules:
        want = dg.AssetCheckSeverity.ERROR if e.metadata["rule_severity"].value == "error" else dg.AssetCheckSeverity.WARN
        assert e.severity == want, (e.check_name, e.severity, e.metadata["rule_severity"])
        assert e.metadata["dimension"].value in ("accuracy", "completeness", "consistency", "standardization",
                                                 "timeliness", "understandability")
    failed = [e for e in rules if not e.passed and e.asset_key.path[1] == "staging"]
    assert failed, "the 1% injected defects fail some staging rules"
    for e in failed:
        checked, bad = e.metadata["records_checked"].value, e.metadata["records_failed"].value
        assert 0 < bad <= checked and e.metadata["pass_rate"].value == pytest.approx(1 - bad / checked)
        assert e.metadata["agency"].value in {d.agency for d in __import__("zqdata.registry").registry.registry().datasets.values()}
    (scores,) = [m.materialization for m in result.get_asset_materialization_events()
                 if m.asset_key.path == ["gov", "quality", "scores"]]
    series = {k: v.value for k, v in scores.metadata.items() if k.startswith("score/")}
    assert {f"score/{d}" for d in ("accuracy", "completeness")} <= set(series)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in series.values())
    assert any(v < 1.0 for v in series.values())


def _water_model_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(data dir, gov DB) of nights whose water staging model fails in dbt: its gov table altered by hand beforehand,
    `reading_date` made INTEGER, so dbt's insert of a partition fails."""
    data_dir = tmp_path / "data"
    _env(monkeypatch, data_dir, defect_rate=0.0)
    gov_db = data_dir / "warehouse" / "gov_platform.duckdb"
    gov_db.parent.mkdir(parents=True)
    with duckdb.connect(str(gov_db)) as con:
        con.execute("create schema staging")
        con.execute("create table staging.stg_water__water_usage (_partition_date DATE, reading_date INTEGER)")
    return data_dir, gov_db


def test_a_failing_gov_model_holds_back_its_own_dataset_and_the_others_still_publish(tmp_path, monkeypatch):
    """Issue 12, failure isolation: the water company's staging model fails in dbt (here: its gov table was altered by
    hand, `reading_date` made INTEGER, so dbt's insert of the partition fails). Only water is held back: the gov step
    confines the failure (its partition emptied, quality.model_failures, the gate's reason), every other agency's data
    crosses and the transit product is published."""
    from zqdata import publish
    from zqdata.registry import registry

    data_dir, gov_db = _water_model_broken(tmp_path, monkeypatch)

    with dg.instance_for_test() as instance:
        result, summary = _run(DAY, instance)
        assert result.success, summary.checks_failed
        assert set(summary.held_back) == {"water_usage"}, summary.held_back
        assert "模型未构建" in summary.held_back["water_usage"] and "stg_water__water_usage" in summary.held_back["water_usage"]
        assert summary.published == ["ops_transit_ridership"]
        unbuilt = {m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()
                   if m.materialization.metadata.get("dbt_status") is not None}
        # what did not build says so; the product reading water waits (not built), the transit product was built
        assert {k: v["dbt_status"].value for k, v in unbuilt.items()} == {
            "stg_water__water_usage": "error", "int_water_usage": "skipped", "ops_sme_credit_profile": "excluded"}
    with duckdb.connect(str(gov_db), read_only=True) as con:
        failures = con.execute("select model, status, dataset from quality.model_failures where partition_date = ? "
                               "order by model", [DAY]).fetchall()
        decisions = dict(con.execute("select dataset, passed from quality.gate_decisions where partition_date = ?",
                                     [DAY]).fetchall())
        built = con.execute("select count(*) from staging.stg_power__electricity_usage where _partition_date = ?",
                            [DAY]).fetchone()[0]
        water_int = con.execute("select count(*) from intermediate.int_water_usage where _partition_date = ?",
                                [DAY]).fetchone()[0] if con.execute(
            "select count(*) from information_schema.tables where table_name = 'int_water_usage'").fetchone()[0] else 0
    assert failures == [("int_water_usage", "skipped", "water_usage"), ("stg_water__water_usage", "error", "water_usage")]
    assert decisions == {code: code != "water_usage" for code in registry().datasets}
    assert built > 0 and water_int == 0
    assert _ops_rows(data_dir, "desensitized.bus_card_swipes", DAY) > 0
    assert _ops_rows(data_dir, "desensitized.electricity_usage", DAY) > 0
    assert _ops_rows(data_dir, "desensitized.water_usage", DAY) == 0
    assert publish.current_snapshot(publish.published_store(), "ops_transit_ridership", DAY) is not None


def test_a_range_whose_gov_build_fails_builds_its_days_one_by_one_and_confines_the_failure(tmp_path, monkeypatch):
    """Issue 15, the range path's fallback: the ONE gov build over a range fails (the water staging model, as in the
    test above), so the step builds each day on its own, and each day confines the failure to water exactly as a
    single-day run does; every other agency's data crosses and the transit product is published on both days."""
    from orchestration.nightly import run_nightly_range
    from zqdata import publish

    data_dir, gov_db = _water_model_broken(tmp_path, monkeypatch)
    days = [DAY, DAY + dt.timedelta(days=1)]
    with dg.instance_for_test() as instance:
        result, summaries = run_nightly_range(days[0], days[-1], instance=instance)
        assert result.success, [s.checks_failed for s in summaries]
    assert [set(s.held_back) for s in summaries] == [{"water_usage"}] * 2
    assert [s.published for s in summaries] == [["ops_transit_ridership"]] * 2
    day_builds = sorted(d.name for d in (repo_root() / "dbt_project" / "target").glob(
        f"gov_dbt_models-{result.run_id[:8]}-*") if d.is_dir() and ".." not in d.name)
    assert len(day_builds) == 2, day_builds  # after the range's build failed, one build per day
    with duckdb.connect(str(gov_db), read_only=True) as con:
        failures = con.execute("select partition_date, model from quality.model_failures order by 1, 2").fetchall()
    assert failures == [(d, m) for d in days for m in ("int_water_usage", "stg_water__water_usage")]
    for d in days:
        assert _ops_rows(data_dir, "desensitized.electricity_usage", d) > 0
        assert _ops_rows(data_dir, "desensitized.water_usage", d) == 0
        assert publish.current_snapshot(publish.published_store(), "ops_transit_ridership", d) is not None


def format_summary_text(summary) -> str:
    from orchestration.nightly import format_summary

    return format_summary(summary)


def test_definitions_validate_with_the_dagster_cli():
    """`dagster definitions validate -w workspace.yaml` passes, as the README promises."""
    exe = Path(sys.executable).parent / "dagster"
    proc = subprocess.run([str(exe), "definitions", "validate", "-w", "workspace.yaml"], cwd=repo_root(),
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "ZQ_PSEUDONYM_KEY": "validate-only-key-not-a-secret-0123456789"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_asset_graph_shows_the_three_platforms_as_groups_with_dbt_models():
    from orchestration.definitions import defs

    graph = defs().resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert {"source_systems", "gov_platform", "governance", "ops_platform"} <= groups.keys()
    assert any(k.startswith("gov/staging/stg_") for k in groups["gov_platform"])
    assert any(k.startswith("ops/products/") for k in groups["ops_platform"])
    assert all(k.startswith("landing/") for k in groups["source_systems"])


def test_each_agency_gets_one_message_per_issue_in_the_outbox_and_none_again_after_a_rerun(nightly_run, monkeypatch):
    """`make nightly` shows the whole loop: the run files the issues of the injected defects, each with its agency, and
    (no SMTP server configured) writes one message per issue to the local Maildir outbox; a rerun sends nothing new."""
    import email
    import email.policy
    import mailbox

    from zqdata import issues, opdb
    from zqdata.registry import registry

    data_dir, instance, _, summary = nightly_run
    _env(monkeypatch, data_dir)
    open_issues = issues.list_issues(opdb.get_engine(), partition_date=DAY)
    assert open_issues, "injected defects should open quality issues"
    assert {i.agency for i in open_issues} <= set(registry().agencies)
    by_agency: dict[str, int] = {}
    for issue in open_issues:
        by_agency[issue.agency] = by_agency.get(issue.agency, 0) + 1
    email_to = {a.contact.email: code for code, a in registry().agencies.items()}
    box = mailbox.Maildir(data_dir / "outbox" / "maildir", create=False,
                          factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default))

    def mails() -> dict[str, int]:
        out: dict[str, int] = {}
        for m in box:
            if m["X-ZQ-Status-Event"] == "opened" and "2025-06-01" in m["Subject"]:
                out[email_to[m["To"]]] = out.get(email_to[m["To"]], 0) + 1
        return out

    assert mails() == by_agency
    text = format_summary_text(summary)
    for agency in by_agency:  # the summary names each agency with failed rules, by Art. 20 dimension
        assert f"({agency})" in text
    assert "质量门禁 quality gate: 通过" in text
    before = len(box)

    result, summary = _run(DAY, instance)  # the same partition again: same failures, same issues
    assert result.success, summary.checks_failed
    assert len(box) == before


def _redeliver_with(store, agency: str, dataset: str, day: dt.date, old: bytes, new: bytes) -> None:
    """Redeliver a dataset's files with `old` replaced by `new` (a new manifest with the new checksums)."""
    from zqdata import landing

    manifest = landing.read_manifest(store, agency, dataset, day)
    prefix = landing.delivery_prefix(agency, dataset, day)
    files = [(f.name, store.get_bytes(prefix + f.name).replace(old, new), f.format, f.encoding, f.record_count)
             for f in manifest.files]
    landing.write_delivery(store, agency, dataset, day, files, manifest.extracted_at, manifest.delivered_at)


def test_defect_surfacing_on_an_ops_product_traces_back_to_the_agency_file_and_row(tmp_path, monkeypatch):
    """Issue 4: a credit code failing GB 32100 is only a warning on the big-data platform (early pilot codes are legal),
    so it reaches the SME credit profile, whose own check fails; that check's trace names the agency (市市场监督管理局),
    its delivery file and the row number."""
    from zqdata.registry import registry
    from zqdata.simulator import simulate_day
    from zqdata.standards import USCC_ALPHABET, is_valid_uscc
    from zqdata.storage import LocalObjectStore

    data_dir = tmp_path / "data"
    _env(monkeypatch, data_dir, simulate=False)
    store = LocalObjectStore(data_dir / "landing")
    simulate_day(store, registry(), DAY, ROWS_PER_DAY, seed=7, defect_rate=0.0)
    consent = store.get_bytes(f"data_bureau/subject_consent/{DAY}/part-0001.csv").decode("utf-8")
    registry_file = f"samr/enterprise_registry/{DAY}/part-0001.csv"
    lines = store.get_bytes(registry_file).decode("utf-8").splitlines()
    # an enterprise that authorized the credit-profile scenario and never revoked it: its profile row will be built
    consent_lines = consent.splitlines()

    def granted(c: str) -> bool:
        mine = [line for line in consent_lines if c in line and "sme_credit_profile" in line]
        return bool(mine) and all("granted" in line for line in mine)

    row, code = next((i, line.split(",")[0].strip('"')) for i, line in enumerate(lines[1:], start=1)
                     if granted(line.split(",")[0].strip('"')))
    assert is_valid_uscc(code)
    wrong = code[:17] + next(c for c in USCC_ALPHABET if c != code[17])  # the same code with another check character
    for agency, dataset in (("samr", "enterprise_registry"), ("data_bureau", "subject_consent"),
                            ("hrss", "social_insurance"), ("power", "electricity_usage"), ("water", "water_usage")):
        _redeliver_with(store, agency, dataset, DAY, code.encode(), wrong.encode())

    with dg.instance_for_test() as instance:
        result, summary = _run(DAY, instance)
        product_checks = [e for e in result.get_asset_check_evaluations()
                          if e.asset_key.to_user_string() == "ops/products/ops_sme_credit_profile"
                          and "zq_product_rule" in e.check_name]
        assert product_checks and not product_checks[0].passed, summary.checks_failed
        trace = "\n".join(str(v.value) for k, v in product_checks[0].metadata.items() if "trace" in k)
        assert registry().agencies["samr"].name in trace
        assert registry_file in trace
        assert f"行 {row}" in trace or f"第 {row} 行" in trace or f"row {row}" in trace.lower(), trace[:3000]


def test_a_product_gate_that_errors_publishes_nothing_new_and_keeps_the_previous_version(nightly_run, monkeypatch):
    """A blocking gate that errors (not just fails) must not let the rebuilt partition through: nothing new of that
    product is published, the run fails, and consumers keep the previous published version, which passed its gates
    (write–audit–publish). The other product, whose gates passed, is published (one product's gate is its own)."""
    import assets.ops_platform.boundary as boundary_assets
    from zqdata import publish

    data_dir, instance, _, _ = nightly_run
    _env(monkeypatch, data_dir)
    store = publish.published_store()
    first = publish.current_snapshot(store, "ops_sme_credit_profile", DAY)
    assert first is not None and first.gate_results["no_personal_data_leak"] is True

    real = boundary_assets.find_leaks

    def broken_gate(*args, tables=None, **kwargs):
        if tables == ["products.ops_sme_credit_profile"]:  # this product's leak gate (the crossing passes no tables)
            raise RuntimeError("泄露闸门内部错误 (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(boundary_assets, "find_leaks", broken_gate)
    result, summary = _run(DAY, instance)
    assert not result.success
    failed = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE}
    assert any("ops_sme_credit_profile" in k and "no_personal_data_leak" in k for k in failed), failed
    succeeded = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_SUCCESS}
    assert "publish_ops_sme_credit_profile" not in succeeded
    assert publish.current_snapshot(store, "ops_sme_credit_profile", DAY) == first  # untouched
    assert summary.published == ["ops_transit_ridership"]


# ---------------------------------------------------------------- history: an earlier day redelivered (issue 17)

DAY2 = DAY + dt.timedelta(days=1)
MARK = "12345.67"  # the redelivered contribution of every day-1 social-insurance row


def _profile_contributions(ops_db, day) -> list[str]:
    with duckdb.connect(str(ops_db), read_only=True) as con:
        return [f"{v:.2f}" if v is not None else None for (v,) in con.execute(
            "select contribution_yuan from products.ops_sme_credit_profile where _partition_date = ?", [day]).fetchall()]


def _redeliver_social_insurance(store, day) -> None:
    """hrss redelivers day 1 with every contribution changed (a new file and manifest, the file's own encoding)."""
    import csv
    import io

    from zqdata import landing

    manifest = landing.read_manifest(store, "hrss", "social_insurance", day)
    prefix = landing.delivery_prefix("hrss", "social_insurance", day)
    files = []
    for f in manifest.files:
        rows = list(csv.DictReader(io.StringIO(store.get_bytes(prefix + f.name).decode(f.encoding))))
        for r in rows:
            r["contribution_yuan"] = MARK
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files.append((f.name, out.getvalue().encode(f.encoding), f.format, f.encoding, len(rows)))
    landing.write_delivery(store, "hrss", "social_insurance", day, files, manifest.extracted_at, manifest.delivered_at)


def test_a_redelivered_earlier_day_recomputes_the_later_days_that_read_it(nightly_run, monkeypatch):
    """Issue 17 (history): day 2's credit profile takes each enterprise's latest social-insurance period up to day 2 —
    for some enterprises, day 1's. hrss redelivers day 1 with other contributions; `zq nightly --date <day 1>` reruns
    day 1 and then day 2, which read it. (Near the end of the module: it changes day 1's landing files.)"""
    from orchestration.history import stale_partitions
    from zqdata.commands.nightly import recompute_stale_days
    from zqdata.storage import LocalObjectStore

    data_dir, instance, _, _ = nightly_run
    _env(monkeypatch, data_dir)
    ops_db = data_dir / "warehouse" / "ops_platform.duckdb"
    # day 2, after everything the earlier tests of the module did to day 1: nothing is stale
    result, summary = _run(DAY2, instance)
    assert result.success, summary.checks_failed
    assert stale_partitions(instance) == []
    before = _profile_contributions(ops_db, DAY2)
    assert before and MARK not in before

    _env(monkeypatch, data_dir, simulate=False)  # from now on only real (re)deliveries
    _redeliver_social_insurance(LocalObjectStore(data_dir / "landing"), DAY)
    result, summary = _run(DAY, instance)
    assert result.success, summary.checks_failed
    assert MARK in _profile_contributions(ops_db, DAY)
    stale = [s.partition for s in stale_partitions(instance)]
    assert stale == [DAY2.isoformat()]
    assert _profile_contributions(ops_db, DAY2) == before  # stale: nothing recomputed it yet

    assert recompute_stale_days(instance)
    assert stale_partitions(instance) == []
    after = _profile_contributions(ops_db, DAY2)
    assert MARK in after, "day 2's profiles of enterprises whose latest period is day 1's now show the redelivery"


# ---------------------------------------------------------------- kill -9 at three points (issue 17)

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 900  # generous bound on each condition
KEY = "e2e-test-key-not-a-secret-0123456789"  # the module's key (_env): the pristine night is the reference


def _zq_env(data_dir: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZQ_")}
    env.update({"DAGSTER_HOME": str(home), "ZQ_DATA_DIR": str(data_dir), "ZQ_STORE_BACKEND": "local",
                "ZQ_PSEUDONYM_KEY": KEY, "ZQ_SIMULATE": "1", "ZQ_SIM_ROWS_PER_DAY": str(ROWS_PER_DAY),
                "ZQ_SIM_DEFECT_RATE": "0.01", "ZQ_SIM_SEED": "7", "PYTHONPATH": str(REPO)})
    return env


def _zq_nightly(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zqdata.cli", "nightly", "--date", DAY.isoformat()], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _started_steps(instance: dg.DagsterInstance) -> list[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="nightly_aggregation"), limit=1)
    if not runs:
        return []
    return [e.dagster_event.step_key for e in instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START)]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _dbt_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if "dbt" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")] if out else []


@contextlib.contextmanager
def _instance(home: Path):
    """The instance of `home` as its processes open it: with DAGSTER_HOME set (the embedded event log's files are
    `$DAGSTER_HOME/history/runs`, orchestration/event_log.py)."""
    with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(home)}), dg.DagsterInstance.get() as instance:
        yield instance


def _kill_when(proc: subprocess.Popen, home: Path, step_prefix: str, wal: Path | None) -> list[int]:
    """SIGKILL `proc` once a step starting with `step_prefix` has begun writing; returns dbt children seen."""
    deadline = time.monotonic() + WAIT_S
    with _instance(home) as instance:
        while not any(s.startswith(step_prefix) for s in _started_steps(instance)):
            assert proc.poll() is None, f"zq nightly ended before {step_prefix} started"
            assert time.monotonic() < deadline, f"{step_prefix} never started"
            time.sleep(0.05)
    children: list[int] = []
    seen = _mtime(wal) if wal else 0.0
    while time.monotonic() < deadline and proc.poll() is None:
        if step_prefix == "gov_dbt_models":
            children = _dbt_children(proc.pid)
            if children:
                time.sleep(1.0)  # let dbt start writing models
                break
        elif _mtime(wal) != seen:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"zq nightly ended before it could be killed in {step_prefix}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_at_ingestion_dbt_and_boundary_then_rerun_equals_an_undisturbed_run(nightly_run, tmp_path):
    """Issue 17 (fault suite): kill -9 of `zq nightly` once ingestion, dbt and the boundary have started writing; the
    next start marks each killed run failed and frees its pool slot, the dbt child dies with its parent, and the last
    rerun's tables equal, row for row, those of the module's undisturbed night."""
    expected = dict(PRISTINE)
    assert expected

    data, home = tmp_path / "faulted", tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    env = _zq_env(data, home)
    gov_wal = data / "warehouse" / "gov_platform.duckdb.wal"
    ops_wal = data / "warehouse" / "ops_platform.duckdb.wal"
    faults = 0
    for step, wal in (("gov__ods__", gov_wal), ("gov_dbt_models", None), ("boundary_crossing", ops_wal)):
        children = _kill_when(_zq_nightly(env), home, step, wal)
        faults += 1
        deadline = time.monotonic() + WAIT_S
        while any(_alive(c) for c in children):  # the dbt child dies with the killed step process
            assert time.monotonic() < deadline, "dbt outlived the killed run"
            time.sleep(0.1)
    rerun = _zq_nightly(env)
    assert rerun.wait(timeout=3 * WAIT_S) == 0
    with _instance(home) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="nightly_aggregation"))
        statuses = sorted(r.status.value for r in runs)
        assert statuses == ["FAILURE"] * faults + ["SUCCESS"], statuses  # no run left STARTED
        assert not instance.event_log_storage.get_concurrency_run_ids()  # every pool slot was given back
    got = {**_snapshot(data / "warehouse" / "gov_platform.duckdb"), **_snapshot(data / "warehouse" / "ops_platform.duckdb")}
    assert got.keys() == expected.keys()
    assert [t for t in expected if got[t] != expected[t]] == []
