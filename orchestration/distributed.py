"""`make distributed`: the production mode on one machine (issue 16), started, used for a 3-day backfill, and stopped.

Started here, on loopback, and stopped again whatever happens (also on failure, Ctrl-C or SIGTERM):

- PostgreSQL (Debian's package; installed when missing and root): the Dagster instance's storage, the operational
  database (issues, notifications, audit) and the two lakes' catalog databases, each lake with a role of its own;
- ``moto_server`` as the S3 stand-in for MinIO: one bucket and one IAM user per domain (zqdata/loopback.py);
- Redis (Debian's package) as the Celery broker and result backend;
- two Celery workers (orchestration/celery_app.py): ``boundary`` (queues gov + boundary, both domains and the
  pseudonymization key) and ``ops`` (queue ops, started with ``lakes.ops_environment``: no gov credential);
- an ephemeral ``DAGSTER_HOME`` on PostgreSQL storage.

The backfill: one run of ``nightly_aggregation`` per day, all started at once (tagged as one backfill); each run's
steps go to the workers' queues, so the days run in parallel on the two workers. Then the summary per day.

``python -m orchestration.distributed --date 2025-06-01 --days 3``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zqdata import lakes, loopback
from zqdata.settings import repo_root

WORKERS = {  # name -> (queues, domains held)
    "boundary": ("gov,boundary", ("gov", "ops")),
    "ops": ("ops", ("ops",)),
}
WORKER_CONCURRENCY = 2
POOL_LIMIT = 8  # a DuckLake takes concurrent writers: the pools only bound how many steps open a domain at once


class Stopped(Exception):
    """SIGTERM/SIGINT: unwind, so every `finally` stops what it started."""


def _raise_stopped(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


# -- services ------------------------------------------------------------------------------------------------------

def missing_packages() -> list[str]:
    """Debian packages of the services that are not installed."""
    missing = []
    if loopback.pg_bin() is None:
        missing.append("postgresql")
    if loopback.redis_executable() is None:
        missing.append("redis-server")
    return missing


def install_services() -> list[str]:
    """Install PostgreSQL / Redis from Debian's packages when missing and we may (root, apt-get); what is still
    missing afterwards."""
    missing = missing_packages()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True)
    return missing_packages()


def _create_databases(pg_url: str, names: list[str]) -> None:
    con, _ = loopback.pg_admin(pg_url)
    try:
        for name in names:
            con.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        con.close()


def instance_yaml(pg_url: str) -> str:
    """The ephemeral instance: PostgreSQL storage, pools sized for concurrent lake writers."""
    url = pg_url.rsplit("/", 1)[0] + "/dagster"  # postgresql+psycopg2:// (the driver installed)
    return (f"telemetry:\n  enabled: false\nstorage:\n  postgres:\n    postgres_url: \"{url}\"\n"
            f"concurrency:\n  pools:\n    default_limit: {POOL_LIMIT}\n")


@dataclass
class Platform:
    """The environment of the distributed platform, and where its files live."""

    env: dict[str, str]
    base: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def worker_env(self, domains: tuple[str, ...]) -> dict[str, str]:
        return lakes.domain_environment(domains, self.env)


@contextlib.contextmanager
def platform(base: Path | None = None, rows_per_day: int | None = None,
             environ: Mapping[str, str] | None = None) -> Iterator[Platform]:
    """PostgreSQL, moto (two lakes) and Redis on loopback, an ephemeral DAGSTER_HOME and data folder; the environment
    of a process holding both domains. Everything is stopped and removed on exit."""
    owned = base is None
    base = Path(base or tempfile.mkdtemp(prefix="zq-distributed-"))
    try:
        with loopback.postgres_server() as pg_url, loopback.moto_server() as (s3, _moto), \
                loopback.redis_server() as redis_url:
            lake_env = loopback.provision_lakes(pg_url, s3, base / "duckdb-extensions", base / "spill")
            _create_databases(pg_url, ["dagster", "zq_opdb"])
            home = base / "dagster_home"
            home.mkdir(parents=True, exist_ok=True)
            (home / "dagster.yaml").write_text(instance_yaml(pg_url))
            env = {k: v for k, v in (os.environ if environ is None else environ).items()
                   if not k.startswith(("ZQ_GOV_", "ZQ_OPS_", "DAGSTER_HOME"))}
            env.update(lake_env)
            env.update({
                "DAGSTER_HOME": str(home),
                "ZQ_DATA_DIR": str(base / "data"),
                "ZQ_STORE_BACKEND": "local",
                "ZQ_OPDB_URL": pg_url.rsplit("/", 1)[0] + "/zq_opdb",
                "ZQ_EXECUTOR": "celery",
                "ZQ_CELERY_BROKER": redis_url,
                "ZQ_CELERY_BACKEND": redis_url,
                "PYTHONPATH": os.pathsep.join(p for p in (str(repo_root()), env.get("PYTHONPATH", "")) if p),
            })
            env.setdefault("ZQ_SIMULATE", "1")
            if rows_per_day is not None:
                env["ZQ_SIM_ROWS_PER_DAY"] = str(rows_per_day)
            problems = lakes.lake_settings_problems(env)
            if problems:
                raise RuntimeError("; ".join(problems))
            # the instance's tables and the pools' rows are created once, before runs and workers open them at the
            # same time (three runs initializing a pool's limit at once on PostgreSQL abort each other's transaction)
            subprocess.run([sys.executable, "-m", "orchestration.distributed", "--prepare-instance"], cwd=repo_root(),
                           env=env, check=True, capture_output=True)
            yield Platform(env=env, base=base)
    finally:
        if owned:
            shutil.rmtree(base, ignore_errors=True)


# -- workers -------------------------------------------------------------------------------------------------------

def celery_executable() -> str:
    beside = Path(sys.executable).parent / "celery"
    return str(beside) if beside.exists() else "celery"


def start_worker(p: Platform, name: str, log: Path | None = None) -> subprocess.Popen:
    """One Celery worker on its queues with the environment of its domains (the ops worker: no gov variable)."""
    queues, domains = WORKERS[name]
    env = p.worker_env(domains)
    out = open(log or p.base / f"worker-{name}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [celery_executable(), "-A", "orchestration.celery_app", "worker", "-Q", queues, "-n", f"{name}@%h",
         "-c", str(WORKER_CONCURRENCY), "--pool", "prefork", "-l", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-E"],
        cwd=repo_root(), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    p.workers[name] = proc
    return proc


def worker_ready(p: Platform, name: str) -> bool:
    """The worker answers a ping over the broker."""
    from celery import Celery

    app = Celery("ping", broker=p.env["ZQ_CELERY_BROKER"], backend=p.env["ZQ_CELERY_BACKEND"])
    try:
        replies = app.control.ping(timeout=2.0) or []
    finally:
        app.close()
    return any(name + "@" in next(iter(r)) for r in replies)


def wait_for_workers(p: Platform, bound: float = 180.0) -> None:
    deadline = time.monotonic() + bound
    for name, proc in p.workers.items():
        while not worker_ready(p, name):
            if proc.poll() is not None:
                raise RuntimeError(f"Celery worker {name} exited ({proc.returncode}): see {p.base}/worker-{name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Celery worker {name} not ready after {bound:.0f}s")
            time.sleep(0.5)


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group (a Celery worker and its pool children), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def workers(p: Platform) -> Iterator[Platform]:
    try:
        for name in WORKERS:
            start_worker(p, name)
        wait_for_workers(p)
        yield p
    finally:
        for proc in p.workers.values():
            stop_process(proc)


# -- runs ----------------------------------------------------------------------------------------------------------

def reconstructable_nightly():
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from orchestration.jobs import NIGHTLY_JOB

    repo = ReconstructableRepository.for_module("orchestration.definitions", "defs",
                                                working_directory=str(repo_root()))
    return repo.get_reconstructable_job(NIGHTLY_JOB)


def prepare_instance() -> None:
    """Create the instance's storage and each warehouse pool's limit row (``POOL_LIMIT``) in this one process."""
    from orchestration.instance import ensure_instance
    from orchestration.pools import BOUNDARY_POOL, GOV_DBT_POOL, POOLS

    instance = ensure_instance()
    for pool in POOLS:
        instance.event_log_storage.set_concurrency_slots(pool, POOL_LIMIT)
    for pool in (GOV_DBT_POOL, BOUNDARY_POOL):  # one gov dbt build, one crossing at a time (pools.py)
        instance.event_log_storage.set_concurrency_slots(pool, 1)


def run_day(day: str, backfill_id: str) -> dict:
    """One night's run through the Celery executor (in this process: the run's orchestrator); its outcome."""
    import dagster as dg

    from orchestration.instance import ensure_instance
    from orchestration.ordering import BACKFILL_TAG

    instance = ensure_instance()
    started = time.monotonic()
    with dg.execute_job(reconstructable_nightly(), instance=instance,
                        tags={"dagster/partition": day, BACKFILL_TAG: backfill_id}, raise_on_error=False) as result:
        failures = [f"{e.step_key}: {e.event_specific_data.error.message.strip().splitlines()[-1]}"
                    for e in result.all_events if e.is_step_failure]
        for e in result.all_events:
            error = getattr(e.event_specific_data, "error", None) if e.event_type_value == "PIPELINE_FAILURE" else None
            while error is not None:
                failures.append(f"run: {error.message.strip()}")
                error = error.cause
        failures += [f"engine: {e.message}" for e in result.all_events
                     if e.event_type_value == "ENGINE_EVENT" and e.engine_event_data
                     and e.engine_event_data.error is not None]
        # A run that has ended holds no pool slot, even one claimed for a step whose worker died mid-step (it would
        # keep the partition's re-run waiting on a pool of limit 1 for ever)
        instance.event_log_storage.free_concurrency_slots_for_run(result.run_id)
        return {"day": day, "run_id": result.run_id, "success": result.success,
                "seconds": round(time.monotonic() - started, 1), "failures": failures}


def run_notifications() -> dict:
    """The notification run the alert sensor requests after a night in the service (orchestration/sensors.py): the
    agencies' messages delivered, retried, escalated. It uses the operational database only (in this process)."""
    from assets.governance.issues import NOTIFY_JOB
    from orchestration.definitions import defs
    from orchestration.instance import ensure_instance

    result = defs().resolve_job_def(NOTIFY_JOB).execute_in_process(instance=ensure_instance(), raise_on_error=False)
    return {"run_id": result.run_id, "success": result.success}


