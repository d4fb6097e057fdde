"""The benchmark harness on a tiny day: the baseline does the same work as the pipeline (same quarantine, findings,
released rows and products), every job step maps to a stage, and the report renders. No timing is asserted."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from zqdata.settings import repo_root

if str(repo_root()) not in sys.path:  # `bench` is run from the repo root (`python -m bench.run`), not installed
    sys.path.insert(0, str(repo_root()))

from bench import baseline, stages  # noqa: E402
from bench.memory import RssSampler  # noqa: E402
from bench.run import render_markdown  # noqa: E402

pytestmark = pytest.mark.slow  # runs the nightly job and dbt once (about a minute)

DAY = dt.date(2025, 6, 1)
ROWS = 2500
KEY = "bench-test-key-not-a-secret-0123456789"


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Simulate one defective day, run the nightly job on it, then the baseline on the same files."""
    from orchestration.nightly import run_nightly
    from zqdata.desensitize import PseudonymKey
    from zqdata.registry import registry
    from zqdata.simulator import simulate_day
    from zqdata.storage import LocalObjectStore

    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZQ_DATA_DIR", str(root / "data"))
    mp.setenv("ZQ_STORE_BACKEND", "local")
    for var in ("ZQ_LANDING_DIR", "ZQ_GOV_DB", "ZQ_OPS_DB"):
        mp.delenv(var, raising=False)
    mp.setenv("ZQ_PSEUDONYM_KEY", KEY)
    mp.setenv("ZQ_SIMULATE", "0")
    try:
        reg = registry()
        landing = root / "data" / "landing"
        simulate_day(LocalObjectStore(landing), reg, DAY, ROWS, 11, 0.03)
        instance = dg.DagsterInstance.ephemeral()
        result, summary = run_nightly(DAY, instance)
        windows, run_start, run_end = stages.step_windows(instance, result.run_id)
        compiled = baseline.compile_dbt(root / "baseline", reg, DAY)
        sampler = RssSampler(interval=0.05)
        sampler.start()
        try:
            base = baseline.run_baseline(landing, root / "baseline" / "db", reg, DAY, compiled,
                                         PseudonymKey.from_secret(KEY), sampler)
        finally:
            sampler.stop()
        yield {"root": root, "summary": summary, "windows": windows, "run": (run_start, run_end), "base": base,
               "gov": root / "data" / "warehouse" / "gov_platform.duckdb",
               "ops": root / "data" / "warehouse" / "ops_platform.duckdb",
               "bgov": root / "baseline" / "db" / "gov_platform.duckdb",
               "bops": root / "baseline" / "db" / "ops_platform.duckdb", "sampler": sampler}
    finally:
        mp.undo()


