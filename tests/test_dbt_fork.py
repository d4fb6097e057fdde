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
        "from dbt.contracts.project import Configuration, Project, PackageConfig, ProjectFlags\n"
        "from dbt.contracts.selection import SelectorFile\n"
        "from dbt.adapters.duckdb.credentials import DuckDBCredentials\n"
        "for cls in (Project, PackageConfig, ProjectFlags, SelectorFile, DuckDBCredentials, Configuration):\n"
        "    cls.json_schema()\n"
        "print(before, built, M.json_schema.cache_info().misses, missed)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    before, built, after, missed = done.stdout.split(maxsplit=3)
    assert missed.strip() == "[]"
    assert int(built) - int(before) == 6 and after == built  # six schemas built by the warm-up, none by the calls


_SERIALIZER_PROBE = (
    "import sys, dbt.cli.main, dbt.adapters.duckdb\n"
    "from mashumaro.core.meta.code.builder import CodeBuilder\n"
    "from zqdata.dbt_fork import warm_up\n"
    "state = sys.argv[1]\n"
    "missed = warm_up(state if sys.argv[2] == 'warm' else None)\n"
    "compiled = []\n"
    "for name in ('add_unpack_method', 'add_pack_method'):\n"
    "    def counting(self, _f=getattr(CodeBuilder, name)):\n"
    "        compiled.append(self.cls.__name__)\n"
    "        return _f(self)\n"
    "    setattr(CodeBuilder, name, counting)\n"
    "# what a dbt call does with the state: decode it, build the flat graph, write the manifest\n"
    "from dbt.contracts.graph.manifest import Manifest\n"
    "from dbt.parser.manifest import extended_mashumuro_decoder\n"
    "m = Manifest.from_msgpack(open(state, 'rb').read(), decoder=extended_mashumuro_decoder)\n"
    "m.build_flat_graph()\n"
    "m.fill_tracking_metadata = lambda: None  # reads the flags of a dbt call, which this probe is not\n"
    "d = m.writable_manifest().to_dict(omit_none=False, context={'artifact': True})\n"
    "assert d['nodes'], 'a manifest with nodes'\n"
    "print(len(compiled), len(set(compiled)), [x for x in missed if x.startswith('state')])\n"
)


def _partial_parse_state(tmp: Path) -> Path:
    project = _project(tmp, "select 1 as a")
    (project / "models" / "schema.yml").write_text(yaml.safe_dump({"version": 2, "models": [
        {"name": "probe_model", "columns": [{"name": "a", "data_tests": ["not_null", "unique"]}]}]}))
    done, _ = _dbt(project, ["parse"], _env(project))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = project / "target" / "partial_parse.msgpack"
    assert state.is_file()
    return state


def test_the_server_compiles_the_manifests_serializers_from_a_kept_state(tmp_path: Path) -> None:
    """dbt's classes compile their (de)serializers on first use (mashumaro, lazily): warmed with a partial-parse state,
    the server has compiled every one a call needs to decode that state and write its manifest; without the state
    each call compiles them itself."""
    state = _partial_parse_state(tmp_path)
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for mode in ("warm", "cold"):
        done = subprocess.run([sys.executable, "-c", _SERIALIZER_PROBE, str(state), mode], capture_output=True,
                              text=True, timeout=600, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[mode] = done.stdout.split(maxsplit=2)
    assert runs["cold"][0] != "0" and int(runs["cold"][1]) > 20  # the call compiles dozens of classes itself
    assert runs["warm"][:2] == ["0", "0"] and runs["warm"][2].strip() == "[]"  # none after the warm-up


def test_a_state_that_does_not_decode_is_a_missed_warm_up_not_a_failure(tmp_path: Path) -> None:
    bad = tmp_path / "partial_parse.msgpack"
    bad.write_bytes(b"not a manifest")
    probe = ("import sys, dbt.cli.main, dbt.adapters.duckdb\nfrom zqdata.dbt_fork import warm_up\n"
             "print(warm_up(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == repr([f"state {bad}"])


def test_a_server_started_with_a_state_warms_with_it_and_calls_still_run(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    state = _partial_parse_state(tmp_path / "first")
    monkeypatch.delenv(dbt_fork.SWITCH_ENV, raising=False)
    env = dbt_fork.ensure_server(warm_state=state)
    try:
        cmdline = Path(f"/proc/{_server_pid()}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-2:] == [str(state).encode(), b""]  # the state reaches the server's warm-up
        project = _project(tmp_path / "second", "select 41 + 1 as a")
        done, _ = _dbt(project, ["run"], _env(project, **env))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        import duckdb

        with duckdb.connect(str(project / "probe.duckdb"), read_only=True) as con:
            assert con.execute("select a from probe_model").fetchall() == [(42,)]
    finally:
        dbt_fork.stop_server()
    # a state that is not there: the server starts without one
    env = dbt_fork.ensure_server(warm_state=tmp_path / "absent.msgpack")
    try:
        assert Path(f"/proc/{_server_pid()}/cmdline").read_bytes().split(b"\0")[-2].endswith(b"/s")
    finally:
        dbt_fork.stop_server()


def test_a_server_started_before_any_state_warms_with_the_first_one_it_is_given(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived process starts its server on its first night, before dbt has left a state: the next dbt call that
    has one sends it to the server (on its stdin, which only the owner holds), once."""
    state = _partial_parse_state(tmp_path / "first")
    monkeypatch.delenv(dbt_fork.SWITCH_ENV, raising=False)
    dbt_fork.ensure_server()
    try:
        proc = dbt_fork._server["proc"]
        env = dbt_fork.ensure_server(warm_state=state)
        assert dbt_fork._read_line(proc, 300) == "warmed"
        dbt_fork.ensure_server(warm_state=state)  # warmed already: nothing sent
        project = _project(tmp_path / "second", "select 41 + 1 as a")
        done, _ = _dbt(project, ["run"], _env(project, **env))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert dbt_fork._read_line(proc, 5) == ""  # no second warm-up
    finally:
        dbt_fork.stop_server()


def test_after_the_warm_up_dbts_behaviour_flags_do_not_walk_every_module() -> None:
    """dbt-common names a behaviour flag's source with `inspect.stack()`; `inspect.getmodule` maps every loaded
    module's file the first time it meets an unknown file. The server does that once before it forks."""
    probe = (
        "import sys, inspect, dbt.cli.main, dbt.adapters.duckdb\n"
        "from zqdata.dbt_fork import warm_up\n"
        "if sys.argv[1] == 'warm': warm_up()\n"
        "calls = []\n"
        "real = inspect.getabsfile\n"
        "inspect.getabsfile = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "from dbt_common.behavior_flags import Behavior\n"
        "Behavior([{'name': 'zq_probe_flag', 'default': False, 'description': 'probe'}], {})\n"
        "print(len(calls), len(sys.modules))\n")
    counts = {}
    for mode in ("warm", "cold"):
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-2000:]
        counts[mode] = [int(x) for x in done.stdout.split()]
    calls_cold, modules = counts["cold"]
    assert calls_cold > modules // 2  # without the warm-up: a file lookup per loaded module
    assert counts["warm"][0] < 100  # after it: the stack's own frames only


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
