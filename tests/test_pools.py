"""One writer per DuckDB file by construction: pools on every warehouse step, a second pool held inside the few steps
that read both files, and a sensor that only reads the event log and requests runs with run keys."""

from __future__ import annotations

import datetime as dt
import threading
import time

import dagster as dg
import pytest

from orchestration.pools import GOV_POOL, OPS_POOL, POOLS, hold_pool


@pytest.fixture(scope="module")
def repo():
    from orchestration.definitions import defs

    return defs().get_repository_def()


def test_every_step_that_opens_a_warehouse_file_declares_a_pool(repo):
    seen = {}
    for job in repo.get_all_jobs():
        for node in job.graph.nodes:
            d = node.definition
            if {"warehouse", "dbt"} & set(d.required_resource_keys):
                seen[d.name] = d.pool
    assert seen, "no warehouse step found"
    missing = sorted(name for name, pool in seen.items() if pool not in POOLS)
    assert not missing, f"steps that open a warehouse file without a pool: {missing}"
    # what writes the ops DB (and the steps that read both files) is on the ops pool; the rest of the gov path on gov
    publish_steps = [name for name in seen if name.startswith("publish_")]
    assert publish_steps and {seen[n] for n in publish_steps} == {OPS_POOL}
    assert seen["boundary_crossing"] == seen["ops_dbt_products"] == OPS_POOL
    assert seen["gov_dbt_models"] == seen["gov__quality__issues"] == GOV_POOL


def test_the_alert_sensor_needs_no_resource_and_the_notification_job_opens_no_warehouse(repo):
    sensor = repo.get_sensor_def("quality_issue_alert_sensor")
    assert not sensor.required_resource_keys
    notify = repo.get_job("quality_issue_notifications")
    assert not any({"warehouse", "dbt"} & set(n.definition.required_resource_keys) for n in notify.graph.nodes)


def test_nightly_instance_gives_each_pool_one_slot():
    import yaml

    from zqdata.settings import repo_root

    cfg = yaml.safe_load((repo_root() / "orchestration" / "dagster.yaml").read_text())
    assert cfg["concurrency"]["pools"]["default_limit"] == 1


def _gov_held_by_another_run(instance: dg.DagsterInstance):
    """The gov pool with one slot, held by a step of another run; returns the event log storage."""
    storage = instance.event_log_storage
    storage.set_concurrency_slots(GOV_POOL, 1)
    assert storage.claim_concurrency_slot(GOV_POOL, "other-run", "gov_dbt_models").is_claimed
    return storage


def _run_in_thread(job: dg.JobDefinition, instance: dg.DagsterInstance) -> tuple[threading.Thread, dict]:
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", job.execute_in_process(instance=instance)),
                              daemon=True)
    runner.start()
    return runner, result


def test_hold_pool_waits_while_another_step_holds_the_file():
    """A step on the ops pool that also needs gov waits while another run's step holds the gov slot."""
    entered = threading.Event()

    @dg.op(pool=OPS_POOL)
    def reads_both(context):
        with hold_pool(context, GOV_POOL):
            entered.set()

    @dg.job(executor_def=dg.in_process_executor)
    def both():
        reads_both()

    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = _gov_held_by_another_run(instance)
        runner, result = _run_in_thread(both, instance)
        deadline = time.monotonic() + 300
        while not storage.get_concurrency_info(GOV_POOL).pending_steps:  # the step asks for the gov slot ...
            assert time.monotonic() < deadline and runner.is_alive(), "the step never asked for the gov pool"
            time.sleep(0.05)
        assert not entered.is_set()  # ... and does not open gov while another step holds it
        storage.free_concurrency_slot_for_step("other-run", "gov_dbt_models")
        runner.join(timeout=300)
        assert entered.is_set() and result["r"].success
        info = storage.get_concurrency_info(GOV_POOL)
        assert info.active_slot_count == 0 and not info.pending_steps  # released when the block ended


