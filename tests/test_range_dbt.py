"""One gov dbt build over a range of days (issue 15: ZQ_PARTITION_START/END) gives what a build per day gives: the same
staging and intermediate rows, the same quality findings, and each test's failing rows told apart by day — including
the rules whose answer depends on the day: a key duplicated within a day (not across days), a credit code the
enterprise registry knows only from a later day, an event on another day than its row's partition, a daily snapshot
holding the same key every day."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from tests.test_dbt import E1, E2, GOOD, REG, _dbt, _write_ods
from zqdata.lakes import table_checksum
from zqdata.quality.dbt_findings import collect_dbt_findings
from zqdata.reference import sync_reference_tables

DAYS = ["2025-05-01", "2025-05-02", "2025-05-03"]


def _on(day: str, code: str, **overrides: str) -> tuple[str, dict[str, str]]:
    """A good row of `code` delivered on `day` (its dates moved to the day), with overrides."""
    values = {f: v.replace("2025-05-01", day) for f, v in GOOD[code].items()}
    return code, {**values, **overrides}


def _deliveries() -> dict[str, list[tuple[str, dict[str, str]]]]:
    d1, d2, d3 = DAYS
    every_day = {day: [_on(day, "enterprise_registry"), _on(day, "resident_population"),
                       _on(day, "subject_consent"), _on(day, "electricity_usage"), _on(day, "water_usage")]
                 for day in DAYS}
    return {
        # E2 registered from day 2: day 1's contribution by E2 fails registry_reference, day 2's passes
        d1: every_day[d1] + [_on(d1, "social_insurance", credit_code=E2),
                             _on(d1, "bus_card_swipes", swipe_id="S0100"), _on(d1, "bus_card_swipes", swipe_id="S0100")],
        d2: every_day[d2] + [_on(d2, "enterprise_registry", credit_code=E2, district_code="441203"),
                             _on(d2, "social_insurance", credit_code=E2, record_id="SI0002"),
                             _on(d2, "bus_card_swipes", swipe_id="S0100")],  # S0100 again, on another day: no duplicate
        d3: every_day[d3] + [_on(d3, "enterprise_registry", credit_code=E2, district_code="441203"),
                             _on(d3, "social_insurance", credit_code=E1, record_id="SI0003"),
                             _on(d3, "bus_card_swipes", swipe_id="S0200", swipe_time=f"{d2}T23:50:00+08:00")],
    }


def _stored_failures(con: duckdb.DuckDBPyConnection, manifest: dict) -> dict[tuple[str, str], int]:
    """{(test, day): failing rows} from the stored failures of every gov test."""
    out: dict[tuple[str, str], int] = {}
    for node in manifest["nodes"].values():
        attached = str(node.get("attached_node"))
        if node["resource_type"] != "test" or not attached.startswith(("model.zhaoqing.stg_", "model.zhaoqing.int_")):
            continue
        table = f'"{node["schema"]}"."{node["alias"]}"'
        try:
            rows = con.execute(f"select cast(_partition_date as date), count(*) from {table} group by 1").fetchall()
        except duckdb.CatalogException:
            continue
        out.update({(node["name"], str(day)): n for day, n in rows})
    return out


def _content(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int, int]]:
    """Checksums of the staging and intermediate tables (without the ingestion time) and of quality.findings."""
    out = {}
    for schema, table in con.execute("select table_schema, table_name from information_schema.tables where "
                                     "table_schema in ('staging', 'intermediate', 'quality')").fetchall():
        cols = [c for (c,) in con.execute("select column_name from information_schema.columns where table_schema = ? "
                                          "and table_name = ?", [schema, table]).fetchall() if c != "_ingested_at"]
        out[f"{schema}.{table}"] = table_checksum(con, f'"{schema}"."{table}"', cols)
    return out


def _warehouse(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    db = tmp / "gov.duckdb"
    mp.setenv("ZQ_GOV_DB", str(db))
    mp.setenv("ZQ_OPS_DB", str(tmp / "ops.duckdb"))
    with duckdb.connect(str(db)) as con:
        for day, rows in _deliveries().items():
            _write_ods(con, day, rows)
        sync_reference_tables(con, REG)
    return db


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out: dict = {}
    mp = pytest.MonkeyPatch()
    try:
        tmp = tmp_path_factory.mktemp("by_day")
        db = _warehouse(tmp, mp)
        failures: dict[tuple[str, str], int] = {}
        for day in DAYS:  # the day-by-day builds: a night each, its stored failures read before the next build
            mp.setenv("ZQ_PARTITION_DATE", day)
            res = _dbt(["build", "--target", "gov", "--select", "path:models/gov"], tmp)
            assert res.success, res.exception
            manifest = json.loads((tmp / "target" / "manifest.json").read_text())
            with duckdb.connect(str(db)) as con:
                collect_dbt_findings(con, manifest, day)
                failures.update(_stored_failures(con, manifest))
        with duckdb.connect(str(db)) as con:
            out["by_day"] = {"content": _content(con), "failures": failures}
        mp.delenv("ZQ_PARTITION_DATE")

        tmp = tmp_path_factory.mktemp("range")
        db = _warehouse(tmp, mp)
        mp.setenv("ZQ_PARTITION_START", DAYS[0])
        mp.setenv("ZQ_PARTITION_END", DAYS[-1])
        res = _dbt(["build", "--target", "gov", "--select", "path:models/gov"], tmp)
        assert res.success, res.exception
        manifest = json.loads((tmp / "target" / "manifest.json").read_text())
        with duckdb.connect(str(db)) as con:
            for day in DAYS:
                collect_dbt_findings(con, manifest, day)
            out["range"] = {"content": _content(con), "failures": _stored_failures(con, manifest)}
        out["tmp"] = tmp
        yield out
    finally:
        mp.undo()


def test_range_build_gives_the_rows_and_findings_of_day_by_day_builds(built: dict) -> None:
    by_day, ranged = built["by_day"]["content"], built["range"]["content"]
    assert {t for t in by_day if t.startswith("intermediate.")} and set(ranged) == set(by_day)
    assert {t: ranged[t] for t in ranged if ranged[t] != by_day[t]} == {}
    assert ranged["quality.findings"][0] > 0


def test_each_tests_failures_are_told_apart_by_day(built: dict) -> None:
    assert built["range"]["failures"] == built["by_day"]["failures"]


@pytest.mark.parametrize(("test", "day"), [
    ("stg_hrss__social_insurance__registry_reference__credit_code", DAYS[0]),  # E2 not registered yet on day 1
    ("stg_transport__bus_card_swipes__duplicate_key__key", DAYS[0]),         # S0100 twice on day 1 only
    ("stg_transport__bus_card_swipes__event_in_day__swipe_time", DAYS[2]),   # a day-2 swipe delivered on day 3
])
def test_a_day_dependent_rule_fails_on_its_day_only(built: dict, test: str, day: str) -> None:
    failing_days = {d for (t, d), n in built["range"]["failures"].items() if t == test and n}
    assert failing_days == {day}


def test_relational_tests_judge_each_day_on_its_own(built: dict) -> None:
    """The registry and the population are daily snapshots (the same key every day) and S0100 recurs across days:
    no primary-key or relationship test of an intermediate model fails in the range build."""
    failing = {t for (t, _), n in built["range"]["failures"].items() if n and t.startswith(("unique_", "relationships_",
                                                                                            "zq_unique_combination_"))}
    assert failing == set()


def test_a_node_reading_one_day_is_refused_in_a_range_build(built: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A model or test still written for a single day (zq_partition_date) does not compile in a range build, instead
    of silently reading one day of the range."""
    monkeypatch.setenv("ZQ_PARTITION_START", DAYS[0])
    monkeypatch.setenv("ZQ_PARTITION_END", DAYS[-1])
    res = _dbt(["compile", "--target", "gov", "--inline", "select date '{{ zq_partition_date() }}' as d"], tmp_path)
    assert not res.success and "range build" in str(res.exception or res.result)
    monkeypatch.setenv("ZQ_PARTITION_END", DAYS[0])  # a range of one day is that day
    res = _dbt(["compile", "--target", "gov", "--inline", "select date '{{ zq_partition_date() }}' as d"], tmp_path)
    assert res.success, res.exception


