"""Settings are validated before any work: `zq nightly` with an empty or short key, a bad memory limit, an unwritable
data folder or an unreachable store stops at once with the reason, and runs nothing (issue 17, finding 5)."""

from __future__ import annotations

import os

import pytest

from zqdata.preflight import preflight_problems

GOOD_KEY = "k" * 40


@pytest.fixture
def env(data_dir, monkeypatch):
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", GOOD_KEY)
    monkeypatch.delenv("ZQ_STORE_BACKEND", raising=False)
    return monkeypatch


def test_a_good_configuration_has_no_problem(env):
    assert preflight_problems() == []


@pytest.mark.parametrize("key, expected", [("", "ZQ_PSEUDONYM_KEY"), ("short", "太短")])
def test_a_bad_key_is_reported_before_any_work(env, key, expected):
    env.setenv("ZQ_PSEUDONYM_KEY", key)
    problems = preflight_problems()
    assert len(problems) == 1 and expected in problems[0]


def test_a_bad_memory_limit_is_reported(env):
    env.setenv("ZQ_DUCKDB_MEMORY_LIMIT", "lots")
    assert any("ZQ_DUCKDB_MEMORY_LIMIT" in p for p in preflight_problems())


def test_an_unwritable_data_folder_is_reported(env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env.setenv("ZQ_GOV_DB", str(blocker / "sub" / "gov.duckdb"))  # no one, not even root, makes a folder in a file
    assert any("ZQ_GOV_DB" in p and "not writable" in p for p in preflight_problems())


def test_an_unreachable_store_is_reported(env):
    from s3server import free_port

    env.setenv("ZQ_STORE_BACKEND", "s3")
    env.setenv("ZQ_S3_ENDPOINT", f"127.0.0.1:{free_port()}")  # nothing listens there
    env.setenv("ZQ_S3_ACCESS_KEY", "testing")
    env.setenv("ZQ_S3_SECRET_KEY", "testing")
    env.setenv("ZQ_S3_CONNECT_TIMEOUT", "1")
    env.setenv("ZQ_S3_RETRIES", "0")
    problems = preflight_problems()
    assert len(problems) == 1 and "landing store unreachable" in problems[0]


def test_zq_nightly_stops_before_running_anything(env, tmp_path):
    import subprocess
    import sys

    home = tmp_path / "dagster_home"
    home.mkdir()
    env.setenv("ZQ_PSEUDONYM_KEY", "")
    done = subprocess.run([sys.executable, "-m", "zqdata.cli", "nightly", "--date", "2025-06-01"],
                          capture_output=True, text=True, env={**os.environ, "DAGSTER_HOME": str(home)}, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "nothing was run" in done.stdout and "ZQ_PSEUDONYM_KEY" in done.stdout
    assert list(home.iterdir()) == []  # no run was created: the instance was never opened