def _orchestrator(p: Platform, args: list[str]) -> subprocess.Popen:
    """A process of this module with the environment of both domains (a run's orchestrator, the notification run)."""
    return subprocess.Popen([sys.executable, "-m", "orchestration.distributed", *args], cwd=repo_root(),
                            env=p.worker_env(("gov", "ops")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def start_run_process(p: Platform, day: str, backfill_id: str) -> subprocess.Popen:
    return _orchestrator(p, ["--run-day", day, "--backfill-id", backfill_id])


def backfill(p: Platform, days: list[str], bound: float = 3600.0) -> list[dict]:
    """All days at once, each run in a process of its own; their outcomes, in day order."""
    backfill_id = uuid.uuid4().hex[:8]
    procs = {day: start_run_process(p, day, backfill_id) for day in days}
    outcomes = []
    try:
        for day, proc in procs.items():
            out, err = proc.communicate(timeout=bound)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                outcomes.append({"day": day, "success": False, "run_id": None, "seconds": None,
                                 "failures": [f"run process exited {proc.returncode}: {err.strip()[-2000:]}"]})
            else:
                outcomes.append(json.loads(lines[-1]))
        # then the agencies' messages, as the alert sensor requests them after a night in the service
        proc = procs["notify"] = _orchestrator(p, ["--notify"])
        out, err = proc.communicate(timeout=bound)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines or not json.loads(lines[-1])["success"]:
            outcomes.append({"day": "notify", "success": False, "run_id": None, "seconds": None,
                             "failures": [f"notification run failed ({proc.returncode}): {err.strip()[-2000:]}"]})
    finally:
        for proc in procs.values():
            stop_process(proc, grace=10)
    return outcomes


def step_hosts(run_id: str) -> dict[str, str]:
    """step key -> the Celery worker that executed it (from the run's engine events)."""
    from dagster import DagsterEventType

    from orchestration.instance import ensure_instance

    hosts = {}
    for record in ensure_instance().all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        meta = event.engine_event_data.metadata if event and event.engine_event_data else {}
        worker = meta.get("Celery worker")
        if worker is not None and event.step_key:
            hosts[event.step_key] = getattr(worker, "value", worker)
    return hosts


def summary_lines(outcomes: list[dict]) -> list[str]:
    from orchestration.nightly import stage_row_counts
    from zqdata import issues, opdb

    lines = ["== 分布式回填 distributed backfill: " + ", ".join(o["day"] for o in outcomes) + " =="]
    engine = opdb.get_engine()
    for o in outcomes:
        state = "成功 success" if o["success"] else "失败 FAILED"
        lines.append(f"-- {o['day']}: {state} in {o['seconds']}s (run {o['run_id']})")
        lines += [f"   failed step {f}" for f in o["failures"]]
        if o["run_id"]:
            by_worker: dict[str, int] = {}
            for host in step_hosts(o["run_id"]).values():
                by_worker[host.split("@")[0]] = by_worker.get(host.split("@")[0], 0) + 1
            lines.append("   steps per worker: " + ", ".join(f"{w} {n}" for w, n in sorted(by_worker.items())))
        day = dt.date.fromisoformat(o["day"])
        rows = stage_row_counts(day)
        lines.append(f"   tables {len(rows)}, rows of the partition {sum(n for _, _, n in rows):,}")
        open_issues = [i for i in issues.list_issues(engine, partition_date=day) if i.status not in issues.CLOSED]
        lines.append(f"   open quality issues {len(open_issues)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--date", default="2025-06-01")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--rows-per-day", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the data, logs and instance in this folder (default: a temporary one, removed)")
    parser.add_argument("--run-day", help=argparse.SUPPRESS)
    parser.add_argument("--backfill-id", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-instance", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--notify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_instance:
        prepare_instance()
        return 0
    if args.notify:  # the notification run after the days (started by `backfill`)
        print(json.dumps(run_notifications()), flush=True)
        return 0
    if args.run_day:  # the orchestrating process of one run (started by `backfill`)
        print(json.dumps(run_day(args.run_day, args.backfill_id), ensure_ascii=False), flush=True)
        return 0

    still_missing = install_services()
    if still_missing:
        print(f"缺少服务 missing services: {', '.join(still_missing)} (apt-get install {' '.join(still_missing)} "
              "as root)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stopped)
    first = dt.date.fromisoformat(args.date)
    days = [(first + dt.timedelta(days=i)).isoformat() for i in range(args.days)]
    started = time.monotonic()
    try:
        with platform(args.keep, rows_per_day=args.rows_per_day) as p, workers(p):
            print(f"服务就绪 services ready in {time.monotonic() - started:.0f}s: PostgreSQL, S3 (moto), Redis, "
                  f"workers {', '.join(f'{n} [{WORKERS[n][0]}]' for n in WORKERS)}", flush=True)
            outcomes = backfill(p, days)
            os.environ.update(p.env)  # the summary reads the lakes and the operational DB of this platform
            print("\n".join(summary_lines(outcomes)), flush=True)
            ok = all(o["success"] for o in outcomes)
    except Stopped as exc:
        print(f"已中断 stopped ({exc}): everything started was stopped", file=sys.stderr, flush=True)
        return 130
    print(f"{'完成 done' if ok else '失败 FAILED'} in {time.monotonic() - started:.0f}s; every service stopped",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