def _rows(db: Path, sql: str) -> set[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return set(con.execute(sql).fetchall())


def test_pipeline_run_succeeds_and_every_step_maps_to_a_stage(both_runs):
    assert both_runs["summary"].success, both_runs["summary"].checks_failed
    windows = both_runs["windows"]
    assert windows, "no step events read from the event log"
    assert {w.stage for w in windows} >= {"landing", "ingest", "dbt", "checks", "boundary", "products"}
    assert [w.step for w in windows if w.stage == "other"] == []
    start, end = both_runs["run"]
    assert all(start <= w.start <= w.end <= end for w in windows)


def test_baseline_quarantines_the_same_records(both_runs):
    sql = "select _lineage_id, rule from quarantine.rows"
    pipeline = _rows(both_runs["gov"], sql)
    assert pipeline, "the defective day should quarantine something"
    assert _rows(both_runs["bgov"], sql) == pipeline


def test_baseline_finds_the_same_row_level_findings(both_runs):
    sql = ("select tool, rule, lineage_id, field from quality.findings "
           f"where partition_date = date '{DAY}' and tool in ('pandera', 'dbt')")
    pipeline = _rows(both_runs["gov"], sql)
    assert {t for t, *_ in pipeline} == {"pandera", "dbt"}
    assert _rows(both_runs["bgov"], sql) == pipeline


def test_baseline_releases_and_builds_the_same_rows(both_runs):
    sql = ("select table_schema, table_name, 0 from information_schema.tables "
           "where table_schema = 'desensitized' or table_schema = 'products' or table_schema like 'scenario_%'")

    def counts(db: Path) -> dict[str, int]:
        with duckdb.connect(str(db), read_only=True) as con:
            names = [f'"{s}"."{t}"' for s, t, _ in con.execute(sql).fetchall()]
            return {n: con.execute(f"select count(*) from {n}").fetchone()[0] for n in names}

    pipeline = counts(both_runs["ops"])
    assert any(n.startswith('"products"') for n in pipeline) and any(n.startswith('"desensitized"') for n in pipeline)
    assert counts(both_runs["bops"]) == pipeline
    assert both_runs["base"].products == {n.split(".")[1].strip('"'): c for n, c in pipeline.items()
                                          if n.startswith('"products"')}
    # the pseudonyms agree too: the baseline applies the same mask rules with the same key
    sql_ids = 'select card_id from desensitized.bus_card_swipes'
    assert _rows(both_runs["bops"], sql_ids) == _rows(both_runs["ops"], sql_ids)


@pytest.mark.parametrize("dataset,scope", [("bus_card_swipes", "desensitized"),
                                           ("enterprise_registry", "scenario_sme_credit_profile")])
def test_the_crossing_probe_writes_what_the_crossing_wrote(both_runs, tmp_path, monkeypatch, dataset, scope):
    """`python -m bench.crossing` measures the crossing's own query: each variant that writes (streamed, hashed per
    value, one instance) writes the rows the nightly job wrote to that ops table, pseudonyms and consent filter included
    (the enterprise table of a scenario needing consent)."""
    from bench import crossing

    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", KEY)
    with duckdb.connect(str(both_runs["ops"]), read_only=True) as con:
        rows, checksum = con.execute(f'select count(*), sum(hash(t)::HUGEINT) from "{scope}"."{dataset}" as t').fetchone()
    assert rows > 0
    for variant in ("streamed", "streamed_per_value", "one_instance"):
        got = crossing.run_variant(both_runs["root"] / "data", tmp_path, variant, dataset, scope, DAY)
        assert (got["rows"], got["checksum"]) == (rows, str(checksum)), variant


def test_baseline_reports_every_stage_and_the_report_renders(both_runs):
    base = both_runs["base"]
    assert set(base.stages) == set(baseline.STAGE_NAMES)
    assert base.counts["delivered"] == ROWS
    assert base.counts["leaks"] == 0
    assert both_runs["sampler"].samples, "the memory sampler recorded nothing"
    results = {"machine": {"cores": 2}, "sizes": [{
        "rows_per_day": ROWS, "ratio_total": 1.0, "ratio_by_stage": {},
        "pipeline": {"days": [{"job_seconds": 1.0, "success": True, "peak_rss_mb": 1.0,
                               "stages": stages.summarize_stages(both_runs["windows"], both_runs["sampler"], ROWS)}]},
        "baseline": {"total_seconds": base.total_seconds, "stages": base.stages, "peak_rss_mb": 1.0}}]}
    md = render_markdown(results)
    assert f"{ROWS:,} rows/day" in md and "| ingest |" in md and "| products |" in md


def test_stage_mapping_of_known_step_names():
    assert stages.stage_of_step("gov__ods__water_usage") == "ingest"
    assert stages.stage_of_step("gov__staging__stg_water__water_usage_gx_dataset_expectations") == "checks"
    assert stages.stage_of_step("boundary_crossing") == "boundary"
    assert stages.stage_of_step("ops_dbt_products") == "products"
    assert stages.stage_of_step("something_new") == "other"


def test_a_shortened_year_of_backfill_is_reported_as_extrapolated_and_never_as_met():
    """The backfill target is for 365 days: a shorter measurement (BENCH_YEAR_DAYS) shows its extrapolation to a
    year and does not count as meeting the target, nor does the day after it."""
    from bench.run import _targets

    def rows(days: int, wall: float, ratio: float) -> dict[str, str]:
        year = {"days": days, "rows_per_day": 20_000, "wall_seconds": wall, "success": True,
                "after": {"rows_per_day": 1_000_000, "vs_day_1": ratio}}
        lines = [line for line in _targets({"year": year}) if line.startswith("| ")][1:]
        return {"backfill" if "backfill" in line else "after": line for line in lines}

    short = rows(10, 100.0, 1.05)
    assert "365 days extrapolated" in short["backfill"] and short["backfill"].endswith("| **no** |")
    assert short["after"].startswith("| day 11 (after 10 days)") and short["after"].endswith("| **no** |")
    year = rows(365, 800.0, 1.05)
    assert "extrapolated" not in year["backfill"] and year["backfill"].endswith("| yes |")
    assert year["after"].endswith("| yes |")
    assert rows(365, 901.0, 1.11)["backfill"].endswith("| **no** |") and rows(365, 901.0, 1.11)["after"].endswith(
        "| **no** |")


def test_a_size_is_measured_in_pairs_alternately_first_each_in_its_own_folder(tmp_path, monkeypatch):
    """`measure_size` runs pipeline/baseline pairs in ABBA order, each pair a first night in its own data folder with
    the same landing, and reports the ratio of the sums (one pair measured 1.19, the next 1.58, for the same code)."""
    import json

    from bench import run as bench_run

    seconds = {("pipeline", 1): 180.0, ("baseline", 1): 150.0, ("baseline", 2): 140.0, ("pipeline", 2): 220.0}
    calls: list[tuple[str, str, bool]] = []

    def fake_simulate(data_dir, day, days, rows, log):
        (data_dir / "landing").mkdir(parents=True)
        (data_dir / "landing" / "delivery.csv").write_text("x\n", encoding="utf-8")
        return 1.0

    def fake_run(cmd, env, log):
        what = "pipeline" if "bench.stages" in cmd else "baseline"
        data_dir = Path(env["ZQ_DATA_DIR"])
        calls.append((what, data_dir.name, (data_dir / "landing" / "delivery.csv").exists()))
        n = sum(1 for c in calls if c[0] == what)
        secs = seconds[(what, n)]
        out = Path(cmd[cmd.index("--out") + 1])
        if what == "pipeline":
            (data_dir / "warehouse").mkdir(exist_ok=True)
            day = {"job_seconds": secs, "success": True, "peak_rss_mb": 1000.0 * n,
                   "stages": {"ingest": {"seconds": secs / 2, "peak_rss_mb": 900.0}}}
            out.write_text(json.dumps({"days": [day]}), encoding="utf-8")
        else:
            out.write_text(json.dumps({"total_seconds": secs, "stages": {"ingest": {"seconds": secs / 4}},
                                       "peak_rss_mb": 1.0}), encoding="utf-8")
        return 0, secs

    monkeypatch.setattr(bench_run, "simulate", fake_simulate)
    monkeypatch.setattr(bench_run, "_run", fake_run)
    r = bench_run.measure_size(tmp_path, 1000, DAY, pairs=2)
    assert calls == [("pipeline", "size-1000", True), ("baseline", "size-1000", True),
                     ("baseline", "size-1000-pair2", True), ("pipeline", "size-1000-pair2", True)]
    assert not (tmp_path / "size-1000" / "landing").exists() and not (tmp_path / "size-1000" / "warehouse").exists()
    assert r["ratio_total"] == round((180 + 220) / (150 + 140), 2)
    assert r["ratio_by_stage"]["ingest"] == round((90 + 110) / (37.5 + 35), 2)
    assert [p["baseline_first"] for p in r["pairs"]] == [False, True]
    assert r["pipeline"]["days"][0]["job_seconds"] == 180.0  # the stage table is the first pair's
    md = render_markdown({"machine": {"cores": 2}, "sizes": [r]})
    assert "1.20" in md and "1.57" in md and f"= {round(400 / 290, 2):.2f}**" in md
    assert "2,000.0 MB" in md  # the peak memory target reads the highest pair
