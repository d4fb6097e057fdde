"""The mode switches of issue 16 without services: the embedded default is untouched, the distributed mode is chosen
by the environment only (warehouse, dbt target, executor, queues, retry policy, pools)."""

from __future__ import annotations

import pytest

from zqdata import dbt_guard

LAKE_ENV = {
    "ZQ_WAREHOUSE": "ducklake",
    "ZQ_GOV_LAKE_CATALOG": "dbname=gov_catalog host=db.example user=zq_gov_lake",
    "ZQ_GOV_LAKE_CATALOG_PASSWORD": "gov-catalog-password-0001",
    "ZQ_GOV_LAKE_DATA": "s3://zq-gov-lake/warehouse/",
    "ZQ_GOV_S3_KEY_ID": "GOVKEYID0001",
    "ZQ_GOV_S3_SECRET": "gov-s3-secret-0001",
    "ZQ_OPS_LAKE_CATALOG": "dbname=ops_catalog host=db.example user=zq_ops_lake",
    "ZQ_OPS_LAKE_CATALOG_PASSWORD": "ops-catalog-password-0001",
    "ZQ_OPS_LAKE_DATA": "s3://zq-ops-lake/warehouse/",
    "ZQ_OPS_S3_KEY_ID": "OPSKEYID0001",
    "ZQ_OPS_S3_SECRET": "ops-s3-secret-0001",
    "ZQ_S3_ENDPOINT": "http://minio.example:9000",
}


