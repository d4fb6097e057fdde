"""`make bench`: the nightly path at 1/5/10 million rows a day vs the bare-DuckDB floor, days 1..N, the fixed cost of
small nights, a year of backfill and the day after it, distributed mode, code-location load.

Every measurement runs in its own child process under ``BENCH_DIR`` (default /tmp/zq-bench, never the repo), so peak
memory is per measurement. Results: docs/benchmark.json (written after each measurement) and docs/benchmark.md.
Overrides (env or flags): BENCH_SIZES / SIZES (comma-separated rows per day), BENCH_DAYS / DAYS (≥ 7 asked for),
BENCH_DAY_ROWS (rows per day of the day series), BENCH_DIR, BENCH_DATE, BENCH_YEAR_DAYS / BENCH_YEAR_ROWS /
BENCH_YEAR_AFTER_ROWS (the backfill part: 365 days of 20,000 rows, then a day of 1,000,000; it takes hours).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from zqdata.settings import TZ, repo_root

DEFAULT_SIZES = (1_000_000, 5_000_000, 10_000_000)
DEFAULT_DAYS = 7
DEFAULT_DATE = dt.date(2025, 6, 1)
DISK_FACTOR = 4.0  # landing + gov + ops + baseline copies, over the landing size (measured at 1 M: ~3×)
DEFECT_RATE = 0.01  # the simulator's default for the nightly job
FIXED_ROWS, FIXED_NIGHTS = 1_000, 4  # the fixed-cost measurement: small nights, the first one cold
YEAR_DAYS, YEAR_ROWS, YEAR_AFTER_ROWS = 365, 20_000, 1_000_000  # (b) a year of backfill, (c) the day after it
YEAR_TARGET_SECONDS = 15 * 60
# Each size is measured as this many pairs of a pipeline run and a baseline run, alternately first (ABBA): the
# machine's speed drifts by tens of percent within minutes, and one pair measured 1.19 then 1.58 for the same code
# (bench/notes.md item 26); the ratio is that of the sums.
SIZE_PAIRS = 2


# ------------------------------------------------------------------------------------------- environment


def machine() -> dict:
    """Cores, memory, CPU, versions and the load when the benchmark started (the machine may be shared)."""
    import dagster
    import duckdb

    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cores": len(os.sched_getaffinity(0)), "memory_gb": round(mem_kb / 1024 / 1024, 1), "cpu": cpu,
        "python": platform.python_version(), "duckdb": duckdb.__version__, "dagster": dagster.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "git_commit": _git_commit(),
    }  # fmt: skip


def _git_commit() -> str:
    """The commit measured (``+dirty`` when tracked files differ: other work in the tree at the time; the results
    this benchmark itself writes under docs/ do not count)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(), capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/benchmark.json", ":(exclude)docs/benchmark.md"], cwd=repo_root(),
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _env(data_dir: Path) -> dict[str, str]:
    """The child environment: its own data dir and Dagster instance; the key comes from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZQ_GOV_DB", "ZQ_OPS_DB", "ZQ_LANDING_DIR"))}
    dh = data_dir / "dagster_home"
    dh.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo_root() / "orchestration" / "dagster.yaml", dh / "dagster.yaml")
    env.update(ZQ_DATA_DIR=str(data_dir), DAGSTER_HOME=str(dh), ZQ_STORE_BACKEND="local", PYTHONUNBUFFERED="1")
    return env


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run a child to completion, output to ``log``; returns (exit code, wall seconds)."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, env=env, cwd=repo_root(), stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def simulate(data_dir: Path, day: dt.date, days: int, rows: int, log: Path) -> float:
    """Write the deliveries (and ground truth) with `zq simulate`; returns wall seconds."""
    rc, secs = _run([_bin("zq"), "simulate", "--date", day.isoformat(), "--days", str(days), "--rows-per-day",
                     str(rows), "--defect-rate", str(DEFECT_RATE)], _env(data_dir), log)
    if rc != 0:
        raise RuntimeError(f"模拟交付失败 simulation failed (rc={rc}), see {log}")
    return secs


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------------------- measurements


def measure_size(root: Path, rows: int, day: dt.date, pairs: int = SIZE_PAIRS) -> dict:
    """One size: simulate, then ``pairs`` pairs of the nightly job (child) and the baseline (child) on the same files,
    the first pair pipeline first, the next baseline first, and so on (`SIZE_PAIRS`). Each pair runs in its own data
    folder (the landing moved on), so each pipeline run is a first night, as a size run has always been (dbt keeps its
    parse state per data folder). The stage table is the first pair's; the ratios are of the pairs' sums."""
    data_dir = root / f"size-{rows}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log = data_dir / "bench.log"
    out: dict = {"rows_per_day": rows, "partition": day.isoformat(), "log": str(log), "git_commit": _git_commit(),
                 "measured_at": dt.datetime.now(TZ).isoformat(timespec="seconds")}
    out["simulate_seconds"] = round(simulate(data_dir, day, 1, rows, log), 3)
    out["landing_bytes"] = _dir_bytes(data_dir / "landing")
    runs, out["data_dirs"] = [], []
    for i in range(max(1, pairs)):
        if i:
            prev, data_dir = data_dir, root / f"size-{rows}-pair{i + 1}"
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir(parents=True)
            (prev / "landing").rename(data_dir / "landing")
            shutil.rmtree(prev / "warehouse", ignore_errors=True)  # the last pair's is kept for inspection
        out["data_dirs"].append(str(data_dir))
        runs.append(_measure_pair(data_dir, day, rows, baseline_first=i % 2 == 1))
    first = runs[0]
    out.update(pipeline_rc=first["pipeline_rc"], pipeline=first["pipeline"],
               pipeline_process_seconds=first["pipeline_process_seconds"], warehouse_bytes=first["warehouse_bytes"],
               baseline_rc=first["baseline_rc"], baseline=first["baseline"])
    out["pairs"] = [{"baseline_first": r["baseline_first"],
                     "job_seconds": r["pipeline"]["days"][0]["job_seconds"] if r["pipeline"] else None,
                     "baseline_seconds": r["baseline"]["total_seconds"] if r["baseline"] else None,
                     "peak_rss_mb": _peak_rss(r["pipeline"]["days"][0]) if r["pipeline"] else None} for r in runs]
    out.update(size_ratios(runs))
    return out


def _measure_pair(data_dir: Path, day: dt.date, rows: int, baseline_first: bool) -> dict:
    """One pipeline run and one baseline run on ``data_dir``'s landing, in the order given."""
    log, env = data_dir / "bench.log", _env(data_dir)
    out: dict = {"baseline_first": baseline_first}

    def pipeline() -> None:
        pj = data_dir / "pipeline.json"
        rc, secs = _run([sys.executable, "-m", "bench.stages", "--date", day.isoformat(), "--days", "1", "--rows",
                         str(rows), "--out", str(pj)], env, log)
        out.update(pipeline_rc=rc, pipeline=json.loads(pj.read_text(encoding="utf-8")) if pj.exists() else None,
                   pipeline_process_seconds=round(secs, 3), warehouse_bytes=_dir_bytes(data_dir / "warehouse"))

    def baseline() -> None:
        bj = data_dir / "baseline.json"
        rc, _ = _run([sys.executable, "-m", "bench.baseline", "--date", day.isoformat(), "--landing",
                      str(data_dir / "landing"), "--work", str(data_dir / "baseline"), "--out", str(bj)], env, log)
        out.update(baseline_rc=rc, baseline=json.loads(bj.read_text(encoding="utf-8")) if bj.exists() else None)
        shutil.rmtree(data_dir / "baseline" / "db", ignore_errors=True)

    for step in ((baseline, pipeline) if baseline_first else (pipeline, baseline)):
        step()
    return out


