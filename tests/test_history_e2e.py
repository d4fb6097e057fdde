"""An earlier day redelivered → the later days that read it are recomputed (issue 17, finding 3; the fault suite).

Day 1 and day 2 run; the data bureau then redelivers day 1's consent records with every grant withdrawn. `zq nightly
--date <day 1>` reruns day 1 and, because day 2's boundary read day 1's consent, day 2 too: an enterprise whose only
grant was on day 1 leaves day 2's scenario data, as it would had day 2 been computed after the redelivery.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg
import duckdb
import pytest

from test_nightly_e2e import DAY, _env, _redeliver_with, _run

pytestmark = pytest.mark.slow
DAY2 = DAY + dt.timedelta(days=1)


def _scenario_enterprises(ops_db, day) -> set[str]:
    with duckdb.connect(str(ops_db), read_only=True) as con:
        return {c for (c,) in con.execute(
            "select credit_code from scenario_sme_credit_profile.enterprise_registry where _partition_date = ?",
            [day]).fetchall()}


def _consent_subjects(store, day, status: str) -> set[str]:
    import csv
    import io

    text = store.get_bytes(f"data_bureau/subject_consent/{day}/part-0001.csv").decode("utf-8-sig")
    return {r["subject_id"].strip() for r in csv.DictReader(io.StringIO(text))
            if r["scenario_code"].strip() == "sme_credit_profile" and status in r["status"]}


def test_a_redelivered_earlier_day_recomputes_the_later_days_that_read_it(tmp_path, monkeypatch):
    from orchestration.history import stale_partitions
    from zqdata.commands.nightly import recompute_stale_days
    from zqdata.storage import LocalObjectStore

    data_dir = tmp_path / "data"
    _env(monkeypatch, data_dir)
    ops_db = data_dir / "warehouse" / "ops_platform.duckdb"
    with dg.instance_for_test() as instance:
        for day in (DAY, DAY2):
            result, summary = _run(day, instance)
            assert result.success, summary.checks_failed
        store = LocalObjectStore(data_dir / "landing")
        only_day1 = _consent_subjects(store, DAY, "granted") - _consent_subjects(store, DAY2, "")
        before = _scenario_enterprises(ops_db, DAY2)
        assert before & only_day1, "the demo data should have enterprises whose only grant was on day 1"
        assert stale_partitions(instance) == []

        _env(monkeypatch, data_dir, simulate=False)  # from now on only real (re)deliveries
        _redeliver_with(store, "data_bureau", "subject_consent", DAY, b"granted", b"revoked")
        result, summary = _run(DAY, instance)
        assert result.success, summary.checks_failed
        stale = stale_partitions(instance)
        assert [s.partition for s in stale] == [DAY2.isoformat()]
        assert _scenario_enterprises(ops_db, DAY2) == before  # still stale: nothing recomputed it yet

        assert recompute_stale_days(instance)
        assert stale_partitions(instance) == []
        after = _scenario_enterprises(ops_db, DAY2)
        assert not (after & only_day1)
        assert after == before - only_day1
