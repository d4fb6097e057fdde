"""dbt's import paid once per process, not once per dbt call: a fork server for the sealed dbt subprocesses.

Importing dbt takes 3.2 s on the 2-core bench machine (mashumaro building the artifact schemas, dbt-common's event
classes) and a night started three dbt processes (the gov build, the ops preflight parse, the ops build): a fifth of a
1,000-row night was dbt importing itself (bench/notes.md item 16). Here a server process imports dbt once and forks a
session per dbt call; the session is the dbt process.

- **The seal holds** (docs/security.md "Sealed dbt steps"): the server starts with the process necessities only
  (`dbt_guard.sealed_env(environ, {})`: no key, no warehouse path, no secret), never reads a request itself, and each
  session replaces its environment with exactly the one its caller was given (the sealed environment of that step)
  before dbt parses anything. The server's memory is dbt's modules and nothing of a step.
- **The caller sees a dbt process**: it starts `zq-dbt` (`client_main`) where it started `dbt`, with the same
  arguments and environment; the client hands its stdin/stdout/stderr to the session (SCM_RIGHTS), forwards SIGINT
  and SIGTERM to it and exits with its exit code. dagster-dbt reads the JSON events from the same pipe as before.
- **A session dies with its caller**: when the client's connection closes before the session has answered (the client
  was killed: its step died, PR_SET_PDEATHSIG, issue 17), the session SIGKILLs itself, as a direct dbt child did.
  The server dies with the process that started it (PR_SET_PDEATHSIG and its stdin closing).
- **What every session would build again, built once or kept**: the server builds dbt's JSON schemas, `inspect`'s
  map of module files and (from the target's kept partial-parse state) mashumaro's serializers of the manifest's
  classes before its first fork (`warm_up`), and makes dbt-common build its log events with protobuf's constructor
  (zqdata/dbt_events.py); each session serves dbt's compiled Jinja templates from the project's `target/jinja_code/`
  and keeps what it compiles there (zqdata/jinja_code.py). In a 1,000-row night's gov build that is ~0.65 s of CPU
  each of ~1.0 s (events) and ~0.9 s (templates) (bench/notes.md item 21).
- **The gate goes with the call**: the session (or, with no server, the client itself) runs dbt with the manifest
  check its environment requests (zqdata/dbt_gate.py; the ops build: registered products only), taken out of the
  environment before dbt starts. A call that requests a gate never runs the real dbt without it.
- **Nothing depends on it**: with no server (none started in this process, `ZQ_DBT_FORK=0`, or it cannot be
  reached) the client execs the real dbt with the same arguments, as before (runs dbt's CLI in its own process when
  a gate is requested).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

SOCKET_ENV = "ZQ_DBT_FORK_SOCKET"  # where the client finds this process's server (not a secret: a path)
SWITCH_ENV = "ZQ_DBT_FORK"  # "0": no server, every dbt call starts its own interpreter
CLIENT = "zq-dbt"  # the console script (pyproject.toml) started where `dbt` was
READY_TIMEOUT = 300.0  # s: generous, the import is ~3 s on the bench machine and shared CI machines are slower
_HEADER = struct.Struct("!I")
_PID = struct.Struct("!I")  # the session's pid, sent when dbt starts (the client forwards signals to it)
_CODE = struct.Struct("!i")  # dbt's exit code, sent when it ends

_server: dict[str, Any] = {}  # this process's server: pid of the owner, Popen, socket path


# ---------------------------------------------------------------- the caller's side


def real_dbt() -> str:
    """dbt's own executable beside this interpreter (the venv's bin/ is not always on PATH), else `dbt` from PATH."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else "dbt"


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(SWITCH_ENV, "1").strip() not in ("0", "false", "no")


