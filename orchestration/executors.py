"""Where the nightly job's steps run, chosen by the environment only (issue 16).

- Embedded default (``ZQ_EXECUTOR`` unset or ``in_process``): Dagster's in-process executor, as before.
- ``ZQ_EXECUTOR=celery``: dagster-celery's executor; each step is a Celery task on the queue of its security domain,
  broker and result backend from ``ZQ_CELERY_BROKER`` / ``ZQ_CELERY_BACKEND`` (Redis; the backend defaults to the
  broker). Queues (``step_queue``):

  - ``gov``: steps that hold the gov domain only (the deliveries, ODS, gov dbt models, quality);
  - ``ops``: steps that hold the ops domain only (the products' dbt build, their checks, publishing) — the workers on
    this queue run with ``zqdata.lakes.ops_environment``: no gov credential at all;
  - ``boundary``: steps that read gov and write or read ops (the boundary crossing, the products' leak gates), on
    workers holding both domains and the pseudonymization key.

Workers: ``celery -A orchestration.celery_app worker -Q <queues>`` (orchestration/distributed.py starts two).
"""

from __future__ import annotations

import os

import dagster as dg

EXECUTOR_ENV = "ZQ_EXECUTOR"
BROKER_ENV = "ZQ_CELERY_BROKER"
BACKEND_ENV = "ZQ_CELERY_BACKEND"
EXECUTORS = ("in_process", "celery")

GOV_QUEUE, OPS_QUEUE, BOUNDARY_QUEUE = "gov", "ops", "boundary"
QUEUES = (GOV_QUEUE, OPS_QUEUE, BOUNDARY_QUEUE)
# Steps that open both domains (they declare the ops pool and take the gov pool inside, orchestration/pools.py)
BOUNDARY_STEPS = frozenset({"boundary_crossing"})
BOUNDARY_SUFFIXES = ("_no_personal_data_leak",)
# Steps without a warehouse pool that still belong to a domain: the landing zone's deliveries are gov's
GOV_STEPS = frozenset({"source_agency_deliveries"})
OPS_PREFIXES = ("ops__", "publish_", "ops_")