# ---------------------------------------------------------------- the split of a range build's results by day

def _check(name: str, failed: int) -> object:
    import dagster as dg

    return dg.AssetCheckResult(asset_key=dg.AssetKey(["gov", "staging", "m"]), check_name=name, passed=failed == 0,
                               metadata={"status": "warn" if failed else "pass",
                                         "dagster_dbt/failed_row_count": failed})


def _node(name: str, severity: str) -> dict:
    return {"name": name, "resource_type": "test", "schema": "dq_audit", "alias": name,
            "config": {"severity": severity}}


def test_a_range_builds_check_results_are_split_by_the_days_of_their_failing_rows() -> None:
    import dagster as dg

    from assets.dbt_common import split_by_day

    d1, d2, d3 = (dt.date.fromisoformat(d) for d in DAYS)
    con = duckdb.connect()
    con.execute("create schema dq_audit")
    con.execute("create table dq_audit.warned as select * from (values (date '2025-05-01'), (date '2025-05-03'), "
                "(date '2025-05-03')) t(_partition_date)")
    con.execute("create table dq_audit.failed as select date '2025-05-02' as _partition_date")
    manifest = {"nodes": {n["name"]: n for n in (_node("warned", "warn"), _node("failed", "ERROR"),
                                                 _node("clean", "error"))}}
    model = dg.Output(None, output_name="m", metadata={"unique_id": "model.zhaoqing.m"})
    split = split_by_day(con, [model, _check("warned", 3), _check("failed", 1), _check("clean", 0)], manifest,
                         [d1, d2, d3])
    assert split is not None and all(split[d][0] is model for d in (d1, d2, d3))  # the model: on every day

    def result(day, name):
        r = next(e for e in split[day] if isinstance(e, dg.AssetCheckResult) and e.check_name == name)
        n = r.metadata["dagster_dbt/failed_row_count"]
        return r.passed, r.metadata["status"].value, getattr(n, "value", n), r.severity

    W, E = dg.AssetCheckSeverity.WARN, dg.AssetCheckSeverity.ERROR
    assert [result(d, "warned") for d in (d1, d2, d3)] == [(False, "warn", 1, W), (True, "pass", 0, E),
                                                           (False, "warn", 2, W)]
    assert [result(d, "failed")[:3] for d in (d1, d2, d3)] == [(True, "pass", 0), (False, "fail", 1), (True, "pass", 0)]
    assert {result(d, "clean")[:3] for d in (d1, d2, d3)} == {(True, "pass", 0)}


