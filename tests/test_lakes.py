"""The warehouse as two DuckLakes (issue 16 groundwork, ``zqdata/lakes.py``).

On loopback: a PostgreSQL server (Debian's package, ``pgserver.py``) holding the two catalog databases, each owned by
its own password-authenticated role, and ``moto_server`` (``s3server.py``) with IAM enforced: one bucket per domain,
one IAM user per domain allowed on its own bucket only. Proven here:

(a) two processes write one gov table concurrently, with transactions open at the same time, and both commit (a
    DuckDB file refuses the second writer process);
(b) the ops worker cannot read gov: its environment holds no gov variable or secret, its S3 secret is scoped to the
    ops data path, gov data files answer 403 to it, and the gov catalog refuses its credentials;
(c) a table written through the lake reads back equal (order-independent checksum) to the same data in a DuckDB file;
(d) dbt-duckdb builds an incremental model (the repo's ``zq_replace_partition`` strategy) into the lake, two
    partitions in two concurrent dbt processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from zqdata import lakes, loopback

REPO = Path(__file__).resolve().parents[1]
PACKAGES_MISSING = [p for names in lakes.EXTENSION_PACKAGES.values() for p in names[:1]
                    if __import__("importlib.util").util.find_spec(p) is None]
needs_extensions = pytest.mark.skipif(
    bool(PACKAGES_MISSING),
    reason=f"DuckDB extension packages not installed ({', '.join(PACKAGES_MISSING)}): "
           "pip install -c constraints.txt -e .  (the production-mode dependencies of pyproject.toml)")

GOV_BUCKET, OPS_BUCKET = loopback.BUCKETS["gov"], loopback.BUCKETS["ops"]


# -- without services: the settings, the workers' environments, the extension files --------------------------------

def _env(**over: str) -> dict[str, str]:
    env = {
        "ZQ_WAREHOUSE": "ducklake",
        "ZQ_GOV_LAKE_CATALOG": "dbname=gov_catalog host=db.example port=5432 user=zq_gov_lake",
        "ZQ_GOV_LAKE_CATALOG_PASSWORD": "gov-catalog-password-0001",
        "ZQ_GOV_LAKE_DATA": f"s3://{GOV_BUCKET}/warehouse/",
        "ZQ_GOV_S3_KEY_ID": "GOVKEYID0001",
        "ZQ_GOV_S3_SECRET": "gov-s3-secret-0001",
        "ZQ_OPS_LAKE_CATALOG": "postgresql://zq_ops_lake@db.example:5432/ops_catalog",
        "ZQ_OPS_LAKE_CATALOG_PASSWORD": "ops-catalog-password-0001",
        "ZQ_OPS_LAKE_DATA": f"s3://{OPS_BUCKET}/warehouse",
        "ZQ_OPS_S3_KEY_ID": "OPSKEYID0001",
        "ZQ_OPS_S3_SECRET": "ops-s3-secret-0001",
        "ZQ_S3_ENDPOINT": "http://minio.example:9000",
        "ZQ_DUCKDB_MEMORY_LIMIT": "1GB",
        "PATH": "/usr/bin",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_embedded_default_needs_nothing() -> None:
    assert lakes.warehouse_mode({}) == "duckdb"
    assert lakes.lake_settings_problems({}) == []
    assert lakes.lake_settings_problems({"ZQ_WAREHOUSE": "duckdb", "AWS_SECRET_ACCESS_KEY": "x"}) == []
    assert lakes.lake_settings_problems({"ZQ_WAREHOUSE": "lake"})  # a typo is not the embedded mode


def test_valid_settings_and_their_normal_form() -> None:
    env = _env()
    assert lakes.lake_settings_problems(env) == []
    gov, ops = lakes.lake_settings("gov", env), lakes.lake_settings("ops", env)
    assert (gov.catalog, ops.catalog) == ("gov_platform", "ops_platform")
    assert (gov.endpoint, gov.use_ssl, gov.url_style) == ("minio.example:9000", False, "path")
    assert ops.data_path == f"s3://{OPS_BUCKET}/warehouse/" and ops.bucket == OPS_BUCKET
    assert "gov-s3-secret-0001" not in repr(gov) and "gov-catalog-password" not in repr(gov)
    assert lakes.lake_settings("gov", _env(ZQ_GOV_LAKE_CATALOG="postgresql+psycopg2://u@h/gov_catalog")
                               ).catalog_dsn == "postgresql://u@h/gov_catalog"


@pytest.mark.parametrize("over, expected", [
    ({"ZQ_OPS_S3_KEY_ID": "GOVKEYID0001"}, "share one S3 key"),
    ({"ZQ_OPS_S3_SECRET": "gov-s3-secret-0001"}, "share one S3 secret"),
    ({"ZQ_OPS_LAKE_DATA": f"s3://{GOV_BUCKET}/ops/"}, "share the bucket"),
    ({"ZQ_OPS_LAKE_CATALOG": "dbname=gov_catalog host=db.example port=5432 user=zq_ops_lake"},
     "share one catalog database"),
    ({"ZQ_OPS_LAKE_CATALOG": "dbname=ops_catalog host=db.example user=zq_gov_lake"}, "same role"),
    ({"ZQ_GOV_LAKE_CATALOG": "dbname=gov_catalog host=db.example user=g password=pw"}, "holds a password"),
    ({"ZQ_GOV_LAKE_DATA": "/srv/lake"}, "expected s3://"),
    ({"ZQ_GOV_S3_SECRET": None}, "ZQ_GOV_S3_SECRET"),
    ({"AWS_SECRET_ACCESS_KEY": "x"}, "generic credentials"),
    ({"ZQ_WORKER_DOMAINS": "ops"}, "gov variables are set"),
    ({"ZQ_WORKER_DOMAINS": "ops, boundary"}, "expected gov, ops or gov,ops"),
])
def test_settings_problems(over: dict, expected: str) -> None:
    problems = lakes.lake_settings_problems(_env(**over))
    assert any(expected in p for p in problems), problems


def test_ops_environment_holds_no_gov_credential() -> None:
    full = _env(ZQ_S3_ACCESS_KEY="landing-key-0001", ZQ_S3_SECRET_KEY="landing-secret-0001",
                ZQ_PSEUDONYM_KEY="f" * 64, ZQ_GOV_DB="/data/gov_platform.duckdb", AWS_ACCESS_KEY_ID="AKIA",
                PGPASSWORD="pw", SOME_TOOL_TOKEN="gov-s3-secret-0001",  # a gov secret under another name
                ZQ_S3_PUBLISHED_ACCESS_KEY="published-key-0001", ZQ_S3_PUBLISHED_SECRET_KEY="published-secret-01")
    ops = lakes.ops_environment(full)
    assert ops["ZQ_WORKER_DOMAINS"] == "ops"
    assert not [k for k in ops if k.startswith("ZQ_GOV_")]
    for gone in ("ZQ_S3_ACCESS_KEY", "ZQ_S3_SECRET_KEY", "ZQ_PSEUDONYM_KEY", "AWS_ACCESS_KEY_ID", "PGPASSWORD",
                 "SOME_TOOL_TOKEN"):
        assert gone not in ops
    gov_values = {v for k, v in full.items() if k.startswith("ZQ_GOV_") or k in ("ZQ_S3_ACCESS_KEY", "ZQ_S3_SECRET_KEY")}
    assert not gov_values & set(ops.values())
    for kept in ("ZQ_OPS_S3_KEY_ID", "ZQ_OPS_LAKE_CATALOG", "ZQ_S3_ENDPOINT", "ZQ_S3_PUBLISHED_ACCESS_KEY", "PATH"):
        assert ops[kept] == full[kept]
    assert lakes.lake_settings_problems(ops) == []
    with pytest.raises(lakes.LakeSettingsError, match="ZQ_GOV_LAKE_CATALOG"):
        lakes.lake_settings("gov", ops)
    # the gov worker's environment mirrors it; the boundary worker keeps both and the pseudonymization key
    gov = lakes.gov_environment(full)
    assert not [k for k in gov if k.startswith("ZQ_OPS_") or k.startswith("ZQ_S3_PUBLISHED_")]
    assert "ZQ_PSEUDONYM_KEY" not in gov and gov["ZQ_S3_ACCESS_KEY"] == "landing-key-0001"
    boundary = lakes.domain_environment(("gov", "ops"), full)
    assert boundary["ZQ_PSEUDONYM_KEY"] == full["ZQ_PSEUDONYM_KEY"] and "AWS_ACCESS_KEY_ID" not in boundary
    # the dbt step of ops gets the ops lake only, under domain-neutral names
    dbt = lakes.dbt_environment("ops", ops)
    assert dbt["ZQ_LAKE_S3_KEY_ID"] == "OPSKEYID0001" and not gov_values & set(dbt.values())


@needs_extensions
def test_extensions_load_from_the_packages_by_path(tmp_path: Path) -> None:
    folder = lakes.extension_directory(tmp_path / "ext") / f"v{duckdb.__version__}"
    (platform,) = [p.name for p in folder.iterdir()]
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for name in lakes.EXTENSION_PACKAGES:
        assert lakes.extension_file(name).is_file()
        con.execute(f"LOAD '{folder / platform / (name + '.duckdb_extension')}'")
    loaded = {r[0] for r in con.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()}
    assert {"httpfs", "postgres_scanner", "ducklake"} <= loaded
    assert lakes.extension_directory(tmp_path / "ext") == tmp_path / "ext"  # idempotent


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("duckdb_extension_postgres") is None,
                    reason="duckdb-extension-postgres not installed (only its fallback is tested here)")
def test_misnamed_postgres_package_is_linked_under_its_real_name(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """duckdb-extension-postgres ships postgres_scanner as postgres.duckdb_extension, which LOAD refuses by that
    name; the extension folder links it as postgres_scanner.duckdb_extension, which loads."""
    monkeypatch.setitem(lakes.EXTENSION_PACKAGES, "postgres_scanner", ("duckdb_extension_postgres",))
    packaged = lakes.extension_file("postgres_scanner")
    assert packaged.name == "postgres.duckdb_extension"
    fresh = lambda: duckdb.connect(config={"autoinstall_known_extensions": False,  # noqa: E731
                                           "autoload_known_extensions": False})
    with pytest.raises(duckdb.IOException, match="entrypoint"):
        fresh().execute(f"LOAD '{packaged}'")
    link = next((lakes.extension_directory(tmp_path / "ext") / f"v{duckdb.__version__}").glob(
        "*/postgres_scanner.duckdb_extension"))
    con = fresh()
    con.execute(f"LOAD '{link}'")
    assert con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'postgres_scanner'"
                       ).fetchone() == (True,)


@needs_extensions
def test_ducklake_conflict_rules(tmp_path: Path) -> None:
    """What DuckLake merges and what it refuses when two transactions on one table commit in turn (one process, two
    cursors, a DuckDB-file catalog: the rules are DuckLake's, whatever the catalog). Pins the behaviour that
    ``lakes.run_in_transaction`` is for; if a DuckLake upgrade merges more, this test says so."""
    folder = lakes.extension_directory(tmp_path / "ext") / f"v{duckdb.__version__}"
    ducklake = next(folder.glob("*/ducklake.duckdb_extension"))
    stmts = {"ins": "INSERT INTO l.t SELECT {d}, range FROM range(50)", "del": "DELETE FROM l.t WHERE day = {d}",
             "upd": "UPDATE l.t SET i = i + 1 WHERE day = {d}"}

    def lake(n: int) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        con.execute(f"LOAD '{ducklake}'")
        con.execute(f"ATTACH 'ducklake:{tmp_path}/m{n}.ducklake' AS l (DATA_PATH '{tmp_path}/d{n}/')")
        con.execute("CREATE TABLE l.t (day INTEGER, i INTEGER)")
        con.execute("ALTER TABLE l.t SET PARTITIONED BY (day)")
        con.execute("INSERT INTO l.t SELECT day, range FROM range(100), (VALUES (1), (2)) v(day)")
        return con

    def race(n: int, first: str, then: str) -> str:
        con = lake(n)
        a, b = con.cursor(), con.cursor()
        a.execute("BEGIN")
        b.execute("BEGIN")
        for step in first.split("+"):
            a.execute(stmts[step].format(d=1))
        for step in then.split("+"):
            b.execute(stmts[step].format(d=2))
        a.execute("COMMIT")
        try:
            b.execute("COMMIT")
            return "merged"
        except duckdb.Error as exc:
            assert lakes.is_transaction_conflict(exc), exc
            return "conflict"
        finally:
            a.close(), b.close(), con.close()

    cases = {("ins", "ins"): "merged", ("del", "del"): "merged", ("del", "ins"): "conflict",
             ("ins", "del"): "conflict", ("del+ins", "del+ins"): "conflict", ("upd", "ins"): "conflict"}
    got = {case: race(n, *case) for n, case in enumerate(cases)}
    assert got == cases

    # run_in_transaction: the loser runs again from BEGIN and commits; the winner's rows and its own are all there
    con = lake(99)
    other = con.cursor()

    def rebuild_day_2(c: duckdb.DuckDBPyConnection, attempt: int) -> None:
        c.execute(stmts["del"].format(d=2))
        c.execute(stmts["ins"].format(d=2))
        if attempt == 1:  # a concurrent rebuild of day 1 commits first
            other.execute("BEGIN")
            other.execute(stmts["del"].format(d=1))
            other.execute(stmts["ins"].format(d=1))
            other.execute("COMMIT")

    mine = con.cursor()
    assert lakes.run_in_transaction(mine, rebuild_day_2, wait_seconds=0.01) == (None, 2)
    assert con.execute("SELECT day, count(*) FROM l.t GROUP BY ALL ORDER BY 1").fetchall() == [(1, 50), (2, 50)]
    mine.close(), other.close(), con.close()


# -- the services: PostgreSQL (two catalogs, two roles) and moto with IAM (two buckets, two users) -------------------

@pytest.fixture(scope="module")
def lake_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a boundary worker (both domains) against the loopback services."""
    if PACKAGES_MISSING:
        pytest.skip(f"DuckDB extension packages not installed ({', '.join(PACKAGES_MISSING)}): "
                    "pip install -c constraints.txt -e .  (the production-mode dependencies of pyproject.toml)")
    from zqdata.loopback import moto_executable, moto_server, pg_bin, postgres_server, provision_lakes

    if pg_bin() is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL server missing on CI: `make test` should have installed it")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
    if moto_executable() is None:
        pytest.skip("moto_server not installed in the venv")
    started = time.monotonic()
    with postgres_server() as url, moto_server() as (hostport, _proc):
        # the catalogs, roles, buckets and IAM users of `make distributed` (zqdata/loopback.py)
        env = provision_lakes(url, hostport, tmp_path_factory.mktemp("duckdb-extensions"),
                              tmp_path_factory.mktemp("spill"))
        env["ZQ_DUCKDB_MEMORY_LIMIT"] = "1GB"
        env["_PG_PORT"] = url.rsplit(":", 1)[1].split("/")[0]  # for the tests' own attempts only
        assert lakes.lake_settings_problems(env) == []
        print(f"\n[lakes] PostgreSQL + moto (IAM) ready in {time.monotonic() - started:.1f}s")
        yield env


# -- (a) two processes, one lake ------------------------------------------------------------------------------------

def _write_partition(env: dict, day: str, rows: int, tag: str, barrier, results) -> None:
    """A worker process: replace one day of gov_platform.staging.t in one transaction (delete its rows, insert the
    new ones), holding it open until the other worker's transaction is open too, then commit; run again from BEGIN
    when DuckLake reports a conflict with the other commit (``lakes.run_in_transaction``)."""
    try:
        con = lakes.connect_lake("gov", environ=env)
        started = time.monotonic()

        def work(c: duckdb.DuckDBPyConnection, attempt: int) -> None:
            c.execute("DELETE FROM gov_platform.staging.t WHERE day = ?", [day])
            c.execute(f"INSERT INTO gov_platform.staging.t SELECT DATE '{day}', range, '{tag}-' || range, "
                      f"range * 0.5 FROM range({rows})")
            if attempt == 1:
                barrier.wait(timeout=120)  # both transactions hold uncommitted writes to the same table now

        _, attempts = lakes.run_in_transaction(con, work)
        results.put((day, "ok", attempts, round(time.monotonic() - started, 2)))
        con.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((day, f"{type(exc).__name__}: {exc}", 0, 0))


def _concurrent_round(env: dict, tag: str, rows: int) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_write_partition, args=(env, day, rows, tag, barrier, results))
             for day in ("2025-06-01", "2025-06-02")]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sorted(out)


