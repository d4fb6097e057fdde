"""An earlier day redelivered → the later days that read it are recomputed (issue 17, finding 3; the fault suite).

Day 1 and day 2 run; the social insurance agency then redelivers day 1 with other contributions. `zq nightly --date
<day 1>` reruns day 1 and, because day 2's credit profile read day 1's social insurance, day 2 too.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg
import duckdb
import pytest

from test_nightly_e2e import DAY, _env, _run

pytestmark = pytest.mark.slow
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


def test_a_redelivered_earlier_day_recomputes_the_later_days_that_read_it(tmp_path, monkeypatch):
    """Day 2's credit profile takes each enterprise's latest social-insurance period up to day 2 — for some, day 1's."""
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