def _peak_rss(day: dict) -> float:
    """A measured night's peak RSS: the job's, or a stage's when higher (MB)."""
    return max(day.get("peak_rss_mb") or 0, max(((v.get("peak_rss_mb") or 0) for v in day["stages"].values()),
                                                default=0))


def size_ratios(runs: list[dict]) -> dict:
    """Pipeline ÷ baseline over the pairs where both succeeded: the whole job and each stage, as ratios of sums."""
    ok = [r for r in runs if r.get("pipeline") and r.get("baseline")]
    if not ok:
        return {}
    days, bases = [r["pipeline"]["days"][0] for r in ok], [r["baseline"] for r in ok]
    out = {"ratio_total": round(sum(d["job_seconds"] for d in days) / sum(b["total_seconds"] for b in bases), 2),
           "ratio_by_stage": {}}
    for s in bases[0]["stages"]:
        pipe = [d["stages"][s]["seconds"] for d in days if s in d["stages"]]
        base = [b["stages"][s]["seconds"] for b in bases if s in b["stages"]]
        if len(pipe) == len(base) == len(ok) and sum(base) > 0:
            out["ratio_by_stage"][s] = round(sum(pipe) / sum(base), 2)
    return out


def measure_days(root: Path, rows: int, first: dt.date, days: int, name: str = "days") -> dict:
    """Days 1..N in sequence in one child (history accumulates in the same warehouse)."""
    data_dir = root / name
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log = data_dir / "bench.log"
    sim = simulate(data_dir, first, days, rows, log)
    pj = data_dir / "pipeline.json"
    rc, _ = _run([sys.executable, "-m", "bench.stages", "--date", first.isoformat(), "--days", str(days), "--rows",
                  str(rows), "--out", str(pj)], _env(data_dir), log)
    res = json.loads(pj.read_text(encoding="utf-8")) if pj.exists() else {"days": []}
    per_day = [{"day": i + 1, "partition": d["partition"], "job_seconds": d["job_seconds"], "success": d["success"],
                "peak_rss_mb": d["peak_rss_mb"], "stages": {k: v["seconds"] for k, v in d["stages"].items()},
                "steps": {w["step"]: w["seconds"] for w in d.get("steps", [])}}
               for i, d in enumerate(res["days"])]
    growth = None
    if len(per_day) >= 2:
        growth = round(per_day[-1]["job_seconds"] / per_day[0]["job_seconds"] - 1, 3)
    return {"rows_per_day": rows, "days": per_day, "rc": rc, "simulate_seconds": round(sim, 3),
            "git_commit": _git_commit(), "measured_at": dt.datetime.now(TZ).isoformat(timespec="seconds"),
            "day_n_vs_day_1": growth, "warehouse_bytes": _dir_bytes(data_dir / "warehouse"), "log": str(log)}