def ensure_server(environ: Mapping[str, str] | None = None, warm_state: Path | None = None) -> dict[str, str]:
    """Start this process's server if it is not running (and wait until it has imported dbt); the variable that
    points a client at it, to add to the client's environment. Empty when there is no server to use: the client
    then runs dbt itself. `warm_state`: a partial-parse state of the project (dbt's `partial_parse.msgpack`) the
    server decodes and encodes once (`warm_up`): before its first fork when this call starts it, else before the
    next fork when the server has not had a state yet (sent on its stdin, which only this process holds)."""
    from zqdata import dbt_guard

    env = os.environ if environ is None else environ
    if not enabled(env) or not (Path(sys.executable).parent / CLIENT).exists():
        return {}
    srv = _server
    state = str(warm_state) if warm_state is not None and Path(warm_state).is_file() else None
    if state is not None and "\n" in state:
        state = None
    if srv.get("owner") == os.getpid():
        if srv["proc"].poll() is None:
            if state is not None and not srv["warmed"]:  # started before any state existed: warm with this one
                with contextlib.suppress(OSError, ValueError):
                    srv["proc"].stdin.write(os.fsencode(state) + b"\n")
                    srv["proc"].stdin.flush()
                srv["warmed"] = True
            return {SOCKET_ENV: srv["path"]}
        stop_server()  # it died (its starting thread ended: PR_SET_PDEATHSIG): a new one below
    folder = tempfile.mkdtemp(prefix="zq-dbt-fork-")  # 0700: this user's only
    path = os.path.join(folder, "s")
    warm = [state] if state is not None else []
    proc = subprocess.Popen([sys.executable, __file__, path, *warm], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=dbt_guard.sealed_env(env, {}), cwd=folder, preexec_fn=die_with_parent)
    line = _read_line(proc, READY_TIMEOUT)
    if line != "ready":
        with contextlib.suppress(OSError):
            proc.kill()
        return {}
    _server.clear()
    _server.update(owner=os.getpid(), proc=proc, path=path, folder=folder, warmed=bool(warm))
    return {SOCKET_ENV: path}


