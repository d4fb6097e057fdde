"""The object store down or hung: every S3 call ends within its timeouts and retries, with one clear error naming the
store and the operation; the same store works again once the server is back (issue 17, finding 2)."""

from __future__ import annotations

import os
import signal
import threading

import dagster as dg
import pytest

from zqdata.storage import ObjectStoreUnavailable, S3ObjectStore, S3Timeouts, store_from_env

pytestmark = pytest.mark.skipif(
    __import__("s3server").moto_executable() is None, reason="moto_server not installed in the venv")

SHORT = S3Timeouts(connect=1, read=2, retries=1, backoff=0.1)
BOUND_S = 300  # generous: the call must end on its own, long before this (a hang would otherwise block forever)


def call_with_bound(fn):
    """Run ``fn`` in a thread; (finished, result or exception). A hang shows as finished=False, not a stuck test."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND_S)
    return not t.is_alive(), out


def test_a_hung_store_fails_with_a_clear_error_and_works_again_after():
    from s3server import moto_server

    with moto_server() as (endpoint, proc):
        store = S3ObjectStore(endpoint, "testing", "testing", "zq-hung", region="us-east-1", timeouts=SHORT)
        store.put_bytes("a/b.csv", b"x,y\n1,2\n")
        os.kill(proc.pid, signal.SIGSTOP)  # the server accepts connections but never answers
        try:
            finished, out = call_with_bound(lambda: store.get_bytes("a/b.csv"))
            assert finished, "the read hung instead of timing out"
            err = out.get("error")
            assert isinstance(err, ObjectStoreUnavailable), out
            message = str(err)
            assert "\n" not in message
            assert endpoint in message and "zq-hung" in message and "get_object" in message and "a/b.csv" in message
            finished, out = call_with_bound(lambda: store.put_bytes("a/c.csv", b"1"))
            assert finished and isinstance(out.get("error"), ObjectStoreUnavailable), out
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert store.get_bytes("a/b.csv") == b"x,y\n1,2\n"  # the same client recovers


def test_a_store_that_is_down_fails_with_a_clear_error():
    from s3server import moto_server

    with moto_server() as (endpoint, proc):
        store = S3ObjectStore(endpoint, "testing", "testing", "zq-down", region="us-east-1", timeouts=SHORT)
        store.put_bytes("k.json", b"{}")
        proc.kill()
        proc.wait(timeout=60)
        for call, name in ((lambda: store.list(""), "list_objects"), (lambda: store.exists("k.json"), "stat_object"),
                           (lambda: store.get_bytes("k.json"), "get_object")):
            finished, out = call_with_bound(call)
            assert finished
            err = out.get("error")
            assert isinstance(err, ObjectStoreUnavailable) and name in str(err) and endpoint in str(err), out


def test_timeouts_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ZQ_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("ZQ_S3_READ_TIMEOUT", "30")
    monkeypatch.setenv("ZQ_S3_RETRIES", "5")
    t = S3Timeouts.from_env()
    assert (t.connect, t.read, t.retries) == (2.5, 30, 5)
    client = t.http_client()
    assert client.connection_pool_kw["timeout"].connect_timeout == 2.5
    assert client.connection_pool_kw["retries"].total == 5
    monkeypatch.setenv("ZQ_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ZQ_S3_READ_TIMEOUT"):
        S3Timeouts.from_env()


def test_store_from_env_applies_the_timeouts(monkeypatch, moto_endpoint, data_dir):
    monkeypatch.setenv("ZQ_STORE_BACKEND", "s3")
    monkeypatch.setenv("ZQ_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("ZQ_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("ZQ_S3_SECRET_KEY", "testing")
    monkeypatch.setenv("ZQ_S3_READ_TIMEOUT", "7")
    store = store_from_env()
    assert store.timeouts.read == 7
    assert store.client._http.connection_pool_kw["timeout"].read_timeout == 7


def _job_reading_a_flaky_store(failures: int):
    """A one-op job whose store read fails ``failures`` times with ObjectStoreUnavailable, then succeeds."""
    from orchestration.resources import store_step_retries

    calls = {"n": 0}

    @dg.op
    def read_delivery(context):
        with store_step_retries(context):
            calls["n"] += 1
            if calls["n"] <= failures:
                raise ObjectStoreUnavailable(f"对象存储不可用 object store unavailable: get_object 'k' on s3:9/b (#{calls['n']})")
            return calls["n"]

    @dg.job
    def flaky():
        read_delivery()

    return flaky, calls


def test_a_step_retries_a_store_outage_then_succeeds(monkeypatch):
    monkeypatch.setenv("ZQ_STORE_STEP_RETRIES", "2")
    monkeypatch.setenv("ZQ_STORE_STEP_WAIT_SECONDS", "0.01")
    job, calls = _job_reading_a_flaky_store(failures=2)
    result = job.execute_in_process(raise_on_error=False)
    assert result.success and calls["n"] == 3
    assert result.output_for_node("read_delivery") == 3


def test_a_step_fails_with_the_store_message_after_its_retries(monkeypatch):
    monkeypatch.setenv("ZQ_STORE_STEP_RETRIES", "1")
    monkeypatch.setenv("ZQ_STORE_STEP_WAIT_SECONDS", "0.01")
    job, calls = _job_reading_a_flaky_store(failures=10)
    result = job.execute_in_process(raise_on_error=False)
    assert not result.success and calls["n"] == 2  # first try + one retry, then the failure
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "object store unavailable" in failure.message and "s3:9/b" in failure.message