def test_failures_that_cannot_be_told_apart_by_day_send_the_range_back_to_day_by_day_builds() -> None:
    """No `_partition_date` in a failing test's stored rows, or not the rows dbt counted: no split (the gov step
    then builds the days one by one)."""
    from assets.dbt_common import split_by_day

    con = duckdb.connect()
    con.execute("create schema dq_audit")
    con.execute("create table dq_audit.undated as select 'x' as unique_field, 2 as n_records")
    con.execute("create table dq_audit.dated as select date '2025-05-01' as _partition_date")
    days = [dt.date.fromisoformat(d) for d in DAYS]
    manifest = {"nodes": {n["name"]: n for n in (_node("undated", "error"), _node("dated", "warn"))}}
    assert split_by_day(con, [_check("undated", 1)], manifest, days) is None
    assert split_by_day(con, [_check("dated", 2)], manifest, days) is None  # dbt counted 2, the table holds 1
    assert split_by_day(con, [_check("dated", 1)], manifest, days) is not None
    assert split_by_day(con, [_check("undated", 0)], manifest, days) is not None  # nothing failed: nothing to split


def test_products_are_built_once_per_stretch_of_days_with_the_same_authorizations_and_held_back_inputs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A range's product builds: a new build where the authorizations in force change (a scenario starts or ends)
    or the products waiting on a held-back input change, and only there."""
    from assets.ops_platform import products

    days = [dt.date(2025, 5, 1) + dt.timedelta(days=i) for i in range(7)]
    a = {"authorized_fields": {"s": {"d": ["x"]}}, "k_anonymity": 5}
    b = {"authorized_fields": {"s": {"d": ["x", "y"]}}, "k_anonymity": 5}
    inputs = [(a, []), (a, []), (b, []), (b, ["p"]), (b, ["p"]), (b, []), ({**a}, [])]
    monkeypatch.setattr(products, "product_inputs", lambda warehouse, ds: inputs[:len(ds)])
    stretches = products.product_stretches(None, days)
    assert [[d.day for d in s] for s in stretches] == [[1, 2], [3], [4, 5], [6], [7]]