def executor_kind(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    kind = (env.get(EXECUTOR_ENV) or "in_process").strip().lower()
    if kind not in EXECUTORS:
        raise ValueError(f"未知的执行器 unknown {EXECUTOR_ENV}={kind!r} (expected {' or '.join(EXECUTORS)})")
    return kind


def step_queue(step_key: str, pool: str | None, tagged: str | None = None) -> str:
    """The Celery queue of a step: its ``dagster-celery/queue`` tag when set, else by the domains it opens."""
    from orchestration.pools import GOV_DBT_POOL, GOV_POOL, OPS_POOL

    if tagged:
        return tagged
    if step_key in BOUNDARY_STEPS or step_key.endswith(BOUNDARY_SUFFIXES):
        return BOUNDARY_QUEUE
    if pool in (GOV_POOL, GOV_DBT_POOL) or step_key in GOV_STEPS:
        return GOV_QUEUE
    if pool == OPS_POOL or step_key.startswith(OPS_PREFIXES):
        return OPS_QUEUE
    return BOUNDARY_QUEUE  # unknown: the worker that holds both domains


def _submit_step(app, plan_context, step, queue: str, priority: int, known_state):
    """dagster-celery's ``_submit_task`` with the queue's own name as routing key: dagster-celery sends
    ``<queue>.execute_plan``, which only its ``dagster`` queue (declared with the pattern ``dagster.#``) receives; a
    worker started with ``-Q gov`` binds the key ``gov``, and the broker would drop the task."""
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import pack_value
    from dagster_celery.tasks import create_task

    args = ExecuteStepArgs(
        job_origin=plan_context.reconstructable_job.get_python_origin(),
        run_id=plan_context.dagster_run.run_id,
        step_keys_to_execute=[step.key],
        instance_ref=plan_context.instance.get_ref(),
        retry_mode=plan_context.executor.retries.for_inner_plan(),
        known_state=known_state,
        print_serialized_events=True,
    )
    signature = create_task(app).si(execute_step_args_packed=pack_value(args),
                                    executable_dict=plan_context.reconstructable_job.to_dict())
    return StepResult(signature.apply_async(priority=priority, queue=queue, routing_key=queue), plan_context, step)


class StepResult:
    """A step's Celery result as dagster-celery's loop reads it (``ready``/``get``/``revoke``), with one difference:
    a task that ended without the step's own events (its worker process killed: ``WorkerLostError``; any error the
    task raised outside the step) becomes the step's STEP_FAILURE, recorded with its cause.

    dagster-celery instead keeps the error aside and stops submitting steps, so a run with steps left that do not
    depend on the lost one never completes (found by the worker-kill test: the run hung until its bound). With the
    failure event the run goes on as after any failed step: downstream skipped, the rest run, the run fails, and its
    partition is re-run."""

    def __init__(self, result, plan_context, step) -> None:
        self._result, self._context, self._step = result, plan_context, step

    def ready(self) -> bool:
        return self._result.ready()

    def revoke(self, *args, **kwargs):
        return self._result.revoke(*args, **kwargs)

    def get(self, *args, **kwargs):
        import sys

        from celery.exceptions import TaskRevokedError
        from dagster._core.events import DagsterEvent
        from dagster._core.execution.plan.objects import ErrorSource, StepFailureData
        from dagster._serdes import serialize_value
        from dagster._utils.error import serializable_error_info_from_exc_info

        try:
            return self._result.get(*args, **kwargs)
        except TaskRevokedError:
            raise
        except Exception:
            error = serializable_error_info_from_exc_info(sys.exc_info())
            event = DagsterEvent.step_failure_event(
                self._context.for_step(self._step),
                StepFailureData(error=error, user_failure_data=None, error_source=ErrorSource.FRAMEWORK_ERROR),
                message=f"步骤 {self._step.key} 的 Celery 任务未完成（工作进程丢失？） the Celery task of step "
                        f"{self._step.key} ended without its result: {error.message.strip().splitlines()[-1]}")
            return [serialize_value(event)]


def _celery_executor_def() -> dg.ExecutorDefinition:
    from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG
    from dagster._core.execution.retries import RetryMode

    class DomainQueueCeleryExecutor(CeleryExecutor):
        """dagster-celery's executor; each step goes to the queue of its domain (``step_queue``)."""

        def execute(self, plan_context, execution_plan):
            from dagster_celery.core_execution_loop import core_celery_execution_loop

            def submit(app, context, step, _default_queue, priority, known_state):
                queue = step_queue(step.key, step.pool, step.tags.get(DAGSTER_CELERY_QUEUE_TAG))
                return _submit_step(app, context, step, queue, priority, known_state)

            return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=submit)

    @dg.executor(name="zq_celery", config_schema=CELERY_CONFIG,
                 requirements=dg.multiple_process_executor_requirements())
    def zq_celery_executor(init_context):
        cfg = init_context.executor_config
        return DomainQueueCeleryExecutor(broker=cfg.get("broker"), backend=cfg.get("backend"),
                                         config_source=cfg.get("config_source"), include=cfg.get("include"),
                                         retries=RetryMode.from_config(cfg["retries"]))

    return zq_celery_executor


def celery_app_args(environ: dict[str, str] | None = None) -> dict:
    """Broker and backend of the executor and of the workers, from the environment (one source for both)."""
    env = os.environ if environ is None else environ
    broker = env.get(BROKER_ENV)
    if not broker:
        raise ValueError(f"{EXECUTOR_ENV}=celery needs {BROKER_ENV} (e.g. redis://127.0.0.1:6379/0)")
    return {"broker": broker, "backend": env.get(BACKEND_ENV) or broker}


def nightly_retry_policy() -> dg.RetryPolicy | None:
    """None on the embedded default (a DuckDB file has one writer: nothing races). With the warehouse on DuckLakes,
    steps of concurrent days may commit to one table at once; DuckLake refuses the later commit when the two do not
    merge (``zqdata.lakes.run_in_transaction``), and the step's writes are idempotent per partition: the step runs
    again, with jittered backoff."""
    from zqdata.lakes import warehouse_mode

    if warehouse_mode() != "ducklake":
        return None
    return dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def nightly_executor() -> dg.ExecutorDefinition:
    """The nightly job's executor: in-process (embedded default) or Celery (``ZQ_EXECUTOR=celery``)."""
    if executor_kind() == "in_process":
        return dg.in_process_executor
    celery_app_args()  # fail at load with a clear message when the broker is not set
    return _celery_executor_def().configured(
        {"broker": {"env": BROKER_ENV},
         "backend": {"env": BACKEND_ENV if os.environ.get(BACKEND_ENV) else BROKER_ENV},
         # a step killed with its worker is not retried by Celery: Dagster's run fails, the partition is re-run
         "config_source": {"task_acks_late": False, "broker_connection_retry_on_startup": True}},
        name="zq_celery")
