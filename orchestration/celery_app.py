"""The Celery app of the workers (``ZQ_EXECUTOR=celery``):
``celery -A orchestration.celery_app worker -Q gov,boundary``.

Broker and backend from the same environment variables as the executor (orchestration/executors.py), so a worker and
the runs it serves cannot disagree; dagster-celery's own settings (prefetch 1, priorities) as its CLI would set them.
"""

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from orchestration.executors import celery_app_args

app = make_app(CeleryExecutor.for_cli(**celery_app_args()).app_args())

execute_plan = create_task(app)
