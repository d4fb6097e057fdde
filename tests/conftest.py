"""Shared fixtures: an isolated data dir, the registry, a local landing store, a gov DuckDB, an S3 (moto) store."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import duckdb
import email
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from zqdata.registry import Registry, load_registry
from zqdata.storage import LocalObjectStore


# `make test` runs the files on pytest-xdist workers, one file per worker at a time, in collection order
# (`--dist loadfile --no-loadscope-reorder`). The longest files (by `--durations`, longest first) start first, so no
# long file is left running alone at the end; the rest keep their order. Order only: no test depends on it.
LONGEST_FILES_FIRST = [
    "test_nightly_e2e.py", "test_distributed.py", "test_service.py", "test_range_backfill.py", "test_landing_faults.py",
    "test_quality_recall.py", "test_bench.py", "test_range_dbt.py", "test_ui_browser.py", "test_reports_browser.py",
    "test_history.py", "test_reports_run.py", "test_publish.py", "test_runs.py", "test_child_dies.py",
    "test_preflight.py", "test_dbt.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True, scope="session")
def _dbt_profile_env() -> None:
    """profiles.yml reads ZQ_DUCKDB_MEMORY_LIMIT: Dagster sets it for each dbt run; tests that call dbt directly too."""
    import os

    from zqdata.settings import get_settings

    os.environ.setdefault("ZQ_DUCKDB_MEMORY_LIMIT", get_settings().duckdb_memory_limit)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``ZQ_DATA_DIR`` pointed at a fresh folder; local store backend."""
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZQ_STORE_BACKEND", "local")
    monkeypatch.delenv("ZQ_LANDING_DIR", raising=False)
    monkeypatch.delenv("ZQ_GOV_DB", raising=False)
    monkeypatch.delenv("ZQ_OPS_DB", raising=False)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def reg() -> Registry:
    return load_registry()


@pytest.fixture
def store(data_dir: Path) -> LocalObjectStore:
    return LocalObjectStore(data_dir / "landing")


@pytest.fixture
def gov_con(data_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    path = data_dir / "warehouse" / "gov_platform.duckdb"
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    yield con
    con.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A ``moto_server`` on a free loopback port for the session; killed at teardown."""
    from s3server import moto_executable, moto_server

    if moto_executable() is None:
        pytest.skip("moto_server not installed in the venv")
    with moto_server() as (endpoint, _proc):
        yield endpoint


@pytest.fixture
def s3_store(moto_endpoint: str, request: pytest.FixtureRequest):
    """An S3ObjectStore on moto, one fresh bucket per test."""
    from zqdata.storage import S3ObjectStore

    bucket = "zq-test-" + "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:40]
    return S3ObjectStore(moto_endpoint, "testing", "testing", bucket, secure=False, region="us-east-1")


# --- loopback SMTP and HTTP servers that receive the alerts to source agencies ---------------------------------

class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture
def smtp_server():
    box = _Mailbox()
    ctl = Controller(box, hostname="127.0.0.1", port=_free_port())
    ctl.start()
    yield ctl, box
    ctl.stop()


@pytest.fixture
def http_server():
    received: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body.decode("utf-8"))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):  # keep test output quiet
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", received
    srv.shutdown()
    srv.server_close()


# --- the operational database (issues, notifications, audit): SQLite by default, PostgreSQL in production --------

@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL server on loopback for the session. Required on CI (`make test` installs the package)."""
    import os

    from pgserver import pg_bin, postgres_server

    if pg_bin() is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL server missing on CI: `make test` should have installed it")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
    with postgres_server() as url:
        yield url


_AUDIT_TEST_KEY = secrets.token_hex(32)


@pytest.fixture(params=["sqlite", "postgresql"])
def opdb(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The operational DB engine on both backends, empty, and ``ZQ_OPDB_URL`` pointing at it (for the CLI)."""
    import sqlalchemy as sa

    from zqdata import opdb as opdb_module

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'opdb' / 'operational.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = opdb_module.get_engine(url)
    with engine.begin() as conn:  # empty for each test (the PostgreSQL server lives for the session)
        for table in reversed(opdb_module.metadata.sorted_tables):
            conn.execute(sa.delete(table))
    monkeypatch.setenv(opdb_module.URL_ENV, url)
    # The audit log's HMAC key (random per test session, never stored) and its anchor: where the data_dir fixture's
    # default would put it, one per test, so a test never sees another test's anchor (the PostgreSQL server is shared).
    monkeypatch.setenv("ZQ_AUDIT_KEY", _AUDIT_TEST_KEY)
    monkeypatch.setenv("ZQ_AUDIT_ANCHOR", str(tmp_path / "data" / "gov" / "audit_anchor.json"))
    return engine