def measure_fixed_cost(root: Path, first: dt.date, rows: int = FIXED_ROWS, nights: int = FIXED_NIGHTS) -> dict:
    """The fixed cost of a night: small nights (1,000 rows) one after another in one process, as in a long-running code
    location; night 1 pays the process's first-use costs (imports, dbt's first parse), the later nights are *warm*.
    The figure is the median warm night, whole job and per stage and step."""
    res = measure_days(root, rows, first, nights, name="fixed")
    warm = [d for d in res["days"] if d["day"] >= 2 and d["success"]]

    def median(xs: list[float]) -> float | None:
        xs = sorted(x for x in xs if x is not None)
        return round(xs[len(xs) // 2], 3) if xs else None

    res["warm_job_seconds"] = median([d["job_seconds"] for d in warm])
    res["warm_stages"] = {s: median([d["stages"].get(s) for d in warm]) for s in STAGE_ORDER
                          if any(s in d["stages"] for d in warm)}
    return res


def fresh_day(data_dir: Path, day: dt.date, rows: int) -> dict | None:
    """One night of ``rows`` on ``day`` in a fresh data folder (warehouse and Dagster instance): its `bench.stages`
    summary, None when it did not run."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log, pj = data_dir / "bench.log", data_dir / "day1.json"
    simulate(data_dir, day, 1, rows, log)
    _run([sys.executable, "-m", "bench.stages", "--date", day.isoformat(), "--days", "1", "--rows", str(rows), "--out",
          str(pj)], _env(data_dir), log)
    shutil.rmtree(data_dir / "landing", ignore_errors=True)
    days = json.loads(pj.read_text(encoding="utf-8")).get("days") if pj.exists() else None
    return days[0] if days and days[0].get("success") else None


def measure_year(root: Path, first: dt.date, days: int, rows: int, after_rows: int) -> dict:
    """(b) A backfill of `days` days at `rows` rows/day as `zq history` runs it (range runs of
    `orchestration.ranges.range_days_for` days, the deliveries simulated inside the runs), wall time and per day; (c)
    the day after it at `after_rows` rows in the same warehouse and Dagster instance, against day 1: the same day's
    deliveries of that size on a fresh warehouse and instance, measured right after it with the same code (the `sizes`
    part's day 1 may be of another commit)."""
    from orchestration.ranges import range_days_for

    range_days = range_days_for(rows, days)

    data_dir = root / "year"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log, out = data_dir / "bench.log", data_dir / "backfill.json"
    env = _env(data_dir)
    rc, wall = _run([sys.executable, "-m", "bench.range_backfill", "--date", first.isoformat(), "--days", str(days),
                     "--rows", str(rows), "--mode", "range", "--range-days", str(range_days), "--data-dir",
                     str(data_dir), "--out", str(out)], env, log)
    backfill = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    res: dict = {"days": days, "rows_per_day": rows, "range_days": range_days, "rc": rc,
                 "wall_seconds": backfill.get("wall_seconds"), "process_seconds": round(wall, 1),
                 "seconds_per_day": backfill.get("seconds_per_day"), "runs": backfill.get("runs"),
                 "success": backfill.get("success"), "stage_seconds": backfill.get("stage_seconds"),
                 "git_commit": _git_commit(), "measured_at": dt.datetime.now(TZ).isoformat(timespec="seconds"),
                 "warehouse_bytes": _dir_bytes(data_dir / "warehouse"), "log": str(log)}
    if after_rows and rc == 0:
        day = first + dt.timedelta(days=days)
        simulate(data_dir, day, 1, after_rows, log)
        pj = data_dir / "after.json"
        rc_after, _ = _run([sys.executable, "-m", "bench.stages", "--date", day.isoformat(), "--days", "1", "--rows",
                            str(after_rows), "--out", str(pj)], env, log)
        after = (json.loads(pj.read_text(encoding="utf-8")).get("days") or [None])[0] if pj.exists() else None
        day_1 = fresh_day(root / "year-day1", day, after_rows)
        res["after"] = {"partition": day.isoformat(), "rows_per_day": after_rows, "rc": rc_after,
                        "job_seconds": after and after["job_seconds"], "success": bool(after and after["success"]),
                        "stages": after and {k: v["seconds"] for k, v in after["stages"].items()},
                        "day_1_job_seconds": day_1 and day_1["job_seconds"],
                        "day_1_stages": day_1 and {k: v["seconds"] for k, v in day_1["stages"].items()}}
        if after and day_1 and after["success"]:
            res["after"]["vs_day_1"] = round(after["job_seconds"] / day_1["job_seconds"], 3)
    return res


def measure_distributed(root: Path, rows: int, day: dt.date, sizes: list[dict]) -> dict:
    """The night of ``rows`` in the production mode on this machine (issue 16): `make distributed`'s platform
    (PostgreSQL, moto as S3, Redis, two Celery workers, two DuckLakes) for one day, on deliveries simulated before, as
    the embedded sizes are; compared with the embedded night of the same size (``sizes``) when it was measured."""
    import re

    base = root / f"distributed-{rows}"
    shutil.rmtree(base, ignore_errors=True)
    (base / "data").mkdir(parents=True)
    log = base / "bench.log"
    out: dict = {"rows_per_day": rows, "partition": day.isoformat(), "workers": 2, "log": str(log),
                 "git_commit": _git_commit(), "measured_at": dt.datetime.now(TZ).isoformat(timespec="seconds")}
    out["simulate_seconds"] = round(simulate(base / "data", day, 1, rows, log), 3)
    env = {**os.environ, "ZQ_SIMULATE": "0", "PYTHONUNBUFFERED": "1"}
    rc, secs = _run([sys.executable, "-m", "orchestration.distributed", "--date", day.isoformat(), "--days", "1",
                     "--keep", str(base)], env, log)
    out["rc"], out["wall_seconds"] = rc, round(secs, 1)  # services started and stopped included
    text = log.read_text(encoding="utf-8", errors="replace")
    ready = re.search(r"services ready in (\d+)s", text)
    run = re.search(r"-- \S+: (成功 success|失败 FAILED) in ([\d.]+)s", text)
    out["services_seconds"] = int(ready.group(1)) if ready else None
    out["run_seconds"] = float(run.group(2)) if run else None
    out["success"] = bool(run and run.group(1).startswith("成功"))
    embedded = next((x for x in sizes if x.get("rows_per_day") == rows and x.get("pipeline")), None)
    if embedded and out["run_seconds"]:
        out["embedded_job_seconds"] = embedded["pipeline"]["days"][0]["job_seconds"]
        out["embedded_measured_at"] = embedded.get("measured_at")
        out["ratio_vs_embedded"] = round(out["run_seconds"] / out["embedded_job_seconds"], 2)
    shutil.rmtree(base / "data" / "landing", ignore_errors=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: bytes | None = None, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
        return resp.status


def measure_code_location(root: Path, limit: float = 180.0) -> dict:
    """`dagster definitions validate`, the in-process defs() call, and the webserver's first answers."""
    data_dir = root / "codeloc"
    data_dir.mkdir(parents=True, exist_ok=True)
    env, log = _env(data_dir), data_dir / "bench.log"
    out: dict = {}
    rc, secs = _run([_bin("dagster"), "definitions", "validate", "-w", "workspace.yaml"], env, log)
    out["definitions_validate_seconds"], out["definitions_validate_rc"] = round(secs, 3), rc
    probe = ("import json, time; t0 = time.perf_counter(); import orchestration.definitions as m; "
             "t1 = time.perf_counter(); d = m.defs(); t2 = time.perf_counter(); "
             "n = len(list(d.resolve_asset_graph().get_all_asset_keys())); "
             "print(json.dumps({'import_seconds': round(t1 - t0, 3), 'defs_call_seconds': round(t2 - t1, 3), 'assets': n}))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=repo_root(), capture_output=True, text=True)
    out["in_process_wall_seconds"] = round(time.perf_counter() - start, 3)
    try:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        out["in_process_error"] = proc.stderr[-2000:]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("a", encoding="utf-8") as fh:
        start = time.perf_counter()
        web = subprocess.Popen([_bin("dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                               env=env, cwd=repo_root(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.perf_counter() - start < limit:
                try:
                    if _http(f"{base}/server_info", timeout=2) == 200:
                        out["ui_server_info_seconds"] = round(time.perf_counter() - start, 3)
                        break
                except OSError:
                    time.sleep(0.2)
            query = json.dumps({"query": "{ assetNodes { assetKey { path } dependencyKeys { path } } }"}).encode()
            while "ui_server_info_seconds" in out and time.perf_counter() - start < limit:
                try:
                    t0 = time.perf_counter()
                    req = urllib.request.Request(f"{base}/graphql", data=query,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        body = json.loads(resp.read())
                    nodes = (body.get("data") or {}).get("assetNodes")
                    if nodes:
                        out["ui_asset_graph_seconds"] = round(time.perf_counter() - start, 3)
                        out["ui_asset_graph_query_seconds"] = round(time.perf_counter() - t0, 3)
                        out["ui_asset_nodes"] = len(nodes)
                        break
                except OSError:
                    pass
                time.sleep(0.2)  # the code location may still be loading
        finally:
            os.killpg(web.pid, signal.SIGTERM)  # the webserver we started and its code-server child, by our pid
            try:
                web.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(web.pid, signal.SIGKILL)
    return out


# ------------------------------------------------------------------------------------------- report


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}" if abs(v) < 1 else f"{v:,.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def _ratio(v: float | None) -> str:
    """A ratio as measured (two decimals): compared with a target such as 1.3, one decimal would hide a miss."""
    return "–" if v is None else f"{v:.2f}"


STAGE_ORDER = ("landing", "ingest", "checks", "dbt", "boundary", "products", "alerting", "orchestration_overhead")


def render_markdown(results: dict) -> str:
    """docs/benchmark.md from the JSON results."""
    m = results.get("machine", {})
    lines = [
        "# 基准测试 Benchmark: the nightly path vs a bare-DuckDB floor",
        "",
        f"Generated by `make bench` (`python -m bench.run`) at {results.get('finished_at') or results.get('started_at')}. "
        "Numbers are measurements, not assertions; no test checks a timing.",
        "",
        f"**Machine**: {m.get('cores')} cores, {m.get('memory_gb')} GB memory, {m.get('cpu')}; Python {m.get('python')}, "
        f"DuckDB {m.get('duckdb')}, Dagster {m.get('dagster')}; commit {m.get('git_commit', '?')}. "
        f"Load average at start {m.get('load_average_at_start')} "
        "(the machine was shared with other work during the run, so absolute times are noisy).",
        "",
        "Method: `zq simulate` writes each size's deliveries (1 % defective rows, default seed) to a fresh data dir under "
        f"`{results.get('bench_dir')}`; a child process runs `nightly_aggregation` in-process on them (landing only "
        "observes); stage times come from the run's event log (STEP_START → STEP_SUCCESS/FAILURE per op, ops mapped to "
        "stages), memory from a 0.1 s sampler of VmRSS of the process plus its children (dbt). *alerting* is the step that files "
        "the issues and queues the agencies' messages. The **baseline** (`bench/baseline.py`) is one process doing the same work "
        "in DuckDB SQL: read the delivered files, the ingestion contract as SQL, dbt's own compiled SQL for the models and "
        "tests, dataset-level checks and scores, the registry's mask rules and consent filter, the leak scan, the products.",
        "",
        "## Per size",
        "",
    ]
    for r in results.get("sizes", []):
        p = (r.get("pipeline") or {}).get("days", [{}])[0] if r.get("pipeline") else {}
        b = r.get("baseline") or {}
        paired = len(r.get("pairs") or []) > 1
        ratio_part = "" if paired else f"; **pipeline ÷ baseline = {_ratio(r.get('ratio_total'))}**"
        lines += [
            f"### {r['rows_per_day']:,} rows/day",
            "",
            f"Measured {r.get('measured_at', '?')} at commit {r.get('git_commit', '?')}.",
            "",
            *_pairs_lines(r),
            f"{'First pair: p' if paired else 'P'}ipeline job {_fmt(p.get('job_seconds'), ' s')} "
            f"(success: {p.get('success')}), peak RSS "
            f"{_fmt(p.get('peak_rss_mb'), ' MB')}; baseline {_fmt(b.get('total_seconds'), ' s')}, peak RSS "
            f"{_fmt(b.get('peak_rss_mb'), ' MB')}{ratio_part}. "
            f"Simulation {_fmt(r.get('simulate_seconds'), ' s')}; landing {_fmt(r.get('landing_bytes', 0) / 1e6, ' MB')}, "
            f"warehouse {_fmt(r.get('warehouse_bytes', 0) / 1e6, ' MB')}.",
            "",
            f"| stage | pipeline s | rows/s | peak RSS MB (self + children) | baseline s | "
            f"{'ratio (all pairs)' if paired else 'ratio'} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        stages = p.get("stages", {})
        for s in STAGE_ORDER:
            if s not in stages and s not in b.get("stages", {}):
                continue
            ps, bs = stages.get(s, {}), b.get("stages", {}).get(s, {})
            mem = (f"{_fmt(ps.get('peak_rss_mb'))} ({_fmt(ps.get('peak_self_mb'))} + {_fmt(ps.get('peak_children_mb'))})"
                   if "peak_rss_mb" in ps else "–")
            lines.append(f"| {s} | {_fmt(ps.get('seconds'))} | {_fmt(ps.get('rows_per_s'))} | {mem} | "
                         f"{_fmt(bs.get('seconds'))} | {_fmt(r.get('ratio_by_stage', {}).get(s))} |")
        total_rps = round(r["rows_per_day"] / p["job_seconds"]) if p.get("job_seconds") else None
        lines += [f"| **total (job)** | **{_fmt(p.get('job_seconds'))}** | {_fmt(total_rps)} | {_fmt(p.get('peak_rss_mb'))} | "
                  f"**{_fmt(b.get('total_seconds'))}** | **{_ratio(r.get('ratio_total'))}** |"]
        lines.append("")
        if p.get("failed_checks"):
            lines += [f"Failed checks ({len(p['failed_checks'])}): " + ", ".join(f"`{c}`" for c in p["failed_checks"][:8])
                      + (" …" if len(p["failed_checks"]) > 8 else ""), ""]
    if results.get("size_limit_note"):
        lines += [f"Note: {results['size_limit_note']}", ""]
    d = results.get("days")
    if d:
        lines += [
            f"## Days 1..{len(d['days'])} at {d['rows_per_day']:,} rows/day (history accumulates)",
            "",
            f"Measured {d.get('measured_at', '?')} at commit {d.get('git_commit', '?')}, all days in one process "
            "(like a long-running code server; day 1 pays first-use costs).",
            "",
            "| day | partition | job s | ingest | checks | dbt | boundary | products | alerting | peak RSS MB |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in d["days"]:
            st = x["stages"]
            lines.append(f"| {x['day']} | {x['partition']} | {_fmt(x['job_seconds'])} | "
                         + " | ".join(_fmt(st.get(s)) for s in ("ingest", "checks", "dbt", "boundary", "products", "alerting"))
                         + f" | {_fmt(x['peak_rss_mb'])} |")
        g1, g2 = _growth(d["days"])
        lines += ["", f"Day {len(d['days'])} vs day 1: {_fmt(None if g1 is None else 100 * g1, ' %')}; vs day 2 (day 1 also "
                  f"pays the process's first-use costs, e.g. importing Great Expectations): "
                  f"{_fmt(None if g2 is None else 100 * g2, ' %')}. Trend over days 2..{len(d['days'])} "
                  f"(least squares): {_fmt(None if _trend(d['days']) is None else 100 * _trend(d['days']), ' %')} of the "
                  "mean day per day. Single days move ±20 % with the shared machine's load.", ""]
    f = results.get("fixed_cost")
    if f:
        warm = [x for x in f["days"] if x["day"] >= 2 and x["success"]]
        steps: dict[str, list[float]] = {}
        for x in warm:
            for step, secs in (x.get("steps") or {}).items():
                steps.setdefault(step, []).append(secs)
        top = sorted(((sorted(v)[len(v) // 2], k) for k, v in steps.items()), reverse=True)[:12]
        lines += [
            f"## Fixed cost: nights of {f['rows_per_day']:,} rows",
            "",
            f"Measured {f.get('measured_at', '?')} at commit {f.get('git_commit', '?')}: {len(f['days'])} nights one after "
            "another in one process (a warm code location: night 1 pays the first-use costs). At this size nearly all "
            "of a night is fixed cost.",
            "",
            "| night | job s | " + " | ".join(s for s in STAGE_ORDER) + " |",
            "|---:|---:|" + "---:|" * len(STAGE_ORDER),
        ]
        for x in f["days"]:
            lines.append(f"| {x['day']}{'' if x['day'] >= 2 else ' (cold)'} | {_fmt(x['job_seconds'])} | "
                         + " | ".join(_fmt(x["stages"].get(s)) for s in STAGE_ORDER) + " |")
        lines += ["", f"Median warm night: **{_fmt(f.get('warm_job_seconds'), ' s')}**. Its slowest steps (median s): "
                  + ", ".join(f"`{k}` {_fmt(v)}" for v, k in top) + ".", ""]
    y = results.get("year")
    if y:
        a_ = y.get("after") or {}
        stages = y.get("stage_seconds") or {}
        lines += [
            f"## A backfill of {y['days']} days at {y['rows_per_day']:,} rows/day, and the day after it",
            "",
            f"Measured {y.get('measured_at', '?')} at commit {y.get('git_commit', '?')}: `python -m bench.range_backfill "
            f"--mode range --range-days {y.get('range_days')}` in a fresh data folder ({y.get('runs')} range runs, the "
            "deliveries simulated inside the runs as `zq history` does; wall time includes the notification runs), "
            f"then day {y['days'] + 1} at {a_.get('rows_per_day', 0):,} rows in the same warehouse and instance "
            "(`bench.stages`).",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| backfill wall time | {_fmt(y.get('wall_seconds'), ' s')} |",
            f"| per day | {_fmt(y.get('seconds_per_day'), ' s')} |",
            f"| succeeded | {'yes' if y.get('success') else 'no (see ' + y.get('log', 'the log') + ')'} |",
            "| stage seconds, summed over the runs | " + ", ".join(f"{k} {_fmt(v)}" for k, v in stages.items()) + " |",
            f"| warehouse after it | {_fmt((y.get('warehouse_bytes') or 0) / 1e6, ' MB')} |",
            f"| day {y['days'] + 1} at {a_.get('rows_per_day', 0):,} rows, job | {_fmt(a_.get('job_seconds'), ' s')} |",
            f"| the same day on a fresh warehouse (day 1), same code, job | {_fmt(a_.get('day_1_job_seconds'), ' s')} |",
            f"| ratio | {'–' if a_.get('vs_day_1') is None else format(a_['vs_day_1'], '.3f')} |",
            *([f"| stage seconds, day {y['days'] + 1} / day 1 | " + ", ".join(
                f"{k} {_fmt(v)} / {_fmt((a_.get('day_1_stages') or {}).get(k))}" for k, v in a_["stages"].items()) + " |"]
              if a_.get("stages") and a_.get("day_1_stages") else []),
            "",
        ]
    dist = results.get("distributed")
    if dist:
        lines += [
            f"## Distributed mode: one night of {dist['rows_per_day']:,} rows on {dist.get('workers', 2)} workers",
            "",
            f"Measured {dist.get('measured_at', '?')} at commit {dist.get('git_commit', '?')} with `make distributed`'s "
            "platform on this one machine (PostgreSQL, moto as the S3 stand-in, Redis, two Celery workers, two "
            "DuckLakes), deliveries simulated before the run as for the embedded sizes.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| run (the night's job) | {_fmt(dist.get('run_seconds'), ' s')} |",
            f"| services started (PostgreSQL, S3, Redis, workers) | {_fmt(dist.get('services_seconds'), ' s')} |",
            f"| whole command, services stopped | {_fmt(dist.get('wall_seconds'), ' s')} |",
            f"| embedded night, same size ({dist.get('embedded_measured_at') or 'not measured'}) | "
            f"{_fmt(dist.get('embedded_job_seconds'), ' s')} |",
            f"| distributed ÷ embedded | {_fmt(dist.get('ratio_vs_embedded'))} |",
            f"| succeeded | {'yes' if dist.get('success') else 'no (see ' + dist.get('log', 'the log') + ')'} |",
            "",
        ]
    c = results.get("code_location")
    if c:
        lines += [
            "## Code location and UI",
            "",
            "| measure | seconds |",
            "|---|---:|",
            f"| `dagster definitions validate -w workspace.yaml` (process, incl. Python start) | {_fmt(c.get('definitions_validate_seconds'))} |",
            f"| import `orchestration.definitions` | {_fmt(c.get('import_seconds'))} |",
            f"| `defs()` call (build all assets, dbt manifest, checks) | {_fmt(c.get('defs_call_seconds'))} |",
            f"| `dagster-webserver` start → `/server_info` answers | {_fmt(c.get('ui_server_info_seconds'))} |",
            f"| start → GraphQL asset graph answers ({_fmt(c.get('ui_asset_nodes'))} asset nodes) | {_fmt(c.get('ui_asset_graph_seconds'))} |",
            f"| that GraphQL query alone | {_fmt(c.get('ui_asset_graph_query_seconds'))} |",
            "",
        ]
    lines += _targets(results)
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():  # the hand-written analysis (profiles, fixes, what is left), kept next to the harness
        lines += ["", notes.read_text(encoding="utf-8").strip(), ""]
    return "\n".join(lines)


def _trend(days: list[dict]) -> float | None:
    """Least-squares slope of the job time over the warm days (2..N), as a fraction of their mean per day."""
    pts = [(x["day"], x["job_seconds"]) for x in days if x.get("success") and x["day"] >= 2]
    if len(pts) < 3:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return round(slope / my, 4)


def _growth(days: list[dict]) -> tuple[float | None, float | None]:
    """Last day's job time relative to day 1 and to day 2 (successful days only)."""
    ok = [x for x in days if x.get("success")]
    if len(ok) < 2 or ok[0]["day"] != 1:
        return None, None
    g1 = ok[-1]["job_seconds"] / ok[0]["job_seconds"] - 1
    g2 = ok[-1]["job_seconds"] / ok[1]["job_seconds"] - 1 if len(ok) >= 3 else None
    return round(g1, 3), (round(g2, 3) if g2 is not None else None)


def _pairs_lines(r: dict) -> list[str]:
    """The pairs of a size measured in several (`SIZE_PAIRS`), each with its ratio, and the ratio of their sums."""
    pairs = r.get("pairs") or []
    if len(pairs) < 2:
        return []
    each = "; ".join(f"{i}. {'baseline' if x['baseline_first'] else 'pipeline'} first: {_fmt(x['job_seconds'], ' s')} ÷ "
                     f"{_fmt(x['baseline_seconds'], ' s')} = "
                     f"{_ratio(round(x['job_seconds'] / x['baseline_seconds'], 2)) if x['job_seconds'] and x['baseline_seconds'] else '–'}"
                     for i, x in enumerate(pairs, 1))
    return [f"{len(pairs)} pairs of runs, alternately first (the machine's speed drifts): {each}. "
            f"**Pipeline ÷ baseline over the pairs (ratio of the sums) = {_ratio(r.get('ratio_total'))}**; the stage "
            "ratios below are of the pairs' sums too, the seconds and memory are the first pair's.", ""]


def _targets(results: dict) -> list[str]:
    """The issue's targets against what was measured (largest size measured; not asserted anywhere)."""
    sizes = [r for r in results.get("sizes", []) if r.get("pipeline") and r.get("baseline")]
    rows = []
    if sizes:
        big = max(sizes, key=lambda r: r["rows_per_day"])
        peak = max([_peak_rss(big["pipeline"]["days"][0])]
                   + [x["peak_rss_mb"] for x in big.get("pairs") or [] if x.get("peak_rss_mb") is not None])
        rows += [
            ("whole nightly job ≤ 1.3 × baseline", f"{big['rows_per_day']:,} rows/day",
             _ratio(big.get("ratio_total")) + " ×", (big.get("ratio_total") or 99) <= 1.3),
            ("peak memory ≤ 3 GB (process + dbt children)", f"{big['rows_per_day']:,} rows/day", _fmt(peak, " MB"),
             peak <= 3072),
        ]
    c = results.get("code_location") or {}
    if c.get("definitions_validate_seconds") is not None:
        load = (c.get("import_seconds") or 0) + (c.get("defs_call_seconds") or 0)
        rows.append(("code location loads < 5 s", "import + defs()", _fmt(load, " s"), load < 5))
        rows.append(("(same, as a process) `dagster definitions validate`", "incl. interpreter start",
                     _fmt(c["definitions_validate_seconds"], " s"), c["definitions_validate_seconds"] < 5))
    d = results.get("days") or {}
    g1, g2 = _growth(d.get("days") or [])
    if g1 is not None:
        rows.append((f"day {len(d['days'])} within 10 % of day 1", f"{d['rows_per_day']:,} rows/day",
                     _fmt(100 * g1, " %"), g1 <= 0.10))
    if g2 is not None:
        rows.append(("(same, vs day 2: both warm)", f"{d['rows_per_day']:,} rows/day", _fmt(100 * g2, " %"), g2 <= 0.10))
    tr = _trend(d.get("days") or [])
    if tr is not None:
        span = len(d["days"]) - 2
        rows.append((f"(same, trend over days 2..{len(d['days'])} × {span} days)", f"{d['rows_per_day']:,} rows/day",
                     _fmt(100 * tr * span, " %"), tr * span <= 0.10))
    y = results.get("year") or {}
    if y.get("wall_seconds") is not None and y.get("success"):
        per_year = y["wall_seconds"] / y["days"] * YEAR_DAYS
        at = f"{y['days']} days × {y['rows_per_day']:,} rows/day" + (
            "" if y["days"] >= YEAR_DAYS else f", {YEAR_DAYS} days extrapolated: {_fmt(per_year / 60, ' min')}")
        rows.append((f"{YEAR_DAYS} days × {YEAR_ROWS:,} rows/day backfill ≤ 15 min", at,
                     _fmt(y["wall_seconds"] / 60, " min"), y["days"] >= YEAR_DAYS and per_year <= YEAR_TARGET_SECONDS))
    a_ = y.get("after") or {}
    if a_.get("vs_day_1") is not None:
        rows.append((f"day {y['days'] + 1} (after {y['days']} days) ÷ day 1 ≤ 1.10",
                     f"{a_['rows_per_day']:,} rows/day", f"{a_['vs_day_1']:.3f} ×",
                     y["days"] >= YEAR_DAYS and a_["vs_day_1"] <= 1.10))
    f = results.get("fixed_cost") or {}
    if f.get("warm_job_seconds") is not None:
        rows.append((f"{f['rows_per_day']:,}-row night, whole job (warm code location) ≤ 10 s", "median warm night",
                     _fmt(f["warm_job_seconds"], " s"), f["warm_job_seconds"] <= 10))
    if not rows:
        return []
    out = ["## Targets (measured, not asserted)", "", "| target | at | measured | met |", "|---|---|---:|---|"]
    out += [f"| {t} | {at} | {v} | {'yes' if ok else '**no**'} |" for t, at, v, ok in rows]
    return out + [""]


def _save(results: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmark.json").write_text(json.dumps(results, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    (docs / "benchmark.md").write_text(render_markdown(results), encoding="utf-8")


def _sizes_fit(root: Path, sizes: list[int], measured: dict | None) -> tuple[list[int], str | None]:
    """Drop sizes whose estimated disk need exceeds the free space of ``root`` (estimate from the measured 1 M size)."""
    per_row = (measured["landing_bytes"] + measured.get("warehouse_bytes", 0)) / measured["rows_per_day"] if measured else 300
    free = shutil.disk_usage(root).free
    keep, note = [], None
    for n in sizes:
        need = per_row * n * DISK_FACTOR / 2
        if need < free:
            keep.append(n)
        else:
            note = (f"{n:,} rows/day skipped: about {need / 1e9:.1f} GB of disk needed, {free / 1e9:.1f} GB free "
                    f"under {root}")
    return keep, note


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=env.get("BENCH_SIZES") or env.get("SIZES")
                   or ",".join(str(s) for s in DEFAULT_SIZES))
    p.add_argument("--days", type=int, default=int(env.get("BENCH_DAYS") or env.get("DAYS") or DEFAULT_DAYS))
    p.add_argument("--day-rows", type=int, default=int(env.get("BENCH_DAY_ROWS") or 1_000_000))
    p.add_argument("--date", type=dt.date.fromisoformat, default=dt.date.fromisoformat(env.get("BENCH_DATE") or DEFAULT_DATE.isoformat()))
    p.add_argument("--dir", type=Path, default=Path(env.get("BENCH_DIR") or "/tmp/zq-bench"))
    p.add_argument("--docs", type=Path, default=repo_root() / "docs")
    p.add_argument("--distributed-rows", type=int, default=int(env.get("BENCH_DISTRIBUTED_ROWS") or 10_000_000),
                   help="rows of the night measured in distributed mode (0: not measured)")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: sizes,days,fixed,year,distributed,codeloc")
    p.add_argument("--year-days", type=int, default=int(env.get("BENCH_YEAR_DAYS") or YEAR_DAYS),
                   help=f"the backfill part: days (default {YEAR_DAYS}; 0: not measured)")
    p.add_argument("--year-rows", type=int, default=int(env.get("BENCH_YEAR_ROWS") or YEAR_ROWS))
    p.add_argument("--year-after-rows", type=int, default=int(env.get("BENCH_YEAR_AFTER_ROWS") or YEAR_AFTER_ROWS),
                   help="rows of the day after the backfill (0: not measured)")
    p.add_argument("--pairs", type=int, default=int(env.get("BENCH_PAIRS") or SIZE_PAIRS),
                   help=f"pipeline/baseline pairs per size, alternately first (default {SIZE_PAIRS})")
    p.add_argument("--report-only", action="store_true", help="re-render docs/benchmark.md from docs/benchmark.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the other parts of docs/benchmark.json, replacing only what this run measures")
    args = p.parse_args(argv)
    if args.report_only:
        results = json.loads((args.docs / "benchmark.json").read_text(encoding="utf-8"))
        _save(results, args.docs)
        return 0
    if not os.environ.get("ZQ_PSEUDONYM_KEY"):
        print("需要 ZQ_PSEUDONYM_KEY (set by `make bench`)", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"sizes": [], "notes": []}
    if args.merge and (args.docs / "benchmark.json").exists():
        results = json.loads((args.docs / "benchmark.json").read_text(encoding="utf-8"))
    results.update(started_at=dt.datetime.now(TZ).isoformat(timespec="seconds"), machine=machine(),
                   bench_dir=str(args.dir))
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if "sizes" not in skip:
        done: dict | None = None
        for n in sizes:
            fit, note = _sizes_fit(args.dir, [n], done)
            if not fit:
                results["size_limit_note"] = note
                print(f"[bench] {note}", file=sys.stderr)
                break
            print(f"[bench] size {n:,} rows/day …", file=sys.stderr, flush=True)
            r = measure_size(args.dir, n, args.date, args.pairs)
            results["sizes"] = sorted([x for x in results["sizes"] if x["rows_per_day"] != n] + [r],
                                      key=lambda x: x["rows_per_day"])
            done = r if r.get("landing_bytes") else done
            for d in r.get("data_dirs") or [args.dir / f"size-{n}"]:  # keep the last warehouse for inspection
                shutil.rmtree(Path(d) / "landing", ignore_errors=True)
            _save(results, args.docs)
    if "days" not in skip and args.days > 0:
        print(f"[bench] days 1..{args.days} at {args.day_rows:,} rows/day …", file=sys.stderr, flush=True)
        results["days"] = measure_days(args.dir, args.day_rows, args.date, args.days)
        _save(results, args.docs)
    if "fixed" not in skip:
        print(f"[bench] fixed cost: {FIXED_NIGHTS} nights of {FIXED_ROWS:,} rows …", file=sys.stderr, flush=True)
        results["fixed_cost"] = measure_fixed_cost(args.dir, args.date)
        _save(results, args.docs)
    if "year" not in skip and args.year_days > 0:
        print(f"[bench] backfill: {args.year_days} days of {args.year_rows:,} rows, then a day of "
              f"{args.year_after_rows:,} …", file=sys.stderr, flush=True)
        results["year"] = measure_year(args.dir, args.date, args.year_days, args.year_rows, args.year_after_rows)
        _save(results, args.docs)
    if "distributed" not in skip and args.distributed_rows > 0:
        print(f"[bench] distributed: one night of {args.distributed_rows:,} rows on 2 workers …", file=sys.stderr,
              flush=True)
        results["distributed"] = measure_distributed(args.dir, args.distributed_rows, args.date, results["sizes"])
        _save(results, args.docs)
    if "codeloc" not in skip:
        print("[bench] code location and UI …", file=sys.stderr, flush=True)
        results["code_location"] = measure_code_location(args.dir)
    results["finished_at"] = dt.datetime.now(TZ).isoformat(timespec="seconds")
    _save(results, args.docs)
    print(f"[bench] written {args.docs / 'benchmark.md'} and benchmark.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