@pytest.fixture
def lake_mode(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name, value in LAKE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ZQ_DUCKDB_EXTENSION_DIR", str(tmp_path / "ext"))


def test_embedded_default_is_unchanged(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import dagster as dg

    from orchestration.executors import nightly_executor, nightly_retry_policy
    from zqdata import warehouse

    for name in ("ZQ_WAREHOUSE", "ZQ_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert dbt_guard.dbt_target("gov") == "gov" and dbt_guard.dbt_target("ops") == "ops"
    assert dbt_guard.profile_env("gov", "/d/gov.duckdb", "1GB", "2025-06-01") == {
        "ZQ_GOV_DB": "/d/gov.duckdb", "ZQ_DUCKDB_MEMORY_LIMIT": "1GB", "DBT_USE_COLORS": "false",
        "DBT_LOG_FORMAT_FILE": "debug", "ZQ_PARTITION_DATE": "2025-06-01"}
    assert nightly_executor() is dg.in_process_executor and nightly_retry_policy() is None
    assert not warehouse.lake_mode() and not warehouse.exists("gov", tmp_path / "absent.duckdb")
    with warehouse.connect("gov", tmp_path / "w" / "gov.duckdb") as con:  # the file, as before
        assert con.execute("SELECT current_database(), current_setting('memory_limit')").fetchone()[0] == "gov"


def test_lake_mode_selects_the_lake_targets_with_one_domain_each(lake_mode) -> None:
    assert dbt_guard.dbt_target("gov") == "gov_lake" and dbt_guard.dbt_target("ops") == "ops_lake"
    ops = dbt_guard.profile_env("ops_lake", "/ignored", "1GB", "2025-06-01")
    assert ops["ZQ_LAKE_S3_KEY_ID"] == "OPSKEYID0001" and ops["ZQ_LAKE_DATA"] == "s3://zq-ops-lake/warehouse/"
    assert not {v for k, v in LAKE_ENV.items() if k.startswith("ZQ_GOV_")} & set(ops.values())
    sealed = dbt_guard.sealed_env({**LAKE_ENV, "PATH": "/usr/bin"}, ops)
    assert not [k for k in sealed if k.startswith(("ZQ_GOV_", "ZQ_OPS_"))]
    from orchestration.executors import nightly_retry_policy

    assert nightly_retry_policy().max_retries == 3


def test_profiles_have_a_lake_target_per_domain() -> None:
    import yaml

    from zqdata.settings import repo_root

    outputs = yaml.safe_load((repo_root() / "dbt_project" / "profiles.yml").read_text())["zhaoqing"]["outputs"]
    for domain in ("gov", "ops"):
        lake = outputs[f"{domain}_lake"]
        assert lake["database"] == lake["attach"][0]["alias"] == f"{domain}_platform"
        assert lake["threads"] == 1 and lake["config_options"]["lock_configuration"] is True
        assert outputs[domain]["config_options"]["enable_external_access"] is False  # embedded: as before


@pytest.mark.parametrize("step, pool, queue", [
    ("gov__ods__water_usage", "zq_gov_duckdb", "gov"),
    ("gov_dbt_models", "zq_gov_duckdb", "gov"),
    ("source_agency_deliveries", None, "gov"),
    ("boundary_crossing", "zq_ops_duckdb", "boundary"),
    ("ops__products__ops_transit_ridership_no_personal_data_leak", "zq_ops_duckdb", "boundary"),
    ("ops_dbt_products", "zq_ops_duckdb", "ops"),
    ("publish_ops_transit_ridership", "zq_ops_duckdb", "ops"),
    ("ops__products__ops_transit_ridership_authorization_in_force", None, "ops"),
    ("something_new", None, "boundary"),
])
def test_each_step_goes_to_the_queue_of_its_domains(step: str, pool: str | None, queue: str) -> None:
    from orchestration.executors import step_queue

    assert step_queue(step, pool) == queue


def test_celery_mode_needs_a_broker_and_uses_the_domain_queue_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.executors import nightly_executor

    monkeypatch.setenv("ZQ_EXECUTOR", "celery")
    monkeypatch.delenv("ZQ_CELERY_BROKER", raising=False)
    with pytest.raises(ValueError, match="ZQ_CELERY_BROKER"):
        nightly_executor()
    monkeypatch.setenv("ZQ_CELERY_BROKER", "redis://127.0.0.1:6379/0")
    assert nightly_executor().name == "zq_celery"
    monkeypatch.setenv("ZQ_EXECUTOR", "kubernetes")
    with pytest.raises(ValueError, match="unknown ZQ_EXECUTOR"):
        nightly_executor()


def test_hold_pool_holds_nothing_on_a_lake(lake_mode) -> None:
    from orchestration.pools import hold_pool

    with hold_pool(object(), "zq_gov_duckdb"):  # no instance is asked: a lake takes concurrent writers
        pass


def test_a_model_that_lost_a_lake_commit_race_fails_the_step_instead_of_holding_its_dataset_back() -> None:
    from zqdata.quality.model_failures import lost_commit_race

    raced = {"results": [{"unique_id": "model.zhaoqing.stg_x", "status": "error", "message":
                          "Runtime Error\n  TransactionContext Error: Failed to commit: Transaction conflict - "
                          "attempting to create table \"stg_x\" in schema \"staging\""}]}
    assert lost_commit_race(raced)
    assert lost_commit_race({"results": [{"status": "error", "message": "Runtime Error in model int_x\n  Catalog Error: "
                                          "Table with name \"int_x\" already exists!"}]})
    assert lost_commit_race({"results": [{"status": "error", "message": (  # DuckLake's own retries exhausted
        "Runtime Error in test stg_x__required__y\n  TransactionContext Error: Failed to commit: Failed to commit "
        "DuckLake transaction.\n  Exceeded the maximum retry count of 10 set by the ducklake_max_retry_count setting."
        "\n  ... ERROR:  duplicate key value violates unique constraint \"ducklake_snapshot_pkey\"")}]})
    assert not lost_commit_race({"results": [{"status": "error", "message": "Conversion Error: '…'"}]})


def test_a_backfill_is_one_range_run_embedded_and_one_run_per_day_on_the_lakes(monkeypatch: pytest.MonkeyPatch,
                                                                             lake_mode) -> None:
    """Issue 15 (embedded: the fixed costs once per range) and issue 16 (lakes: days side by side on the workers)."""
    import dagster as dg

    from orchestration.ranges import nightly_backfill_policy

    assert nightly_backfill_policy() == dg.BackfillPolicy.multi_run(1)
    monkeypatch.delenv("ZQ_WAREHOUSE")
    assert nightly_backfill_policy() == dg.BackfillPolicy.single_run()


def test_one_gov_dbt_build_at_a_time_on_the_lakes_and_on_the_gov_queue(monkeypatch: pytest.MonkeyPatch,
                                                                    lake_mode) -> None:
    """Concurrent days share dbt's store-failures tables: on the lakes the gov dbt step has a pool of its own (limit 1,
    distributed.prepare_instance), still sent to the gov queue; embedded it stays in the gov file's pool."""
    from orchestration.executors import GOV_QUEUE, step_queue
    from orchestration.pools import GOV_DBT_POOL, GOV_POOL, gov_dbt_pool

    assert gov_dbt_pool() == GOV_DBT_POOL
    assert step_queue("gov_dbt_models", GOV_DBT_POOL) == GOV_QUEUE
    monkeypatch.delenv("ZQ_WAREHOUSE")
    assert gov_dbt_pool() == GOV_POOL


def test_one_crossing_at_a_time_on_the_lakes(monkeypatch: pytest.MonkeyPatch, lake_mode) -> None:
    """Concurrent crossings would each apply their own view of the ops consent state (revocation.kept_*): on the
    lakes the crossing has a pool of its own (limit 1), still on the boundary queue; embedded, the ops file's pool."""
    from orchestration.executors import BOUNDARY_QUEUE, step_queue
    from orchestration.pools import BOUNDARY_POOL, OPS_POOL, boundary_pool

    assert boundary_pool() == BOUNDARY_POOL
    assert step_queue("boundary_crossing", BOUNDARY_POOL) == BOUNDARY_QUEUE
    monkeypatch.delenv("ZQ_WAREHOUSE")
    assert boundary_pool() == OPS_POOL


def test_a_backfills_days_side_by_side_judge_history_in_day_order() -> None:
    """The findings step (GX baselines read the days before) of a day waits while a run of the SAME backfill for an
    earlier day is in flight and has not finished its findings; other backfills, later days, finished or failed runs
    do not hold it (orchestration/ordering.py; the distributed equality test found day 3 judged on one earlier day)."""
    import dagster as dg
    from dagster._core.events import DagsterEvent, StepSuccessData

    from orchestration.ordering import earlier_days_pending

    @dg.op
    def quality_findings() -> None: ...

    @dg.job
    def nightly() -> None:
        quality_findings()

    with dg.instance_for_test() as instance:
        def run(day: str, backfill: str, status=dg.DagsterRunStatus.STARTED) -> dg.DagsterRun:
            r = instance.create_run_for_job(nightly, tags={"dagster/partition": day, "dagster/backfill": backfill})
            instance.run_storage.handle_run_event(r.run_id, DagsterEvent(
                event_type_value={dg.DagsterRunStatus.STARTED: "PIPELINE_START",
                                  dg.DagsterRunStatus.FAILURE: "PIPELINE_FAILURE"}[status], job_name="nightly"))
            return instance.get_run_by_id(r.run_id)

        day1, day2, day3 = run("2025-06-01", "b1"), run("2025-06-02", "b1"), run("2025-06-03", "b1")
        run("2025-05-31", "other")  # another backfill's earlier day
        assert earlier_days_pending(instance, day3, "quality_findings") == ["2025-06-01", "2025-06-02"]
        assert earlier_days_pending(instance, day1, "quality_findings") == []
        instance.report_dagster_event(DagsterEvent(
            event_type_value="STEP_SUCCESS", job_name="nightly", step_key="quality_findings",
            event_specific_data=StepSuccessData(duration_ms=1.0)), day1.run_id)
        assert earlier_days_pending(instance, day3, "quality_findings") == ["2025-06-02"]
        instance.run_storage.handle_run_event(day2.run_id, DagsterEvent(event_type_value="PIPELINE_FAILURE",
                                                                        job_name="nightly"))
        assert earlier_days_pending(instance, day3, "quality_findings") == []
        alone = instance.create_run_for_job(nightly, tags={"dagster/partition": "2025-06-09"})
        assert earlier_days_pending(instance, alone, "quality_findings") == []  # not a backfill: never waits


def test_on_the_lakes_a_days_dbt_findings_are_collected_with_its_build(monkeypatch: pytest.MonkeyPatch,
                                                                        lake_mode) -> None:
    """dbt's store-failures tables hold the last build's rows, whichever day: with days side by side on the lakes,
    another day's build may come between a day's build and its findings step (the distributed equality test lost a
    day-3 finding so); embedded, only a range run's days follow one another so."""
    from zqdata.quality.dbt_findings import collected_with_build

    assert collected_with_build(single_day=True) and collected_with_build(single_day=False)
    monkeypatch.delenv("ZQ_WAREHOUSE")
    assert not collected_with_build(single_day=True) and collected_with_build(single_day=False)
