"""Issue 12 (landing faults): one agency's bad manifest, out-of-range `zq nightly --date`, future-dated folders,
and timeliness from the store's arrival time rather than the manifest's own claim."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from test_ingest import deliver, encode, records
from zqdata import asset_keys, landing
from zqdata.ingest import ingest_delivery
from zqdata.quality.timeliness import collect_delivery_findings, delivery_deadline, evaluate_deliveries
from zqdata.settings import PARTITION_START, TZ

DAY = dt.date(2025, 5, 1)
NOW = dt.datetime(2025, 6, 1, tzinfo=TZ)  # long after every SLA deadline of DAY
REPO = Path(__file__).resolve().parents[1]


def _materialize_landing(store, keys: list[str] | None = None):
    from assets.source_systems.landing import build_landing_assets, landing_key
    from orchestration.resources import ObjectStoreResource
    from zqdata.registry import registry

    assets = build_landing_assets(registry())
    selection = [landing_key(k) for k in keys] if keys else None
    result = dg.materialize(
        [assets], selection=selection, partition_key=DAY.isoformat(),
        resources={"store": ObjectStoreResource(local_root=str(store.root))},
        run_config={"ops": {"source_agency_deliveries": {"config": {"simulate": False}}}},
        raise_on_error=False,
    )  # fmt: skip
    metadata = {
        asset_keys.parse(m.asset_key.path)[1]: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("source_agency_deliveries")
    } if result.success else {}
    return result, metadata


def _findings(con, rule: str | None = None) -> list[dict]:
    cur = con.execute("select * from quality.findings" + (" where rule = ?" if rule else "") + " order by dataset, rule",
                      [rule] if rule else [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


# --- (3) a malformed manifest of one agency does not fail the landing step of every agency ----------------------

def test_malformed_manifest_is_recorded_for_its_dataset_and_others_land_normally(data_dir, store, reg, gov_con,
                                                                                 monkeypatch):
    monkeypatch.setenv("ZQ_SIMULATE", "0")
    for code in ("water_usage", "enterprise_registry"):
        deliver(store, reg, code, [("part-0001.csv", encode(records(reg.datasets[code], 3), "csv"), 3)])
    bad = reg.datasets["electricity_usage"]
    deliver(store, reg, bad.code, [("part-0001.csv", encode(records(bad, 2), "csv"), 2)])
    store.put_bytes(landing.manifest_key(bad.agency, bad.code, DAY), b'{"agency": "power", "files": [')  # truncated

    result, meta = _materialize_landing(store, ["water_usage", "enterprise_registry", "electricity_usage"])

    assert result.success
    assert set(meta) == {"water_usage", "enterprise_registry", "electricity_usage"}
    broken = meta["electricity_usage"]
    assert broken["manifest_present"] is True and broken["manifest_valid"] is False
    assert "清单文件无法解析" in broken["manifest_problem"] and "power/electricity_usage/2025-05-01/_manifest.json" in \
        broken["manifest_problem"]
    assert broken["files"] == ["part-0001.csv"] and broken["records"] == 0
    for code in ("water_usage", "enterprise_registry"):  # the other agencies are unaffected
        assert meta[code]["manifest_valid"] is True and meta[code]["manifest_problem"] == ""
        assert meta[code]["records"] == 3 and meta[code]["files"] == ["part-0001.csv"]
    # ingestion still handles that delivery as before: finding delivery.manifest_invalid, rows checked without it
    report = ingest_delivery(gov_con, store, reg, bad.code, DAY, now=NOW)
    assert report.status == "warn" and report.rows_delivered == 2
    assert [f["rule"] for f in _findings(gov_con, "delivery.manifest_invalid")] == ["delivery.manifest_invalid"]


# --- (4) `zq nightly --date` outside the partitions: one line, exit 2, nothing run -------------------------------

def _zq_nightly(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZQ_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), ZQ_DATA_DIR=str(data), ZQ_STORE_BACKEND="local", ZQ_SIMULATE="0",
               ZQ_PSEUDONYM_KEY="landing-faults-test-key-0123456789abcdef")
    proc = subprocess.run([sys.executable, "-m", "zqdata.cli", "nightly", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, home, data


def _today() -> dt.date:
    return dt.datetime.now(TZ).date()


@pytest.mark.parametrize("case", ["future", "before_start", "days_past_today", "today"])
def test_nightly_date_outside_partitions_is_one_line_exit_2_and_runs_nothing(tmp_path, case):
    first = dt.date.fromisoformat(PARTITION_START)
    args = {
        "future": ["--date", (_today() + dt.timedelta(days=30)).isoformat()],
        "before_start": ["--date", (first - dt.timedelta(days=1)).isoformat()],
        "days_past_today": ["--date", (_today() - dt.timedelta(days=2)).isoformat(), "--days", "5"],
        "today": ["--date", _today().isoformat()],  # the day is not over: not a partition yet
    }[case]
    proc, home, data = _zq_nightly(tmp_path, *args)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "DagsterUnknownPartitionError" not in out
    assert len(out.splitlines()) == 1, out
    assert "分区" in out and "partition" in out and PARTITION_START in out
    assert list(home.iterdir()) == []  # no Dagster run, no instance storage
    assert not (data / "warehouse").exists()  # no warehouse touched


def test_partition_range_matches_the_dagster_partitions():
    from orchestration.partitions import daily_partitions
    from zqdata.preflight import last_partition_day, partition_range_problem

    assert daily_partitions.get_first_partition_key() == PARTITION_START
    assert daily_partitions.get_last_partition_key() == last_partition_day().isoformat()
    assert partition_range_problem(last_partition_day(), 1) is None
    assert partition_range_problem(dt.date.fromisoformat(PARTITION_START), 3) is None
    assert partition_range_problem(last_partition_day(), 0) is not None  # --days must be >= 1


# --- (4) a future-dated folder is reported to its agency -----------------------------------------------------------

def test_future_dated_folder_is_a_finding_for_its_agency_and_in_landing_metadata(data_dir, store, reg, gov_con,
                                                                                 monkeypatch):
    monkeypatch.setenv("ZQ_SIMULATE", "0")
    ds = reg.datasets["water_usage"]
    deliver(store, reg, ds.code, [("part-0001.csv", encode(records(ds, 3), "csv"), 3)])
    future = dt.date(2099, 1, 1)
    deliver(store, reg, ds.code, [("part-0001.csv", encode(records(ds, 1), "csv"), 1)], day=future)

    result, meta = _materialize_landing(store, ["water_usage", "enterprise_registry"])
    assert result.success
    assert meta["water_usage"]["future_folders"] == ["water/water_usage/2099-01-01/"]
    assert meta["enterprise_registry"]["future_folders"] == []

    night = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(2), TZ)  # the night that runs DAY
    for code in reg.datasets:
        ingest_delivery(gov_con, store, reg, code, DAY, now=night)
    collect_delivery_findings(gov_con, reg, DAY, now=night)  # the nightly call: store from the environment
    got = _findings(gov_con, "delivery.future_folder")
    assert [(f["partition_date"], f["agency"], f["dataset"], f["dimension"], f["severity"], f["delivery_file"])
            for f in got] == [(DAY, "water", "water_usage", "timeliness", "warn", "water/water_usage/2099-01-01/")]
    assert "2099-01-01" in got[0]["detail"] and "future" in got[0]["detail"]
    # the rule is catalogued for every dataset, so the score counts it as evaluated
    assert gov_con.execute("select count(*) from quality.rule_catalog where rule = 'delivery.future_folder' "
                           "and partition_date = ?", [DAY]).fetchone()[0] == len(reg.datasets)
    # the issue register groups findings of the partition by (agency, dataset, rule): this one reaches the agency
    from zqdata.issues import _failing_groups

    groups = {(g["agency"], g["dataset"], g["rule"]) for g in _failing_groups(gov_con, DAY.isoformat())}
    assert ("water", "water_usage", "delivery.future_folder") in groups
    # reported by the night's run of the latest partition, not again by a backfill/recomputation of an older day
    listed: list[str] = []
    real_list = store.list
    monkeypatch.setattr(store, "list", lambda prefix="": listed.append(prefix) or real_list(prefix))
    _, later = evaluate_deliveries(gov_con, reg, DAY, now=night + dt.timedelta(days=30), store=store)
    assert not [f for f in later if f["rule"] == "delivery.future_folder"]
    # nor does it list every delivery folder of every dataset (each day of a year's backfill did: issue 15)
    assert listed and all(p.endswith(f"/{DAY.isoformat()}/") for p in listed), listed


# --- (8) timeliness from the store's arrival time; the manifest's claim is kept beside it ------------------------

def _deliver_arriving_at(store, reg, code: str, arrival: dt.datetime) -> None:
    """A delivery whose manifest claims it was delivered 1 hour before the deadline; its files arrive at ``arrival``."""
    ds = reg.datasets[code]
    claim = delivery_deadline(DAY, ds.delivery.sla_hours) - dt.timedelta(hours=1)
    landing.write_delivery(store, ds.agency, code, DAY,
                           [("part-0001.csv", encode(records(ds, 3), "csv"), "csv", ds.delivery.encoding, 3)],
                           claim - dt.timedelta(minutes=30), claim)
    for obj in store.list(landing.delivery_prefix(ds.agency, code, DAY)):
        os.utime(store.root / obj.key, (arrival.timestamp(), arrival.timestamp()))


def test_timeliness_uses_arrival_time_and_flags_an_earlier_manifest_claim(data_dir, store, reg, gov_con):
    water = reg.datasets["water_usage"]
    deadline = delivery_deadline(DAY, water.delivery.sla_hours)
    _deliver_arriving_at(store, reg, "water_usage", deadline + dt.timedelta(hours=5))  # claims on time, arrived late
    on_time = reg.datasets["enterprise_registry"]
    _deliver_arriving_at(store, reg, "enterprise_registry",  # honest: arrived 10 min after its claim (in tolerance)
                         delivery_deadline(DAY, on_time.delivery.sla_hours) - dt.timedelta(minutes=50))
    for code in ("water_usage", "enterprise_registry"):
        ingest_delivery(gov_con, store, reg, code, DAY, now=NOW)

    report = collect_delivery_findings(gov_con, reg, DAY, now=NOW)

    status = {s.dataset: s for s in report.statuses}
    assert status["water_usage"].status == "late"
    assert status["water_usage"].delivered_at == deadline + dt.timedelta(hours=5)  # the store's arrival
    assert status["water_usage"].claimed_at == deadline - dt.timedelta(hours=1)  # the manifest's claim, kept
    assert status["water_usage"].time_source == "store"
    assert status["enterprise_registry"].status == "on_time"
    rules = {(f["dataset"], f["rule"], f["dimension"], f["severity"])
             for f in _findings(gov_con) if f["dataset"] in ("water_usage", "enterprise_registry")}
    assert rules == {
        ("water_usage", "delivery.late", "timeliness", "warn"),
        ("water_usage", "delivery.delivered_at_before_arrival", "timeliness", "warn"),
    }
    claim = _findings(gov_con, "delivery.delivered_at_before_arrival")[0]
    assert claim["agency"] == "water" and claim["delivery_file"] == "water/water_usage/2025-05-01/_manifest.json"
    md = report.as_markdown()
    assert "清单声明" in md and (deadline - dt.timedelta(hours=1)).isoformat(timespec="minutes") in md


def test_landing_metadata_keeps_arrival_beside_the_manifest_claim(data_dir, store, reg, monkeypatch):
    monkeypatch.setenv("ZQ_SIMULATE", "0")
    water = reg.datasets["water_usage"]
    arrival = delivery_deadline(DAY, water.delivery.sla_hours) + dt.timedelta(hours=5)
    _deliver_arriving_at(store, reg, "water_usage", arrival)
    result, meta = _materialize_landing(store, ["water_usage"])
    assert result.success
    assert meta["water_usage"]["arrived_at"] == arrival.isoformat()
    assert meta["water_usage"]["delivered_at"] == (arrival - dt.timedelta(hours=6)).isoformat()


def test_arrival_recorded_by_ingestion_is_preferred_when_meta_deliveries_has_it(data_dir, store, reg, gov_con):
    """Once ingestion records ``meta.deliveries.arrived_at`` (the store time at ingestion), timeliness uses it even
    when the landing folder is gone; the recorded ``delivered_at`` (the manifest's claim) is only shown beside it."""
    from zqdata.quality.scores import ensure_quality_tables

    gov_con.execute("create schema meta")
    gov_con.execute("""create table meta.deliveries (partition_date DATE, agency VARCHAR, dataset VARCHAR,
                       delivery_file VARCHAR, delivered_at TIMESTAMPTZ, status VARCHAR, arrived_at TIMESTAMPTZ)""")
    ensure_quality_tables(gov_con)
    deadline = delivery_deadline(DAY, reg.datasets["water_usage"].delivery.sla_hours)
    gov_con.execute("insert into meta.deliveries values (?, 'water', 'water_usage', ?, ?, 'ok', ?)",
                    [DAY, "water/water_usage/2025-05-01/part-0001.csv", deadline - dt.timedelta(hours=1),
                     deadline + dt.timedelta(hours=2)])
    report, findings = evaluate_deliveries(gov_con, reg, DAY, now=NOW, store=store)  # empty store
    water = next(s for s in report.statuses if s.dataset == "water_usage")
    assert (water.status, water.time_source, water.delivered_at) == ("late", "store", deadline + dt.timedelta(hours=2))
    assert water.claimed_at == deadline - dt.timedelta(hours=1)
    assert [f["rule"] for f in findings if f["dataset"] == "water_usage"] == ["delivery.late"]
