"""The dbt fork server (zqdata/dbt_fork.py, issue 15): dbt's import paid once per step process. A dbt call through it
behaves as dbt itself (exit codes, output, files), runs in exactly the environment its caller was given (the seal), and
dies when its caller is killed; without a server the client runs dbt itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from assets.dbt_common import dbt_executable
from tests.procs import wait_until
from zqdata import dbt_fork

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SCM_RIGHTS, PR_SET_PDEATHSIG")
CLIENT = Path(sys.executable).parent / dbt_fork.CLIENT


def _project(tmp: Path, model_sql: str) -> Path:
    project = tmp / "probe"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "probe", "version": "1.0.0", "profile": "probe", "model-paths": ["models"],
        "flags": {"send_anonymous_usage_stats": False}}))
    (project / "profiles.yml").write_text(yaml.safe_dump({"probe": {"target": "dev", "outputs": {"dev": {
        "type": "duckdb", "path": "{{ env_var('PROBE_DB') }}", "threads": 1}}}}))
    (project / "models" / "probe_model.sql").write_text(model_sql)
    return project


def _env(project: Path, **extra: str) -> dict[str, str]:
    """A sealed-style environment: process necessities and the probe's own variables, nothing of this process."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ") or k.startswith("LC_")}
    return {**keep, "PROBE_DB": str(project / "probe.duckdb"), "DBT_LOG_FORMAT": "json", **extra}


def _dbt(project: Path, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, set[int]]:
    """`zq-dbt ARGS` in the probe project; its result and the pids dbt's log says it ran as."""
    logs = project / "logs"
    done = subprocess.run([str(CLIENT), *args, "--project-dir", str(project), "--profiles-dir", str(project),
                           "--target-path", str(project / "target"), "--log-path", str(logs)],
                          env=env, cwd=project, capture_output=True, text=True, timeout=600)
    pids = set()
    for line in (done.stdout.splitlines() if env.get("DBT_LOG_FORMAT") == "json" else []):
        try:
            pids.add(json.loads(line)["info"]["pid"])
        except (ValueError, KeyError):
            continue
    return done, pids


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} missing: `pip install -e .` installs the zq-dbt console script (pyproject.toml)")
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", "fork-server-test-secret")  # the step's secret, which dbt must not see
    monkeypatch.delenv(dbt_fork.SWITCH_ENV, raising=False)
    env = dbt_fork.ensure_server()
    assert set(env) == {dbt_fork.SOCKET_ENV}
    yield env
    dbt_fork.stop_server()


def _server_pid() -> int:
    return dbt_fork._server["proc"].pid


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_dbt_is_the_executable_steps_start() -> None:
    assert dbt_executable() == str(CLIENT)