def stop_server() -> None:
    """Stop this process's server (tests; the server also ends with this process)."""
    srv = dict(_server)
    _server.clear()
    if srv.get("owner") == os.getpid():
        with contextlib.suppress(OSError):
            srv["proc"].stdin.close()
        try:
            srv["proc"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            srv["proc"].kill()
        with contextlib.suppress(OSError):
            os.unlink(srv["path"])
            os.rmdir(srv["folder"])


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline().decode().strip()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


def _resolve_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no PR_SET_PDEATHSIG
        return None


# Resolved here, in the parent: between fork and exec the child must not import or load a library. Another thread of
# the parent may be importing at that moment (the GX import of the gov dbt step, `gx_runner.prefetch_gx`), and a lock
# it held (a module's import lock, the dynamic loader's) stays held forever in the child, whose one thread would wait.
_PRCTL = _resolve_prctl()


def die_with_parent() -> None:
    """In a child between fork and exec: SIGKILL it when the thread that started it ends (Linux PR_SET_PDEATHSIG):
    a killed step never leaves dbt, or this server, running on its own. Imports and loads nothing (`_PRCTL`)."""
    if _PRCTL is not None:
        with contextlib.suppress(OSError):
            _PRCTL(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


# ---------------------------------------------------------------- the client: started where `dbt` was


def client_main() -> None:
    """`zq-dbt ARGS...`: dbt ARGS run by this process's server when the environment names one, else by dbt itself."""
    args = sys.argv[1:]
    path = os.environ.get(SOCKET_ENV)
    conn = None
    if path:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
        except OSError:
            conn = None
    if conn is None:
        from zqdata import dbt_gate

        if dbt_gate.requested(os.environ):  # the real dbt would run without the gate: run dbt here, with it
            sys.exit(run_cli(args))
        dbt = real_dbt()
        os.execvp(dbt, [dbt, *args])
    payload = json.dumps({"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
    pid_bytes = _recv_exactly(conn, _PID.size)
    if pid_bytes is None:
        sys.exit(_fallback_code("the dbt fork server closed the connection before starting dbt"))
    session = _PID.unpack(pid_bytes)[0]

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.kill(session, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    done = _recv_exactly(conn, _CODE.size)
    if done is None:
        sys.exit(_fallback_code("dbt (fork server session) ended without an exit code"))
    sys.exit(_CODE.unpack(done)[0])


def _fallback_code(message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    return 2


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return buf


# ---------------------------------------------------------------- the server


def warm_up(state: str | None = None) -> list[str]:
    """What every dbt call would otherwise build for itself after the import, done once before the first fork:

    - the JSON schemas dbt validates dbt_project.yml, packages, project flags, selectors, the DuckDB profile and the
      whole runtime configuration against (mashumaro builds each on first use, ~0.6 s a call on the bench machine;
      `json_schema` is cached per class), and the task modules a command imports when it runs;
    - dbt-common's events built with protobuf's constructor (zqdata/dbt_events.py);
    - `inspect`'s map of module files: dbt-common names the source of each adapter behaviour flag with
      `inspect.stack()`, whose first `getmodule` walks every loaded module (~0.12 s a call; bench/notes.md item 24);
    - with `state` (a partial-parse state of the project, which a call decodes before it parses): mashumaro's
      (de)serializers of the manifest's classes. dbt's classes compile them on first use (`lazy_compilation`), and a
      session compiled them again every call: decoding the state, the flat graph, the written manifest (~0.4 s a
      call). The state is dbt's parse of the project's files (no data, no secret) and is dropped once used.

    Nothing here reads a profile or the environment. Returns what could not be warmed (a dbt upgrade moved it, a
    state that does not decode): the call then builds it itself, as before."""
    import importlib

    missed = []
    for module in ("dbt.task.build", "dbt.task.run", "dbt.task.test", "dbt.parser.manifest",
                   "dbt_common.clients.agate_helper"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a warm-up only
            missed.append(module)
    for module, name in (("dbt.contracts.project", "Project"), ("dbt.contracts.project", "PackageConfig"),
                         ("dbt.contracts.project", "ProjectFlags"), ("dbt.contracts.selection", "SelectorFile"),
                         ("dbt.adapters.duckdb.credentials", "DuckDBCredentials"),
                         ("dbt.contracts.project", "Configuration")):
        try:
            getattr(importlib.import_module(module), name).json_schema()
        except Exception:  # noqa: BLE001 - a warm-up only
            missed.append(f"{module}.{name}")
    from zqdata import dbt_events

    if not dbt_events.install():  # events built by protobuf's constructor (zqdata/dbt_events.py)
        missed.append("zqdata.dbt_events")
    if state is not None:
        missed += _warm_state(state)
    import inspect

    inspect.getmodule(compile("0", "<zq-dbt warm-up>", "eval"))  # an unknown file: maps every loaded module's file
    return missed


def _warm_state(state: str) -> list[str]:
    """`warm_up`'s state part alone (a server started before the first state existed); what it missed."""
    try:
        _warm_serializers(state)
        return []
    except Exception:  # noqa: BLE001 - a warm-up only
        return [f"state {state}"]


def _report_missed(missed: list[str]) -> None:
    if missed:  # the calls build these themselves: slower, not wrong
        print(f"zq-dbt fork server: 预热未完成 (not warmed): {', '.join(missed)}", file=sys.stderr, flush=True)


def _warm_serializers(state: str) -> None:
    """Decode a partial-parse state as dbt does, then encode it as dbt's flat graph and written manifest do: the
    (de)serializers of every class in it compiled once, here."""
    import gc

    from dbt.contracts.graph.manifest import Manifest
    from dbt.parser.manifest import extended_mashumuro_decoder

    manifest = Manifest.from_msgpack(Path(state).read_bytes(), decoder=extended_mashumuro_decoder)
    manifest.build_flat_graph()
    manifest.fill_tracking_metadata = lambda: None  # reads the call's flags, which a server has not: not serializing
    manifest.writable_manifest().to_dict(omit_none=False, context={"artifact": True})
    del manifest
    gc.collect()


def serve(path: str, state: str | None = None) -> None:
    """Import dbt and warm it (`warm_up`, with the partial-parse `state` when given), then fork a session per
    connection on `path` until stdin closes (the owner is gone)."""
    import dbt.adapters.duckdb  # noqa: F401  the adapter's import too: every call here is a duckdb target
    import dbt.cli.main  # noqa: F401  the import every dbt call would pay

    import zqdata.jinja_code  # noqa: F401  each session installs it (cache_templates)
    _report_missed(warm_up(state))
    warmed, pending = state is not None, b""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:  # one thread only: a session is a fork of this loop, with no lock held by another thread
        readable, _, _ = select.select([listener, 0], [], [])
        if 0 in readable:
            data = os.read(0, 4096)
            if not data:
                os._exit(0)  # EOF on stdin: the process that started this server closed the pipe or died
            pending += data
            while b"\n" in pending:  # a line from the owner (never from a client): a state to warm with, once
                line, pending = pending.split(b"\n", 1)
                if line and not warmed:
                    warmed = True
                    missed = _warm_state(os.fsdecode(line))  # before the call waiting on the listener
                    _report_missed(missed)
                    sys.stdout.write("missed\n" if missed else "warmed\n")  # one line: the pipe holds it unread
                    sys.stdout.flush()
        if listener not in readable:
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        if os.fork() == 0:
            listener.close()
            _session(conn)  # never returns
        conn.close()


def _session(conn: socket.socket) -> None:
    """One dbt call: the client's fds, environment and folder, then dbt's CLI as the `dbt` script runs it."""
    code = 2
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # dbt's own subprocesses are waited for as usual
        header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) < _HEADER.size or len(fds) != 3:
            os._exit(2)
        raw = _recv_exactly(conn, _HEADER.unpack(header)[0])
        if raw is None:
            os._exit(2)
        req = json.loads(raw)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        time.tzset()
        os.chdir(req["cwd"])
        conn.sendall(_PID.pack(os.getpid()))
        threading.Thread(target=_die_when_client_leaves, args=(conn,), daemon=True).start()
        cache_templates(req["argv"], req["cwd"])
        code = run_cli(req["argv"])
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(_CODE.pack(code))
        os._exit(code)


def run_cli(argv: list[str]) -> int:
    """dbt's CLI on `argv` in this process, as the `dbt` script runs it, with the gate its environment requests
    (zqdata/dbt_gate.py: the request is taken out of the environment first); its exit code. A gate that cannot be
    installed stops the call before dbt parses anything (exit 2)."""
    import traceback

    from zqdata import dbt_gate

    try:
        dbt_gate.install(os.environ)
    except Exception:  # noqa: BLE001 - fail closed: dbt does not run without the gate it was asked to run with
        traceback.print_exc()
        print("dbt 检查门未能安装，dbt 未运行 (the requested dbt gate could not be installed: dbt did not run)",
              file=sys.stderr, flush=True)
        return 2
    sys.argv = ["dbt", *argv]
    from dbt.cli.main import cli

    try:
        cli()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends the `dbt` script
        traceback.print_exc()
        return 1


def project_folder(argv: list[str], cwd: str) -> Path:
    """The dbt project a call runs: its `--project-dir`, else its working folder (as dbt finds it)."""
    for i, arg in enumerate(argv):
        if arg == "--project-dir" and i + 1 < len(argv):
            return Path(cwd, argv[i + 1])
        if arg.startswith("--project-dir="):
            return Path(cwd, arg.split("=", 1)[1])
    return Path(cwd)


def cache_templates(argv: list[str], cwd: str) -> bool:
    """The session serves dbt's compiled Jinja templates from the project's `target/jinja_code/` and keeps what it
    compiles there (zqdata/jinja_code.py). False when the call has no project (`dbt --version`) or the cache cannot
    be installed: dbt then compiles every template itself."""
    from zqdata import jinja_code

    project = project_folder(argv, cwd)
    if not (project / "dbt_project.yml").is_file():
        return False
    return jinja_code.install(project / "target" / jinja_code.FOLDER)


def _die_when_client_leaves(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    os.kill(os.getpid(), signal.SIGKILL)  # the client is gone (its step was killed): dbt must not go on alone


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a file: the package folder is not an import root
    serve(sys.argv[1], *sys.argv[2:3])
