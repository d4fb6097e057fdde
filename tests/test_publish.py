"""Write–audit–publish: only gated partitions are published, as immutable content-addressed Parquet snapshots, and
deliveries serve those (never the build database); the audit chain stays valid with several appending processes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import re
from pathlib import Path

import duckdb
import pytest

from zqdata import audit, publish
from zqdata.authorization import AccessDenied, deliver_product
from zqdata.registry import Registry
from zqdata.settings import TZ, repo_root
from zqdata.storage import LocalObjectStore, S3ObjectStore

PRODUCT = "ops_sme_credit_profile"
D = dt.date(2025, 5, 1)
NOW = dt.datetime(2025, 5, 2, 9, 30, tzinfo=TZ)
GATES = {"dbt_tests": True, "k_anonymity": True}
ROWS = [("91441200MA00000002", 2.5, D), ("91441200MA00000001", 1.5, D), ("91441200MA00000003", 3.5, D),
        ("91441200MA00000009", 9.5, D + dt.timedelta(days=1))]


def credential(consumer: str) -> str:
    text = (repo_root() / "docs" / "security.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `(zq_[a-z_]+)` \|[^|]*\|[^|]*\| `([^`]+)` \|", text, flags=re.M))[consumer]


def build(path: Path, rows=ROWS, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An ops DuckDB file with products.<PRODUCT> holding ``rows`` in the given (physical) order."""
    con = duckdb.connect(str(path))
    if threads:
        con.execute(f"SET threads = {threads}")
    con.execute("CREATE SCHEMA IF NOT EXISTS products")
    con.execute(f"CREATE OR REPLACE TABLE products.{PRODUCT} (credit_code VARCHAR, kwh DECIMAL(18,2), "
                "_partition_date DATE)")
    if rows:
        con.executemany(f"INSERT INTO products.{PRODUCT} VALUES (?, ?, ?)", rows)
    return con