def test_a_call_through_the_server_is_dbt_itself_in_exactly_its_callers_environment(tmp_path: Path, server) -> None:
    project = _project(tmp_path, "select '{{ env_var('ZQ_PSEUDONYM_KEY', 'absent') }}' as key,"
                                 " '{{ env_var('PROBE_MARK', 'none') }}' as mark")
    done, pids = _dbt(project, ["run"], _env(project, **server, PROBE_MARK="given"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert pids and os.getpid() not in pids
    import duckdb

    with duckdb.connect(str(project / "probe.duckdb"), read_only=True) as con:
        assert con.execute("select key, mark from probe_model").fetchall() == [("absent", "given")]
    # the server itself holds nothing of the process that started it
    environ = Path(f"/proc/{_server_pid()}/environ").read_bytes()
    assert b"fork-server-test-secret" not in environ and b"PROBE_" not in environ

    # a failing call: the same exit code and message as dbt's own
    bad = _env(project, **server)
    bad.pop("PROBE_DB")
    through, _ = _dbt(project, ["run"], bad)
    direct = subprocess.run([dbt_fork.real_dbt(), "run", "--project-dir", str(project), "--profiles-dir",
                             str(project), "--target-path", str(project / "target2"), "--log-path",
                             str(project / "logs2")], env=bad, cwd=project, capture_output=True, text=True,
                            timeout=600)
    assert through.returncode == direct.returncode != 0
    assert "PROBE_DB" in through.stdout + through.stderr


def test_a_session_dies_when_its_caller_is_killed(tmp_path: Path, server) -> None:
    project = _project(tmp_path, "{{ config(materialized='table') }}\n"  # a query that runs until killed
                                 "select count(*) as n from range(1000000000000) a")
    client = subprocess.Popen([str(CLIENT), "run", "--project-dir", str(project), "--profiles-dir", str(project),
                               "--target-path", str(project / "target"), "--log-path", str(project / "logs")],
                              env=_env(project, **server), cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        log = project / "logs" / "dbt.log"
        wait_until(lambda: log.exists() and "probe_model" in log.read_text(errors="replace")
                   and "Began executing" in log.read_text(errors="replace"), "dbt running the model", 300, 0.2)
        sessions = _children(_server_pid())
        assert len(sessions) == 1
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=60)
        wait_until(lambda: not _children(_server_pid()), "the session to die with its caller", 120, 0.2)
    finally:
        if client.poll() is None:
            client.kill()


def test_without_a_server_the_client_runs_dbt_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbt_fork.SWITCH_ENV, "0")
    assert dbt_fork.ensure_server() == {}
    project = _project(tmp_path, "select 1 as a")
    client = subprocess.Popen([str(CLIENT), "run", "--project-dir", str(project), "--profiles-dir", str(project),
                               "--target-path", str(project / "target"), "--log-path", str(project / "logs")],
                              env=_env(project), cwd=project, stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=600)
    assert client.returncode == 0
    assert {json.loads(line)["info"]["pid"] for line in out.splitlines() if line.startswith("{")} == {client.pid}


def test_the_server_builds_the_schemas_dbt_validates_before_its_first_fork() -> None:
    """A call forked after `warm_up` validates dbt_project.yml, packages, flags, selectors and the DuckDB profile
    against schemas already built (they are cached per class): none is built again in the call."""
    probe = (
        "import dbt.cli.main, dbt.adapters.duckdb\n"
        "from zqdata.dbt_fork import warm_up\n"
        "from dbt_common.dataclass_schema import dbtClassMixin as M\n"
        "before = M.json_schema.cache_info().misses\n"
        "missed = warm_up()\n"
        "built = M.json_schema.cache_info().misses\n"
        "from dbt.contracts.project import Project, PackageConfig, ProjectFlags\n"
        "from dbt.contracts.selection import SelectorFile\n"
        "from dbt.adapters.duckdb.credentials import DuckDBCredentials\n"
        "for cls in (Project, PackageConfig, ProjectFlags, SelectorFile, DuckDBCredentials): cls.json_schema()\n"
        "print(before, built, M.json_schema.cache_info().misses, missed)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    before, built, after, missed = done.stdout.split(maxsplit=3)
    assert missed.strip() == "[]"
    assert int(built) - int(before) == 5 and after == built  # five schemas built by the warm-up, none by the calls


def test_the_child_side_of_a_dbt_start_imports_and_loads_nothing() -> None:
    """`die_with_parent` runs in the child between fork and exec, while another thread of the step may be importing
    (the gov dbt step imports GX in the background): it must not import (a module lock held by that thread would be
    held forever in the child) nor load a library. Run with every import refused and ctypes forgotten."""
    code = (
        "import sys, importlib.abc\n"
        "from zqdata import dbt_fork\n"
        "asked = []\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        asked.append(name)\n"
        "        raise ImportError(name)\n"
        "for m in [m for m in sys.modules if m == 'ctypes' or m.startswith('ctypes.')]:\n"
        "    del sys.modules[m]\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "dbt_fork.die_with_parent()\n"
        "print(asked)\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "[]"
    # and it does set the parent-death signal: PR_GET_PDEATHSIG (2) reads SIGKILL back
    check = subprocess.run([sys.executable, "-c", "import ctypes, signal\nfrom zqdata import dbt_fork\n"
                            "dbt_fork.die_with_parent()\nv = ctypes.c_int()\n"
                            "ctypes.CDLL(None).prctl(2, ctypes.byref(v))\nprint(v.value == signal.SIGKILL)\n"],
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "True", check.stderr[-2000:]


def test_a_session_serves_the_templates_an_earlier_call_compiled(tmp_path: Path, server) -> None:
    """Through the server, dbt's compiled Jinja templates are kept in the project's target/jinja_code/ and a later
    call serves them (and touches them: `jinja_code.prune` keeps what is used) instead of compiling them again."""
    from zqdata import jinja_code

    project = _project(tmp_path, "{{ config(materialized='table') }}\nselect {{ 40 + 2 }} as answer")
    for _ in range(2):
        done, _ = _dbt(project, ["run"], _env(project, **server))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        folder = project / "target" / jinja_code.FOLDER
        kept = set(folder.glob("*.code"))
        assert len(kept) > 20  # the model and the macros its run called (materialization, adapter)
        old = time.time() - 3600
        for entry in kept:
            os.utime(entry, (old, old))
    done, _ = _dbt(project, ["run"], _env(project, **server))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert set(folder.glob("*.code")) == kept  # nothing compiled anew
    touched = [e for e in kept if e.stat().st_mtime > old + 60]
    assert len(touched) > 20
    import duckdb

    with duckdb.connect(str(project / "probe.duckdb"), read_only=True) as con:
        assert con.execute("select answer from probe_model").fetchall() == [(42,)]
