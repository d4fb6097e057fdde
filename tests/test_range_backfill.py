"""Range backfills (issue 15): five days run as ONE range run give the tables and published snapshots of five
single-day runs, and each day's checks are recorded against its own partition.

Two data folders, the same simulated deliveries (seed, small volume): one `run_nightly_range` over the five days, five
`run_nightly` in order. Every table of both DuckDB files is compared by an order-independent checksum
(zqdata.lakes.table_checksum) without the columns that record when or in which run something happened; the published
snapshots are compared by the checksum of their rows.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import dagster as dg
import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]
START = dt.date(2025, 6, 1)
DAYS = 5
ROWS_PER_DAY = 300
# Columns that record when, or in which run, something happened, not what the data is.
RUN_COLUMNS = {"_ingested_at", "ingested_at", "quarantined_at", "decided_at", "validated_at", "recorded_at", "run_id"}

pytestmark = pytest.mark.slow


def _env(mp: pytest.MonkeyPatch, data_dir: Path) -> None:
    mp.setenv("ZQ_DATA_DIR", str(data_dir))
    mp.setenv("ZQ_STORE_BACKEND", "local")
    for var in ("ZQ_LANDING_DIR", "ZQ_GOV_DB", "ZQ_OPS_DB", "ZQ_PUBLISH_BACKEND", "ZQ_OPDB_URL"):
        mp.delenv(var, raising=False)
    mp.setenv("ZQ_PSEUDONYM_KEY", "range-test-key-not-a-secret-0123456789")
    mp.setenv("ZQ_SIMULATE", "1")
    mp.setenv("ZQ_SIM_ROWS_PER_DAY", str(ROWS_PER_DAY))
    mp.setenv("ZQ_SIM_DEFECT_RATE", "0.01")
    mp.setenv("ZQ_SIM_SEED", "7")


def _days() -> list[dt.date]:
    return [START + dt.timedelta(days=i) for i in range(DAYS)]


def table_checksums(db: Path) -> dict[str, tuple[int, int, int]]:
    """{schema.table: checksum} of every table in the file, run-time columns left out.

    Not dbt's stored test failures (dq_audit): they are the failing rows of the LAST build, which is the last day in
    day-by-day runs and the whole range in a range run (the range's gov models are built once); what a day's failures
    become is compared in quality.findings, and the check results per day in `test_each_days_checks_...`."""
    from zqdata.lakes import table_checksum

    out = {}
    with duckdb.connect(str(db), read_only=True) as con:
        tables = con.execute("select table_schema, table_name from information_schema.tables "
                             "where table_type = 'BASE TABLE' and table_schema not like 'dq_audit%' "
                             "order by 1, 2").fetchall()
        for schema, table in tables:
            cols = [c for (c,) in con.execute(
                "select column_name from information_schema.columns where table_schema = ? and table_name = ? "
                "order by ordinal_position", [schema, table]).fetchall() if c not in RUN_COLUMNS]
            con.execute(f'create or replace temp view _zq_cmp as select {", ".join(chr(34) + c + chr(34) for c in cols)} '
                        f'from "{schema}"."{table}"')
            out[f"{schema}.{table}"] = table_checksum(con, "_zq_cmp")
    return out


def published_checksums() -> dict[str, tuple[int, int, int]]:
    """{product/day: checksum of the served snapshot's rows} in the current data folder."""
    from zqdata.lakes import table_checksum
    from zqdata.publish import current_snapshot, published_days, published_store, read_snapshot
    from zqdata.registry import registry

    store, out = published_store(), {}
    for product in sorted({s.product for s in registry().scenarios.values()}):
        for day in published_days(store, product):
            snap = current_snapshot(store, product, day)
            with duckdb.connect() as con:
                import pyarrow.parquet as pq

                con.register("_zq_snap", pq.read_table(io.BytesIO(read_snapshot(store, snap))))
                out[f"{product}/{day}"] = table_checksum(con, "_zq_snap")
    return out


def _run(data_dir: Path, as_range: bool) -> dict:
    from orchestration.nightly import run_nightly, run_nightly_range

    mp = pytest.MonkeyPatch()
    _env(mp, data_dir)
    try:
        with dg.instance_for_test() as instance:
            if as_range:
                result, summaries = run_nightly_range(_days()[0], _days()[-1], instance=instance)
                runs = [result]
            else:
                pairs = [run_nightly(day, instance=instance) for day in _days()]
                runs, summaries = [r for r, _ in pairs], [s for _, s in pairs]
            evaluations = [(e.asset_key.to_user_string(), e.check_name, e.partition, e.passed)
                           for r in runs for e in r.get_asset_check_evaluations()]
            materialized = [(m.asset_key.to_user_string(), m.partition) for r in runs
                            for m in r.get_asset_materialization_events()]
            from orchestration.history import stale_partitions

            return {
                "stale": stale_partitions(instance),
                "success": [r.success for r in runs],
                "run_ids": [r.run_id for r in runs],
                "summaries": summaries,
                "gov_builds": sorted(d.name for r in runs for d in (REPO / "dbt_project" / "target").glob(
                    f"gov_dbt_models-{r.run_id[:8]}-*") if d.is_dir()),
                "ops_builds": sorted(d.name for r in runs for d in (REPO / "dbt_project" / "target").glob(
                    f"ops_dbt_products-{r.run_id[:8]}-*") if d.is_dir()),
                "evaluations": evaluations,
                "materialized": materialized,
                "gov": table_checksums(data_dir / "warehouse" / "gov_platform.duckdb"),
                "dq_audit": _stored_failures(data_dir / "warehouse" / "gov_platform.duckdb"),
                "ops": table_checksums(data_dir / "warehouse" / "ops_platform.duckdb"),
                "published": published_checksums(),
                # the GX Data Docs pages published (a range renders its days' pages once, at the end of the step)
                "data_docs": sorted(p.relative_to(data_dir).as_posix() for p in
                                    (data_dir / "published" / "gx" / "site").glob("validations/*/*/*/*.html")),
            }
    finally:
        mp.undo()


def _stored_failures(db: Path) -> dict[str, int]:
    """{dq_audit table: rows} of the gov file: dbt's stored failures of the last build of each test."""
    with duckdb.connect(str(db), read_only=True) as con:
        return {t: con.execute(f'select count(*) from dq_audit."{t}"').fetchone()[0] for (t,) in con.execute(
            "select table_name from duckdb_tables() where schema_name = 'dq_audit'").fetchall()}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    ranged = _run(tmp_path_factory.mktemp("range") / "data", as_range=True)
    single = _run(tmp_path_factory.mktemp("single") / "data", as_range=False)
    return ranged, single


def test_range_is_one_successful_run(both):
    ranged, single = both
    assert ranged["success"] == [True] and len(ranged["run_ids"]) == 1
    assert single["success"] == [True] * DAYS


def test_the_range_builds_its_gov_models_once(both):
    """One gov `dbt build` over the five days (its run folder is named by the range), not one per day: the results
    compared below come from that build split by day, not from a fallback to day-by-day builds."""
    ranged, single = both
    first, last = _days()[0].isoformat(), _days()[-1].isoformat()
    assert len(ranged["gov_builds"]) == 1 and f"-{first}..{last}-" in ranged["gov_builds"][0]
    assert len(single["gov_builds"]) == DAYS


def test_the_range_builds_its_products_once_per_stretch_of_equal_authorizations(both):
    """The five days share their authorizations and hold nothing back: one ops build (and its preflight) over the
    range, not one per day."""
    ranged, single = both
    first, last = _days()[0].isoformat(), _days()[-1].isoformat()
    assert len(ranged["ops_builds"]) == 1 and f"-{first}..{last}-" in ranged["ops_builds"][0]
    assert len(single["ops_builds"]) == DAYS


def test_no_day_of_the_range_is_stale_afterwards(both):
    """The history planner (orchestration.history) finds no day that read an earlier day materialized after it."""
    ranged, _ = both
    assert ranged["stale"] == []


@pytest.mark.parametrize("db", ["gov", "ops"])
def test_every_table_identical_to_day_by_day(both, db):
    ranged, single = both
    assert set(ranged[db]) == set(single[db])
    differing = {t: (ranged[db][t], single[db][t]) for t in ranged[db] if ranged[db][t] != single[db][t]}
    assert not differing, f"{db} tables differ between the range run and the single-day runs: {differing}"


def test_published_snapshots_identical_to_day_by_day(both):
    ranged, single = both
    assert ranged["published"], "nothing was published"
    assert ranged["published"] == single["published"]


def test_data_docs_publish_a_page_for_every_dataset_and_day(both):
    from zqdata.quality.gx_runner import run_name
    from zqdata.registry import registry

    ranged, single = both
    assert ranged["data_docs"] == single["data_docs"]
    for day in _days():
        for dataset in registry().datasets:
            assert [p for p in ranged["data_docs"] if f"/{run_name(dataset, day)}/" in p], (dataset, day)


def test_each_days_checks_recorded_against_its_partition(both):
    ranged, single = both
    days = {d.isoformat() for d in _days()}
    assert {p for *_, p, _ in ranged["evaluations"]} == days  # no evaluation without a partition
    # the same checks with the same outcomes, day by day
    assert sorted(ranged["evaluations"]) == sorted(single["evaluations"])


def test_the_range_keeps_the_stored_failures_of_every_test_that_failed_on_any_of_its_days(both):
    """The range's ONE gov build keeps dq_audit.<test> for each test that found failing rows on some day, though it
    passed on others (a day's split result must not drop it: bench/notes.md 18), and no table of a test that found
    none on any day; the single-day runs keep those of their last day's build."""
    from assets.gov_platform.dbt_models import _manifest

    tests = {n["name"]: n.get("alias") or n["name"] for n in _manifest()["nodes"].values()
             if n["resource_type"] == "test" and str(n.get("attached_node", "")).startswith(
                 ("model.zhaoqing.stg_", "model.zhaoqing.int_"))}
    last = _days()[-1].isoformat()
    for run, days in ((both[0], None), (both[1], last)):
        failed = {tests[c] for _, c, p, ok in run["evaluations"] if c in tests and not ok and days in (None, p)}
        assert failed and set(run["dq_audit"]) == failed and all(run["dq_audit"].values()), run["dq_audit"]
    assert failed_on_some_and_passed_on_others(both[0], tests), "the five days exercise no such test"


def failed_on_some_and_passed_on_others(run: dict, tests: dict[str, str]) -> set[str]:
    outcomes: dict[str, set[bool]] = {}
    for _, c, _, ok in run["evaluations"]:
        if c in tests:
            outcomes.setdefault(tests[c], set()).add(ok)
    return {t for t, seen in outcomes.items() if seen == {True, False}}


def test_each_day_materialized_once_per_asset(both):
    ranged, single = both
    assert sorted(ranged["materialized"]) == sorted(single["materialized"])


def test_range_summaries_match_day_by_day(both):
    ranged, single = both
    for r, s in zip(ranged["summaries"], single["summaries"], strict=True):
        assert (r.partition, r.checks_passed, sorted(r.checks_failed), r.gate_passed, r.published) == (
            s.partition, s.checks_passed, sorted(s.checks_failed), s.gate_passed, s.published)


def test_a_backfills_range_holds_a_nights_design_volume():
    from orchestration.ranges import RANGE_ROWS, range_days_for

    assert range_days_for(20_000, 365) == 365  # a year of small days: one run, its fixed cost paid once
    assert range_days_for(1_000_000, 365) == RANGE_ROWS // 1_000_000 == 10  # as heavy as one 10 M night
    assert range_days_for(20_000_000, 365) == 1
    assert range_days_for(1_000, 5) == 5


def test_a_failed_range_is_run_again_in_halves_down_to_its_bad_day():
    """One bad day in a stretch: the halves without it succeed as ranges, the bad day ends alone in a single-day run,
    every day gets exactly one summary, in order."""
    from orchestration.ranges import run_halving

    first, bad = dt.date(2025, 6, 1), dt.date(2025, 6, 11)
    ranges: list[tuple[dt.date, dt.date]] = []
    singles: list[dt.date] = []

    def run_range(a: dt.date, b: dt.date) -> list[tuple[dt.date, bool]]:
        ranges.append((a, b))
        # a failed step stops the days after it: from the bad day on nothing succeeds
        days = [a + dt.timedelta(days=i) for i in range((b - a).days + 1)]
        return [(d, not a <= bad <= d) for d in days]

    def run_day(d: dt.date) -> tuple[dt.date, bool]:
        singles.append(d)
        return (d, d != bad)

    out = run_halving(first, first + dt.timedelta(days=29), run_range, run_day, lambda s: s[1], on_split=lambda _m: None)
    assert [d for d, _ in out] == [first + dt.timedelta(days=i) for i in range(30)]
    assert [d for d, ok in out if not ok] == [bad]
    assert bad in singles and len(singles) <= 2  # the bad day runs alone (with at most its last neighbour)
    assert len(ranges) <= 2 * 5 + 1  # ranges halve: a handful of runs, not one per day
    ok_ranges = [(a, b) for a, b in ranges if not a <= bad <= b]
    # every other day ran in a range that succeeded, or alone
    assert sum((b - a).days + 1 for a, b in ok_ranges) + len(singles) - 1 == 29