class RecordingStore(LocalObjectStore):
    """A local store that remembers every key written."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        super().put_bytes(key, data)


@pytest.fixture
def store(tmp_path) -> RecordingStore:
    return RecordingStore(tmp_path / "snapshots")


@pytest.fixture
def ops(tmp_path):
    con = build(tmp_path / "ops.duckdb")
    yield con
    con.close()


def deliver(db, store, reg, out: Path, day: dt.date = D):
    return deliver_product(db, store, reg, "zq_rural_bank", credential("zq_rural_bank"), PRODUCT, day, out, now=NOW)


# -- publishing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gates,message", [
    ({}, "no gate results"),
    ({"dbt_tests": True, "k_anonymity": False}, "gates failed for ops_sme_credit_profile 2025-05-01: k_anonymity"),
    ({"dbt_tests": True, "k_anonymity": None}, "k_anonymity"),  # not run is not passed
    ({"dbt_tests": "passed"}, "dbt_tests"),  # only True passes
])
def test_publishing_is_refused_without_passing_gates(ops, store, reg, gates, message):
    with pytest.raises(publish.PublishRefused, match=re.escape(message)):
        publish.publish_partition(ops, store, reg, PRODUCT, D, gates, run_id="r1", now=NOW)
    assert store.puts == [] and store.list("") == []
    assert publish.current_snapshot(store, PRODUCT, D) is None


def test_publishing_is_refused_for_a_product_outside_every_scenario(ops, store, reg):
    ops.execute("CREATE TABLE products.ops_unregistered AS SELECT * FROM products.ops_sme_credit_profile")
    with pytest.raises(publish.PublishRefused, match="not registered to a scenario"):
        publish.publish_partition(ops, store, reg, "ops_unregistered", D, GATES, run_id="r1", now=NOW)
    with pytest.raises(ValueError, match="invalid product name"):
        publish.publish_partition(ops, store, reg, "products; DROP TABLE x", D, GATES, run_id="r1", now=NOW)
    assert store.list("") == []


def test_publish_writes_data_manifest_and_last_the_pointer(ops, store, reg):
    snap = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="run-7", now=NOW)
    prefix = f"products/{PRODUCT}/{D}/{snap.sha256[:16]}"
    assert store.puts == [f"{prefix}/data.parquet", f"{prefix}/manifest.json", f"products/{PRODUCT}/{D}/CURRENT.json"]
    data = store.get_bytes(snap.key)
    assert snap.key == f"{prefix}/data.parquet" and snap.sha256 == hashlib.sha256(data).hexdigest()
    assert (snap.scenario, snap.row_count, snap.columns) == ("sme_credit_profile", 3,
                                                             ("credit_code", "kwh", "_partition_date"))
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    assert manifest == {"product": PRODUCT, "scenario": "sme_credit_profile", "partition_date": "2025-05-01",
                        "key": snap.key, "row_count": 3, "sha256": snap.sha256,
                        "columns": ["credit_code", "kwh", "_partition_date"], "gate_results": GATES,
                        "run_id": "run-7", "published_at": "2025-05-02T09:30:00+08:00"}
    pointer = json.loads(store.get_bytes(f"products/{PRODUCT}/{D}/CURRENT.json"))
    assert (pointer["snapshot"], pointer["sha256"]) == (prefix, snap.sha256)
    assert publish.current_snapshot(store, PRODUCT, D) == snap
    assert publish.read_snapshot(store, snap) == data
    rows = duckdb.sql(f"SELECT credit_code FROM read_parquet('{store.root / snap.key}')").fetchall()
    assert [r[0] for r in rows] == ["91441200MA00000001", "91441200MA00000002", "91441200MA00000003"]  # only D, sorted


def test_rerun_of_the_same_data_gives_the_same_snapshot_and_rewrites_nothing(ops, store, reg, tmp_path):
    first = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    store.puts.clear()
    again = publish.publish_partition(ops, store, reg, PRODUCT, D, {**GATES, "extra": True}, run_id="r2",
                                      now=NOW + dt.timedelta(days=1))
    assert again == first and store.puts == []  # immutable: the first publication's manifest stands
    # The same rows stored in another order, written with other thread counts: still the same bytes.
    for i, threads in enumerate((1, 4)):
        con = build(tmp_path / f"other{i}.duckdb", rows=list(reversed(ROWS)), threads=threads)
        other = publish.publish_partition(con, store, reg, PRODUCT, D, GATES, run_id=f"r{3 + i}", now=NOW)
        con.close()
        assert other.key == first.key
    assert store.puts == []
    assert len(store.list(f"products/{PRODUCT}/{D}/")) == 3


def test_changed_data_gives_a_new_snapshot_and_current_moves(ops, store, reg):
    old = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    ops.execute(f"UPDATE products.{PRODUCT} SET kwh = 20.0 WHERE credit_code = '91441200MA00000002'")
    new = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r2", now=NOW)
    assert new.key != old.key and new.sha256 != old.sha256
    assert publish.current_snapshot(store, PRODUCT, D) == new
    assert store.exists(old.key)  # history stays; it is just no longer served
    assert json.loads(store.get_bytes(f"products/{PRODUCT}/{D}/CURRENT.json"))["sha256"] == new.sha256


def test_a_delivery_serves_the_current_snapshot(opdb, ops, store, reg, tmp_path):
    old = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    ops.execute(f"DELETE FROM products.{PRODUCT} WHERE credit_code = '91441200MA00000003'")
    new = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r2", now=NOW)
    receipt = deliver(opdb, store, reg, tmp_path / "out")
    assert (receipt.snapshot, receipt.sha256, receipt.row_count) == (new.key, new.sha256, 2) != (old.key, old.sha256, 3)
    assert receipt.path.read_bytes() == store.get_bytes(new.key)
    [rec] = audit.read_chain(opdb)
    assert (rec.outcome, rec.snapshot, rec.file_sha256, rec.row_count) == ("delivered", new.key, new.sha256, 2)


# -- serving only what is intact and current -------------------------------------------------------------------------

def _flip_a_byte(store: LocalObjectStore, key: str) -> None:
    path = store.root / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper,message", [
    (lambda store, snap: _flip_a_byte(store, snap.key), "sha256 mismatch"),
    (lambda store, snap: (store.root / snap.key).unlink(), "snapshot data missing"),
    (lambda store, snap: (store.root / snap.prefix / "manifest.json").write_text(
        (store.root / snap.prefix / "manifest.json").read_text().replace('"row_count": 3', '"row_count": 30')),
     "manifest sha256 mismatch"),
    (lambda store, snap: (store.root / snap.prefix / "manifest.json").unlink(), "manifest missing"),
    (lambda store, snap: (store.root / snap.prefix).parent.joinpath("CURRENT.json").write_text("{"),
     "corrupt CURRENT pointer"),
])
def test_a_tampered_snapshot_is_denied_and_logged(opdb, ops, store, reg, tmp_path, tamper, message):
    snap = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    tamper(store, snap)
    with pytest.raises(AccessDenied, match=r"快照校验失败.*published snapshot failed its check"):
        deliver(opdb, store, reg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    [rec] = audit.read_chain(opdb)
    assert (rec.outcome, rec.row_count, rec.file_sha256, rec.scenario) == ("denied", 0, "", "sme_credit_profile")
    assert message in rec.reason
    assert audit.verify_chain(opdb) == []


def test_republishing_restores_a_damaged_snapshot(ops, store, reg):
    snap = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    _flip_a_byte(store, snap.key)
    with pytest.raises(publish.SnapshotCorrupt):
        publish.read_snapshot(store, snap)
    assert publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r2", now=NOW) == snap
    assert hashlib.sha256(publish.read_snapshot(store, snap)).hexdigest() == snap.sha256


def test_a_withdrawn_partition_is_denied_until_published_again(opdb, ops, store, reg, tmp_path):
    snap = publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    other_day = publish.publish_partition(ops, store, reg, PRODUCT, D + dt.timedelta(days=1), GATES, run_id="r1",
                                          now=NOW)
    assert publish.withdraw(store, PRODUCT, D) is True
    assert publish.withdraw(store, PRODUCT, D) is False
    assert publish.current_snapshot(store, PRODUCT, D) is None
    assert publish.current_snapshot(store, PRODUCT, D + dt.timedelta(days=1)) == other_day  # only that day
    with pytest.raises(AccessDenied, match=r"2025-05-01 分区尚未发布（未通过门禁或正在重建） \(partition not published\)"):
        deliver(opdb, store, reg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    [rec] = audit.read_chain(opdb)
    assert rec.outcome == "denied" and "partition not published" in rec.reason
    assert publish.publish_partition(ops, store, reg, PRODUCT, D, GATES, run_id="r2", now=NOW).key == snap.key
    assert deliver(opdb, store, reg, tmp_path / "out").snapshot == snap.key
    assert [r.outcome for r in audit.read_chain(opdb)] == ["denied", "delivered"]


def test_an_empty_partition_publishes_an_empty_snapshot(tmp_path, store, reg):
    con = build(tmp_path / "empty.duckdb", rows=[])
    snap = publish.publish_partition(con, store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    con.close()
    assert snap.row_count == 0 and snap.columns == ("credit_code", "kwh", "_partition_date")


# -- the store configuration and the S3 backend ----------------------------------------------------------------------

def test_published_store_is_a_local_folder_by_default(data_dir, monkeypatch):
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    store = publish.published_store()
    assert isinstance(store, LocalObjectStore) and store.root == data_dir.resolve() / "published" / "snapshots"
    monkeypatch.setenv("ZQ_PUBLISH_BACKEND", "ftp")
    with pytest.raises(ValueError, match="unknown ZQ_PUBLISH_BACKEND='ftp'"):
        publish.published_store()
    monkeypatch.setenv("ZQ_PUBLISH_BACKEND", "s3")
    for name in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
        monkeypatch.delenv(f"ZQ_S3_{name}", raising=False)
        monkeypatch.delenv(f"ZQ_S3_PUBLISHED_{name}", raising=False)
    with pytest.raises(ValueError, match="ZQ_S3_PUBLISHED_SECRET_KEY / ZQ_S3_SECRET_KEY"):
        publish.published_store()


@pytest.mark.parametrize("prefix", ["ZQ_S3_PUBLISHED_", "ZQ_S3_"])
def test_published_store_on_s3_creates_its_bucket(moto_endpoint, data_dir, monkeypatch, prefix, request):
    bucket = "zq-published-" + prefix.lower().replace("_", "")
    monkeypatch.setenv("ZQ_STORE_BACKEND", "s3")  # the publish backend follows the landing backend by default
    monkeypatch.delenv("ZQ_PUBLISH_BACKEND", raising=False)
    for name in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
        monkeypatch.delenv(f"ZQ_S3_{name}", raising=False)
        monkeypatch.delenv(f"ZQ_S3_PUBLISHED_{name}", raising=False)
    monkeypatch.setenv(f"{prefix}ENDPOINT", moto_endpoint)
    monkeypatch.setenv(f"{prefix}ACCESS_KEY", "testing")
    monkeypatch.setenv(f"{prefix}SECRET_KEY", "testing")
    monkeypatch.setenv("ZQ_S3_PUBLISHED_BUCKET", bucket)
    monkeypatch.setenv("ZQ_S3_REGION", "us-east-1")
    store = publish.published_store()
    assert isinstance(store, S3ObjectStore) and store.bucket == bucket
    assert store.client.bucket_exists(bucket)
    store.put_bytes("products/x/2025-05-01/CURRENT.json", b"{}")
    assert publish.published_store().get_bytes("products/x/2025-05-01/CURRENT.json") == b"{}"


def test_s3_round_trip(opdb, ops, s3_store, reg, tmp_path):
    snap = publish.publish_partition(ops, s3_store, reg, PRODUCT, D, GATES, run_id="r1", now=NOW)
    assert publish.publish_partition(ops, s3_store, reg, PRODUCT, D, GATES, run_id="r2", now=NOW) == snap
    assert {o.key for o in s3_store.list(f"products/{PRODUCT}/{D}/")} == \
        {f"products/{PRODUCT}/{D}/CURRENT.json", f"{snap.prefix}/data.parquet", f"{snap.prefix}/manifest.json"}
    assert publish.current_snapshot(s3_store, PRODUCT, D) == snap
    receipt = deliver(opdb, s3_store, reg, tmp_path / "out")
    assert receipt.snapshot == snap.key and hashlib.sha256(receipt.path.read_bytes()).hexdigest() == snap.sha256
    s3_store.put_bytes(snap.key, b"PAR1 not the published bytes")
    with pytest.raises(AccessDenied, match="sha256 mismatch"):
        deliver(opdb, s3_store, reg, tmp_path / "out2")
    assert publish.withdraw(s3_store, PRODUCT, D) is True
    assert publish.current_snapshot(s3_store, PRODUCT, D) is None
    assert [r.outcome for r in audit.read_chain(opdb)] == ["delivered", "denied"]


# -- one audit chain, several processes ------------------------------------------------------------------------------

PER_WORKER = 15


def _append_many(url: str, barrier, worker: int) -> None:
    """Child process: append PER_WORKER records once every worker is ready (spawned: imports this module)."""
    from zqdata import audit as audit_mod
    from zqdata import opdb as opdb_mod

    engine = opdb_mod.get_engine(url)
    barrier.wait(timeout=120)
    for i in range(PER_WORKER):
        audit_mod.append_delivery(engine, consumer=f"worker{worker}", scenario="sme_credit_profile", product=PRODUCT,
                                  partition_date=D, outcome="delivered", reason="", row_count=i,
                                  file_sha256=f"{worker:02d}" * 32, snapshot=f"w{worker}/{i}")
    engine.dispose()


def test_concurrent_appenders_in_four_processes_keep_one_valid_chain(opdb):
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier = ctx.Barrier(workers)
    url = opdb.url.render_as_string(hide_password=False)
    procs = [ctx.Process(target=_append_many, args=(url, barrier, w)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * workers
    chain = audit.read_chain(opdb)
    assert [r.seq for r in chain] == list(range(1, workers * PER_WORKER + 1))
    assert audit.verify_chain(opdb) == []
    for w in range(workers):  # every append is there, in each worker's own order
        assert [r.row_count for r in chain if r.consumer == f"worker{w}"] == list(range(PER_WORKER))


def _gated_assets():
    """A product with an error-severity gate, a warning, a check planned and never evaluated and a check of another
    asset, over a range of days."""
    import dagster as dg

    days = dg.DailyPartitionsDefinition(start_date="2025-06-01")
    checks = [dg.AssetCheckSpec("no_personal_data_leak", asset="p", blocking=False),
              dg.AssetCheckSpec("style", asset="p"), dg.AssetCheckSpec("no_personal_data_leak", asset="other"),
              dg.AssetCheckSpec("not_evaluated", asset="p")]  # planned, never evaluated (as when its model is not built)

    @dg.multi_asset(specs=[dg.AssetSpec("p", partitions_def=days), dg.AssetSpec("other", partitions_def=days)],
                    check_specs=checks, partitions_def=days, backfill_policy=dg.BackfillPolicy.single_run())
    def products(context):
        for key in context.partition_keys:
            for asset in ("p", "other"):
                yield dg.AssetMaterialization(asset_key=asset, partition=key)
            yield dg.AssetCheckEvaluation(asset_key=dg.AssetKey("p"), check_name="no_personal_data_leak",
                                          passed=key != "2025-06-21", partition=key,
                                          severity=dg.AssetCheckSeverity.ERROR)
            yield dg.AssetCheckEvaluation(asset_key=dg.AssetKey("p"), check_name="style", passed=False,
                                          partition=key, severity=dg.AssetCheckSeverity.WARN)
            yield dg.AssetCheckEvaluation(asset_key=dg.AssetKey("other"), check_name="no_personal_data_leak",
                                          passed=False, partition=key, severity=dg.AssetCheckSeverity.ERROR)
        for asset in ("p", "other"):
            yield dg.MaterializeResult(asset_key=asset)
        for spec in checks:
            yield dg.Output(None, output_name=products.get_output_name_for_asset_check_key(spec.key))

    return products


def _range_run(instance, assets, first: str, last: str) -> str:
    import dagster as dg

    result = dg.materialize([assets], instance=instance, tags={"dagster/asset_partition_range_start": first,
                                                               "dagster/asset_partition_range_end": last})
    assert result.success
    return result.run_id


def test_a_range_runs_gates_are_read_per_day_from_its_own_evaluations_of_the_product(tmp_path, monkeypatch):
    """The gate results of a range run: each day with its own results, from this run's evaluations of this product
    only (not the other product's, nor another run's); a failed warning does not gate. They are read from the check
    executions Dagster indexes per asset, check, run and partition, not by deserializing every check evaluation of
    the run: ~184 a day, twice a day per product (5.7 s of a 30-day range run; bench/notes.md item 15)."""
    import shutil

    import dagster as dg
    import dagster._serdes as serdes
    from dagster._core.storage.event_log import sql_event_log

    from assets.ops_platform import publish as publish_asset

    shutil.copy(repo_root() / "orchestration" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assets = _gated_assets()
    product = dg.AssetKey("p")
    with dg.DagsterInstance.get() as instance:
        earlier = _range_run(instance, assets, "2025-06-20", "2025-06-22")
        run = _range_run(instance, assets, "2025-06-01", "2025-06-25")
        read = []
        plain = sql_event_log.deserialize_value

        def counting(value, *args, **kwargs):
            read.append(1)
            return plain(value, *args, **kwargs)

        monkeypatch.setattr(sql_event_log, "deserialize_value", counting)
        monkeypatch.setattr(serdes, "deserialize_value", counting)
        by_day = publish_asset.run_gate_results_by_partition(instance, run, product)
        merged = publish_asset.run_gate_results(instance, run, product)
        assert len(read) <= 2 * 2 * 25  # this product's two checks a day, twice (Dagster's own read: 3 a day each)
        assert publish_asset.run_gate_results(instance, earlier, product, "2025-06-21") == {
            "no_personal_data_leak": False}
        assert publish_asset.run_gate_results(instance, earlier, product, "2025-06-01") == {}  # not in that run
    assert set(by_day) == {f"2025-06-{i + 1:02d}" for i in range(25)}
    assert by_day["2025-06-21"] == {"no_personal_data_leak": False}
    assert all(g == {"no_personal_data_leak": True} for d, g in by_day.items() if d != "2025-06-21")
    assert merged == {"no_personal_data_leak": False}  # a single-day run's view: every evaluation of the run