def test_hold_pool_does_not_wait_for_a_slot_assigned_to_its_own_runs_queued_step():
    """Found in the service test: the in-process executor queues a claim for every ready step of the run; when another
    run frees the gov slot, Dagster assigns it to the first queued step — possibly a gov step of the very run that is
    busy in a both-files step waiting for gov. That step cannot run until this one ends: a deadlock. hold_pool takes
    such an assignment back and goes first (its claim has a high priority)."""
    entered = threading.Event()

    @dg.op(pool=OPS_POOL)
    def reads_both(context):
        storage = context.instance.event_log_storage
        # the run's gov step queued before this step began, then assigned the slot when the other run freed it
        storage.claim_concurrency_slot(GOV_POOL, context.run_id, "gov_step_of_this_run")
        storage.free_concurrency_slot_for_step("other-run", "gov_dbt_models")
        assigned = [p for p in storage.get_concurrency_info(GOV_POOL).pending_steps if p.assigned_timestamp]
        assert [p.step_key for p in assigned] == ["gov_step_of_this_run"]  # the situation that used to hang
        with hold_pool(context, GOV_POOL):
            entered.set()

    @dg.job(executor_def=dg.in_process_executor)
    def both():
        reads_both()

    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        _gov_held_by_another_run(instance)
        runner, result = _run_in_thread(both, instance)
        runner.join(timeout=300)
        assert not runner.is_alive(), "hold_pool waited for a slot its own run's queued step was assigned (deadlock)"
        assert entered.is_set() and result["r"].success


def _materialize(instance, key, partition=None, **metadata):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata))


def test_sensor_plan_requests_each_piece_of_work_once():
    from assets.governance.issues import FINDINGS_KEY, ISSUES_KEY, NOTIFICATIONS_KEY, NOTIFY_JOB, SYNC_JOB
    from orchestration.sensors import plan_alert_tick

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with dg.instance_for_test() as instance:
        assert plan_alert_tick(instance, {}, now=now).run_requests(SYNC_JOB, NOTIFY_JOB) == []
        # findings recomputed outside a nightly run (no issues step in it): re-file that partition's issues
        _materialize(instance, FINDINGS_KEY, "2025-06-01")
        plan = plan_alert_tick(instance, {}, now=now)
        (req,) = plan.run_requests(SYNC_JOB, NOTIFY_JOB)
        assert (req.job_name, req.partition_key) == (SYNC_JOB, "2025-06-01")
        again = plan_alert_tick(instance, plan.cursor, now=now)  # the next tick: nothing new
        assert again.run_requests(SYNC_JOB, NOTIFY_JOB) == []
        # new issues filed: deliver the notifications, once
        _materialize(instance, ISSUES_KEY, "2025-06-01")
        plan = plan_alert_tick(instance, again.cursor, now=now)
        (req,) = plan.run_requests(SYNC_JOB, NOTIFY_JOB)
        assert req.job_name == NOTIFY_JOB and req.run_key.startswith("notify:issues:")
        cursor = plan.cursor
        assert plan_alert_tick(instance, cursor, now=now).run_requests(SYNC_JOB, NOTIFY_JOB) == []
        # a notification run left failed messages: retried after the retry interval, with one key per earlier run
        _materialize(instance, NOTIFICATIONS_KEY, retry_pending=2, next_escalation_due="")
        assert plan_alert_tick(instance, cursor, now=dt.datetime.now(dt.timezone.utc)).notify_key is None
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        retry = plan_alert_tick(instance, cursor, now=later)
        assert retry.notify_key and retry.notify_key.startswith("notify:retry:")
        assert plan_alert_tick(instance, cursor, now=later).notify_key == retry.notify_key  # same key: no duplicate run
        # everything sent, an escalation falls due: requested at that moment, not before
        due = later + dt.timedelta(hours=5)
        _materialize(instance, NOTIFICATIONS_KEY, retry_pending=0, next_escalation_due=due.isoformat())
        assert plan_alert_tick(instance, cursor, now=later).notify_key is None
        assert plan_alert_tick(instance, cursor, now=due).notify_key == f"notify:escalate:{due.isoformat()}"