def _hold_file(path: str, ready, release) -> None:
    con = duckdb.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER)")
    ready.set()
    release.wait(timeout=60)
    con.close()


def test_a_two_processes_write_one_gov_table_concurrently(lake_env: dict, tmp_path: Path) -> None:
    # What a single DuckDB file cannot do: a second process cannot even open it for writing.
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_file, args=(str(tmp_path / "gov_platform.duckdb"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(tmp_path / "gov_platform.duckdb"))
    finally:
        release.set()
        holder.join(60)

    con = lakes.connect_lake("gov", environ=lake_env)
    con.execute("CREATE SCHEMA IF NOT EXISTS staging")
    con.execute("CREATE TABLE IF NOT EXISTS staging.t (day DATE, i BIGINT, s VARCHAR, x DOUBLE)")
    con.execute("ALTER TABLE staging.t SET PARTITIONED BY (day)")
    # first load of two days at once: inserts only (the deletes find nothing); DuckLake merges the two commits
    first = _concurrent_round(lake_env, "first", 20_000)
    print(f"[lakes] (a) round 1 (insert) (day, outcome, attempts, seconds): {first}")
    assert [r[1:3] for r in first] == [("ok", 1), ("ok", 1)], first
    # a rerun of both days at once: each transaction deletes its day's rows and inserts anew. DuckLake refuses the
    # second commit (it inserts into a table the first one deleted from); run_in_transaction runs it again.
    second = _concurrent_round(lake_env, "rerun", 15_000)
    print(f"[lakes] (a) round 2 (replace) (day, outcome, attempts, seconds): {second}")
    assert [r[1] for r in second] == ["ok", "ok"], second
    assert min(r[2] for r in second) == 1  # the first committer never waits

    con.close()
    con = lakes.connect_lake("gov", environ=lake_env, read_only=True)
    got = con.execute("SELECT day::VARCHAR, count(*), count(DISTINCT i), min(s) FROM staging.t "
                      "GROUP BY ALL ORDER BY 1").fetchall()
    assert got == [("2025-06-01", 15_000, 15_000, "rerun-0"), ("2025-06-02", 15_000, 15_000, "rerun-0")]
    files = [r[0] for r in con.execute(
        "SELECT data_file FROM ducklake_list_files('gov_platform', 't', schema => 'staging')").fetchall()]
    assert files and all(f.startswith(f"s3://{GOV_BUCKET}/warehouse/staging/t/day=") for f in files), files
    commits = con.execute("SELECT count(*) FROM ducklake_snapshots('gov_platform') "
                          "WHERE len(list_filter(map_keys(changes), k -> k LIKE '%insert%')) > 0").fetchone()[0]
    assert commits >= 4  # four committed writers, none lost
    con.close()


# -- (b) ops cannot read gov ----------------------------------------------------------------------------------------

def test_b_ops_worker_cannot_read_gov(lake_env: dict) -> None:
    gov = lakes.connect_lake("gov", environ=lake_env)
    gov.execute("CREATE SCHEMA IF NOT EXISTS staging")
    gov.execute("CREATE OR REPLACE TABLE staging.people AS "
                "SELECT range AS id, '44120' || lpad(range::VARCHAR, 13, '0') AS id_card FROM range(1000)")
    gov_file = gov.execute("SELECT data_file FROM ducklake_list_files('gov_platform', 'people', "
                           "schema => 'staging')").fetchone()[0]
    gov.close()
    assert gov_file.startswith(f"s3://{GOV_BUCKET}/")

    ops_env = lakes.ops_environment({**os.environ, **lake_env})
    gov_secrets = {v for k, v in lake_env.items() if k.startswith("ZQ_GOV_") and v}
    assert not [k for k in ops_env if k.startswith("ZQ_GOV_")] and not gov_secrets & set(ops_env.values())
    assert lakes.lake_settings_problems(ops_env) == []
    with pytest.raises(lakes.LakeSettingsError):
        lakes.connect_lake("gov", environ=ops_env)

    ops = lakes.connect_lake("ops", environ=ops_env)
    ops.execute("CREATE SCHEMA IF NOT EXISTS desensitized")  # its own lake works
    ops.execute("CREATE OR REPLACE TABLE desensitized.people AS SELECT range AS id FROM range(100)")
    assert ops.execute("SELECT count(*) FROM ops_platform.desensitized.people").fetchone() == (100,)
    # one S3 secret, scoped to the ops data path: nothing signs a request for the gov bucket
    assert ops.execute("SELECT scope FROM duckdb_secrets() WHERE type = 's3'").fetchall() == [
        ([f"s3://{OPS_BUCKET}/warehouse/"],)]
    assert ops.execute("SELECT * FROM which_secret(?, 's3')", [gov_file]).fetchall() == []
    own = f"s3://{OPS_BUCKET}/warehouse/x.parquet"
    assert ops.execute("SELECT name FROM which_secret(?, 's3')", [own]).fetchall() == [("zq_ops_s3",)]
    # the gov data file: unsigned request to the same store -> 403
    with pytest.raises(duckdb.Error, match="403"):
        ops.execute("SELECT count(*) FROM read_parquet(?)", [gov_file]).fetchall()
    # the ops key used on the gov bucket on purpose -> 403 from the store's IAM
    key_id, secret = ops_env["ZQ_OPS_S3_KEY_ID"], ops_env["ZQ_OPS_S3_SECRET"]
    endpoint = lake_env["ZQ_S3_ENDPOINT"].split("://", 1)[1]
    ops.execute(f"CREATE SECRET misuse (TYPE s3, KEY_ID '{key_id}', SECRET '{secret}', ENDPOINT '{endpoint}', "
                f"URL_STYLE 'path', USE_SSL false, REGION 'us-east-1', SCOPE 's3://{GOV_BUCKET}/')")
    with pytest.raises(duckdb.Error, match="403"):
        ops.execute("SELECT count(*) FROM read_parquet(?)", [gov_file]).fetchall()
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=lake_env["ZQ_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=key_id, aws_secret_access_key=secret)
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.list_objects_v2(Bucket=GOV_BUCKET)
    # the gov catalog: with the ops role and password (no CONNECT on gov_catalog), or as the gov role without its
    # password (which the ops worker does not have), PostgreSQL refuses
    port = lake_env["_PG_PORT"]
    attempts = {
        "ops role": f"dbname=gov_catalog host=127.0.0.1 port={port} user=zq_ops_lake",
        "gov role": f"dbname=gov_catalog host=127.0.0.1 port={port} user=zq_gov_lake",
    }
    for who, dsn in attempts.items():
        with pytest.raises(duckdb.Error, match="permission denied|password authentication failed") as info:
            ops.execute(f"ATTACH 'ducklake:postgres:{dsn}' AS stolen_{who[:3]} "
                        f"(DATA_PATH 's3://{GOV_BUCKET}/warehouse/', META_SECRET 'zq_ops_catalog')")
        assert ops_env["ZQ_OPS_LAKE_CATALOG_PASSWORD"] not in str(info.value)
        print(f"[lakes] (b) gov catalog as {who}: {str(info.value).splitlines()[0][-120:]}")
    ops.close()


# -- (c) lake == DuckDB file ----------------------------------------------------------------------------------------

_ROWS_SQL = """
SELECT range AS id,
       DATE '2025-05-01' + (range % 30)::INTEGER AS day,
       CASE WHEN range % 7 = 0 THEN NULL ELSE '端州区-' || (range % 97) END AS district,
       (range * 1.25)::DECIMAL(18, 2) AS amount,
       range / 3.0 AS ratio,
       TIMESTAMPTZ '2025-05-01 08:00:00+08' + to_seconds(range) AS at,
       range % 2 = 0 AS flag,
       [range % 3, range % 5] AS codes,
       {{'agency': 'samr', 'n': range % 11}} AS info
FROM range({start}, {stop})
"""


def _build(con: duckdb.DuckDBPyConnection, table: str) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {table} AS " + _ROWS_SQL.format(start=0, stop=60_000))
    con.execute(f"INSERT INTO {table} " + _ROWS_SQL.format(start=60_000, stop=100_000))
    con.execute(f"DELETE FROM {table} WHERE id % 10 = 3")
    con.execute(f"UPDATE {table} SET amount = amount + 1 WHERE id % 10 = 4")


def test_c_lake_table_equals_duckdb_file(lake_env: dict, tmp_path: Path) -> None:
    plain = duckdb.connect(str(tmp_path / "gov_platform.duckdb"))
    plain.execute("CREATE SCHEMA staging")
    _build(plain, "staging.sample")
    expected = lakes.table_checksum(plain, "staging.sample")
    plain.close()

    lake = lakes.connect_lake("gov", environ=lake_env)
    lake.execute("CREATE SCHEMA IF NOT EXISTS staging")
    _build(lake, "gov_platform.staging.sample")
    # and the file's table copied through: same bytes, other path
    lake.execute(f"ATTACH '{tmp_path / 'gov_platform.duckdb'}' AS plain (READ_ONLY)")
    lake.execute("CREATE OR REPLACE TABLE gov_platform.staging.copied AS SELECT * FROM plain.staging.sample")
    lake.close()

    fresh = lakes.connect_lake("gov", environ=lake_env, read_only=True)  # read back from S3, nothing cached
    assert lakes.table_checksum(fresh, "gov_platform.staging.sample") == expected
    assert lakes.table_checksum(fresh, "gov_platform.staging.copied") == expected
    assert expected[0] == 90_000
    shuffled = duckdb.connect()
    shuffled.execute(_ROWS_SQL.format(start=0, stop=10).replace("SELECT", "CREATE TABLE a AS SELECT", 1))
    shuffled.execute("CREATE TABLE b AS SELECT * FROM a ORDER BY id DESC")
    assert lakes.table_checksum(shuffled, "a") == lakes.table_checksum(shuffled, "b")
    shuffled.execute("UPDATE b SET flag = NOT flag WHERE id = 3")
    assert lakes.table_checksum(shuffled, "a") != lakes.table_checksum(shuffled, "b")
    fresh.close()


# -- (d) dbt-duckdb into the lake -----------------------------------------------------------------------------------

PROFILE = """\
lakes_probe:
  target: gov_lake
  outputs:
    gov_lake:
      type: duckdb
      path: ":memory:"
      database: gov_platform
      schema: intermediate
      threads: 1
      config_options:
        memory_limit: "{{ env_var('ZQ_DUCKDB_MEMORY_LIMIT') }}"
        extension_directory: "{{ env_var('ZQ_DUCKDB_EXTENSION_DIR') }}"
        custom_extension_repository: "{{ env_var('ZQ_DUCKDB_EXTENSION_DIR') }}"
        autoinstall_known_extensions: false
        autoload_known_extensions: true
        allow_community_extensions: false
        lock_configuration: true
      secrets:
        - type: s3
          name: zq_lake_s3
          key_id: "{{ env_var('ZQ_LAKE_S3_KEY_ID') }}"
          secret: "{{ env_var('ZQ_LAKE_S3_SECRET') }}"
          endpoint: "{{ env_var('ZQ_LAKE_S3_ENDPOINT') }}"
          url_style: "{{ env_var('ZQ_LAKE_S3_URL_STYLE') }}"
          use_ssl: "{{ env_var('ZQ_LAKE_S3_USE_SSL') }}"
          region: "{{ env_var('ZQ_LAKE_S3_REGION') }}"
          scope: "{{ env_var('ZQ_LAKE_DATA') }}"
        - type: postgres
          name: zq_lake_catalog
          password: "{{ env_var('ZQ_LAKE_CATALOG_PASSWORD', '') }}"
      attach:
        - path: "ducklake:postgres:{{ env_var('ZQ_LAKE_CATALOG') }}"
          alias: gov_platform
          options:
            data_path: "{{ env_var('ZQ_LAKE_DATA') }}"
            meta_secret: zq_lake_catalog
"""

PROJECT = """\
name: lakes_probe
version: "1.0.0"
profile: lakes_probe
model-paths: ["models"]
macro-paths: ["macros"]
flags:
  send_anonymous_usage_stats: false
vars:
  partition_date: "2025-06-01"
models:
  lakes_probe:
    +materialized: incremental
    +incremental_strategy: zq_replace_partition
    +unique_key: _partition_date
    +on_schema_change: append_new_columns
"""

MODEL = """\
select _partition_date, agency, count(*) as records, sum(amount) as amount
from gov_platform.staging.deliveries
where _partition_date = date '{{ zq_partition_date() }}'
group by all
"""


def _dbt(project: Path, env: dict, day: str, name: str) -> subprocess.Popen:
    dbt = Path(sys.executable).parent / "dbt"
    return subprocess.Popen(
        [str(dbt), "run", "--project-dir", str(project), "--profiles-dir", str(project),
         "--target-path", str(project / f"target-{name}"), "--log-path", str(project / f"logs-{name}")],
        env={**env, "ZQ_PARTITION_DATE": day}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _run_with_step_retry(project: Path, env: dict, runs: dict[str, str], attempts: int = 4) -> dict[str, int]:
    """Start the dbt runs {name: day} at once; a run that DuckLake refused at commit (a concurrent partition's
    delete, see ``lakes.run_in_transaction``) is run again, as the step's retry policy would. -> attempts per run."""
    used = dict.fromkeys(runs, 0)
    pending = dict(runs)
    while pending:
        procs = {name: _dbt(project, env, day, name) for name, day in pending.items()}
        for name, proc in procs.items():
            used[name] += 1
            out, _ = proc.communicate(timeout=300)
            if proc.returncode == 0:
                del pending[name]
                continue
            assert "Transaction conflict" in out and used[name] < attempts, out[-4000:]
    return used


def test_d_dbt_builds_an_incremental_model_into_the_lake(lake_env: dict, tmp_path: Path) -> None:
    project = tmp_path / "probe"
    (project / "models").mkdir(parents=True)
    (project / "macros").mkdir()
    for macro in ("partition.sql", "replace_partition.sql"):  # the repo's own partition contract
        shutil.copy(REPO / "dbt_project" / "macros" / macro, project / "macros" / macro)
    (project / "dbt_project.yml").write_text(PROJECT)
    (project / "profiles.yml").write_text(PROFILE)
    (project / "models" / "int_daily_deliveries.sql").write_text(MODEL)

    con = lakes.connect_lake("gov", environ=lake_env)
    con.execute("CREATE SCHEMA IF NOT EXISTS staging")
    con.execute("CREATE OR REPLACE TABLE staging.deliveries AS SELECT DATE '2025-06-01' + (range % 3)::INTEGER "
                "AS _partition_date, ['samr', 'hrss', 'mps'][(range // 3) % 3 + 1] AS agency, range::DECIMAL(18, 2) "
                "AS amount FROM range(3000)")
    con.close()

    # the sealed step's environment: the gov lake only, under domain-neutral names; nothing else of ZQ_/AWS_
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZQ_", "AWS_", "PG"))}
    env = {**base, **lakes.dbt_environment("gov", lake_env), "ZQ_DUCKDB_MEMORY_LIMIT": "1GB",
           "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
    assert not [k for k in env if k.startswith("ZQ_OPS_") or k.startswith("ZQ_GOV_")]

    t0 = time.monotonic()
    _finish(_dbt(project, env, "2025-06-01", "first"))  # creates the table in the lake
    t_first = time.monotonic() - t0
    con = lakes.connect_lake("gov", environ=lake_env)
    con.execute("DELETE FROM staging.deliveries WHERE _partition_date = DATE '2025-06-01' AND agency = 'mps'")
    con.close()
    t0 = time.monotonic()  # three partitions, three dbt processes at once (the rerun of 06-01 deletes rows)
    used = _run_with_step_retry(project, env, {"rerun": "2025-06-01", "day2": "2025-06-02", "day3": "2025-06-03"})
    t_parallel = time.monotonic() - t0
    print(f"[lakes] (d) dbt first run {t_first:.1f}s, three concurrent runs {t_parallel:.1f}s, attempts {used}")

    con = lakes.connect_lake("gov", environ=lake_env, read_only=True)
    got = con.execute("SELECT _partition_date::VARCHAR, agency, records, amount FROM "
                      "gov_platform.intermediate.int_daily_deliveries ORDER BY 1, 2").fetchall()
    want = con.execute("SELECT _partition_date::VARCHAR, agency, count(*), sum(amount) FROM staging.deliveries "
                       "GROUP BY ALL ORDER BY 1, 2").fetchall()
    assert got == want and len(got) == 8  # the rerun replaced 06-01 (mps gone), 06-02 and 06-03 appended
    files = con.execute("SELECT count(*) FROM ducklake_list_files('gov_platform', 'int_daily_deliveries', "
                        "schema => 'intermediate')").fetchone()[0]
    assert files >= 0  # tiny results may be inlined in the catalog (DuckLake's data inlining, 10 rows)
    con.close()


# -- (e) the statements the platform runs that DuckLake restricts, in the forms that work on both ------------------

@pytest.mark.parametrize("storage", ["duckdb_file", "ducklake"])
def test_e_delete_and_upsert_forms_run_on_a_file_and_on_a_lake(storage: str, lake_env: dict, tmp_path: Path) -> None:
    """DuckLake has no DELETE … RETURNING, no rowid, no PRIMARY KEY / ON CONFLICT: revocation's deletes select their
    rows first and the leak gate's identifier index is kept unique by update-then-insert. Same results on both."""
    import datetime as dt

    import pyarrow as pa

    from zqdata import revocation
    from zqdata.leakgate import INDEX_SCHEMA, INDEX_TABLE

    con = (duckdb.connect(str(tmp_path / "ops.duckdb")) if storage == "duckdb_file"
           else lakes.connect_lake("ops", environ=lake_env))
    con.execute("CREATE SCHEMA IF NOT EXISTS desensitized")
    con.execute("CREATE SCHEMA IF NOT EXISTS products")
    con.execute("CREATE OR REPLACE TABLE desensitized.people AS SELECT 'L' || range AS _lineage_id, "
                "DATE '2025-06-01' + (range % 2)::INTEGER AS _partition_date, 'p' || (range % 5) AS subject "
                "FROM range(10)")
    con.execute("CREATE OR REPLACE TABLE products.flows AS SELECT DATE '2025-06-01' + (range % 2)::INTEGER "
                "AS _partition_date, ['L' || range, 'L' || (range + 1)] AS _source_lineage_ids FROM range(0, 10, 2)")
    purged = revocation.purge_subjects(con, "desensitized", "people", "subject",
                                       pa.table({"subject": ["p0", "p1", "p2"]}))
    assert sorted(purged.column("_lineage_id").to_pylist()) == ["L3", "L4", "L8", "L9"]
    assert con.execute("SELECT count(*) FROM desensitized.people").fetchone() == (6,)
    days = revocation.purge_product(con, "flows", purged)  # rows built from L3/L4 (row 2: L2,L3; row 4: L4,L5), L8
    assert sorted(days) == [dt.date(2025, 6, 1)] * 3
    assert con.execute("SELECT count(*) FROM products.flows").fetchone() == (2,)
    assert revocation.empty_table(con, "desensitized", "people").num_rows == 6
    assert con.execute("SELECT count(*) FROM desensitized.people").fetchone() == (0,)

    # the identifier index's upsert: an earlier day wins, a value is held once
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {INDEX_SCHEMA}")
    con.execute(f"CREATE OR REPLACE TABLE {INDEX_SCHEMA}.{INDEX_TABLE} (kind VARCHAR NOT NULL, value VARCHAR NOT NULL, "
                "first_day DATE NOT NULL)")
    con.execute(f"INSERT INTO {INDEX_SCHEMA}.{INDEX_TABLE} VALUES ('name', 'A', DATE '2025-06-03')")
    con.execute("CREATE OR REPLACE TEMP TABLE _zq_new_identifiers AS SELECT * FROM (VALUES ('name', 'A', "
                "DATE '2025-06-01'), ('name', 'B', DATE '2025-06-02')) v(kind, value, first_day)")

    def upsert(c: duckdb.DuckDBPyConnection, _attempt: int) -> None:
        c.execute(f"UPDATE {INDEX_SCHEMA}.{INDEX_TABLE} AS i SET first_day = n.first_day FROM _zq_new_identifiers n "
                  "WHERE i.kind = n.kind AND i.value = n.value AND n.first_day < i.first_day")
        c.execute(f"INSERT INTO {INDEX_SCHEMA}.{INDEX_TABLE} SELECT * FROM _zq_new_identifiers n WHERE NOT EXISTS "
                  f"(SELECT 1 FROM {INDEX_SCHEMA}.{INDEX_TABLE} i WHERE i.kind = n.kind AND i.value = n.value)")

    lakes.run_in_transaction(con, upsert)
    lakes.run_in_transaction(con, upsert)  # idempotent
    assert con.execute(f"SELECT value, first_day::VARCHAR FROM {INDEX_SCHEMA}.{INDEX_TABLE} ORDER BY 1").fetchall() \
        == [("A", "2025-06-01"), ("B", "2025-06-02")]
    con.close()
