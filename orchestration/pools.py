"""One writer per DuckDB file, by construction: a Dagster concurrency pool per warehouse file, limit 1.

Every step that opens a warehouse file (to write, or to read: a DuckDB reader in another process conflicts with the
writer too) declares that file's pool, so runs and backfills queue on the pool instead of failing on DuckDB's lock.
The instance gives every pool the limit 1 (`concurrency.pools.default_limit` in orchestration/dagster.yaml).

Dagster gives a step one pool. The few steps that open both files (the boundary crossing, the product leak gates, a
failed product check's trace) declare the ops pool and take the gov pool inside the step (`hold_pool`): always ops
first, then gov, and no gov-only step ever takes the ops pool, so two steps can never wait on each other.
With ``ZQ_WAREHOUSE=ducklake`` (issue 16) the warehouse takes several writers: `hold_pool` holds nothing and the
distributed instance gives the pools as many slots as there are workers.
Nothing outside a run step (sensor ticks, schedules, the code server, the CLI, consumers) opens a warehouse file to
write: they use the operational database (zqdata.opdb) and published snapshots (zqdata.publish).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import dagster as dg

GOV_POOL = "zq_gov_duckdb"  # 市政务大数据平台 gov_platform.duckdb
OPS_POOL = "zq_ops_duckdb"  # 运营服务平台 ops_platform.duckdb
POOLS = (GOV_POOL, OPS_POOL)
# Lake mode only (ZQ_WAREHOUSE=ducklake): the days of a backfill run side by side, but one gov dbt build at a time.
# dbt's store-failures tables (dq_audit.<test>) are one per test, shared by every day: a day's build and the collection
# of its failures into quality.findings (same step) must not interleave with another day's build — found by the
# distributed equality test (a day's failing rows lost). Limit 1, set by orchestration/distributed.prepare_instance.
GOV_DBT_POOL = "zq_gov_dbt"


def gov_dbt_pool() -> str:
    """The pool of the gov dbt step: the gov file's (embedded) or GOV_DBT_POOL (lakes)."""
    from zqdata.lakes import warehouse_mode

    return GOV_POOL if warehouse_mode() == "duckdb" else GOV_DBT_POOL
# Lake mode only: one boundary crossing at a time. A crossing reads the consent state last applied to each ops table
# (revocation.kept_*) and rewrites it with the table in one transaction; under DuckLake's snapshot isolation two
# concurrent crossings would each apply their own, and the later commit's older view of the table wins — found by the
# distributed equality test (day-3 SME rows missing). Limit 1, set by orchestration/distributed.prepare_instance.
BOUNDARY_POOL = "zq_boundary"


def boundary_pool() -> str:
    """The pool of the boundary crossing: the ops file's (embedded; it takes the gov pool inside) or BOUNDARY_POOL."""
    from zqdata.lakes import warehouse_mode

    return OPS_POOL if warehouse_mode() == "duckdb" else BOUNDARY_POOL


CLAIM_POLL_MAX_SECONDS = 5.0  # how often a waiting step asks again at most (Dagster's own back-off starts lower)
# A claim made inside a step that already holds the other pool goes ahead of queued steps: it is holding a file
HOLD_PRIORITY = 1_000_000


@contextlib.contextmanager
def hold_pool(context: dg.OpExecutionContext | dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
              pool: str) -> Iterator[None]:
    """Hold a slot of `pool` for the rest of the block, inside a step that already holds its declared pool.

    Uses the instance's own slot accounting (the same the executor uses for the declared pool), so the slot shows in
    the UI's concurrency page and is freed when the block ends — or, if the process dies, with the run's slots.
    """
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    from zqdata.lakes import warehouse_mode

    if warehouse_mode() == "ducklake":
        # A DuckLake takes concurrent writers (commits that lost a race are retried): nothing to serialize here; the
        # declared pools of a distributed instance are sized for the workers (orchestration/distributed.py)
        yield
        return
    op_ctx = getattr(context, "op_execution_context", context)
    run = op_ctx.run
    key = f"{op_ctx.get_step_execution_context().step.key}@{pool}"
    storage = op_ctx.instance.event_log_storage
    with InstanceConcurrencyContext(op_ctx.instance, run) as slots:
        waited, delay = 0.0, 0.1
        while not slots.claim(pool, key, step_priority=HOLD_PRIORITY):
            # The executor queues a claim for each ready step of this run; steps run one at a time, so a queued step
            # of this run that is assigned the slot cannot take it before this step ends, and this step waits for it:
            # a deadlock. Such an assignment is given back (the step asks again later); this claim goes first.
            for pending in storage.get_concurrency_info(pool).pending_steps:
                if pending.run_id == run.run_id and pending.step_key != key and pending.assigned_timestamp:
                    storage.free_concurrency_slot_for_step(run.run_id, pending.step_key)
            if waited == 0.0:
                op_ctx.log.info(f"等待并发池 {pool}（另一运行正在使用该数据库文件） waiting for pool {pool}")
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, CLAIM_POLL_MAX_SECONDS)
        try:
            yield
        finally:
            slots.free_step(key)
