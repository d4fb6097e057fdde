"""The dbt gate (zqdata/dbt_gate.py, issue 15): a dbt build checks the manifest it parsed before any node runs, in the
process that runs dbt (a fork server session, or the zq-dbt client itself without a server); a refusal runs nothing,
the request never reaches dbt's environment, and a gate that cannot be installed stops dbt before it parses. The
ops step's side (`assets.dbt_common.gated`) turns a refusal into the step's failure and accepts a build only with a
passing verdict. The ops project's own cases (hooks, unregistered products, a hook armed on one date) are in
tests/test_sealed_dbt.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets import dbt_common
from tests.test_dbt_fork import CLIENT, _dbt, _env, _project, server  # noqa: F401 - the fixture
from zqdata import dbt_fork, dbt_gate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SCM_RIGHTS, PR_SET_PDEATHSIG")
CHECK = "ops_products"


def _tables(project: Path) -> set[str]:
    db = project / "probe.duckdb"
    if not db.exists():
        return set()
    with duckdb.connect(str(db), read_only=True) as con:
        return {t for (t,) in con.execute("select table_name from information_schema.tables").fetchall()}


def _probe(tmp: Path, where: str) -> Path:
    """A probe project whose one model (a table, reading the gate's variable) is at models/<where>/probe_model.sql:
    under models/ops/ it is an ops model that no product list registers."""
    project = _project(tmp, "")
    (project / "models" / "probe_model.sql").unlink()
    folder = project / "models" / where
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_model.sql").write_text(
        "{{ config(materialized='table') }}\n"
        f"select '{{{{ env_var('{dbt_gate.GATE_ENV}', 'absent') }}}}' as gate_seen")
    return project


@pytest.fixture(params=["server", "no server"])
def via(request, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment entry that reaches a fork server session, or none: the client then runs dbt itself."""
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} missing: `pip install -e .` installs the zq-dbt console script (pyproject.toml)")
    if request.param == "no server":
        monkeypatch.setenv(dbt_fork.SWITCH_ENV, "0")
        assert dbt_fork.ensure_server() == {}
        yield {}
        return
    monkeypatch.delenv(dbt_fork.SWITCH_ENV, raising=False)
    env = dbt_fork.ensure_server()
    assert set(env) == {dbt_fork.SOCKET_ENV}
    yield env
    dbt_fork.stop_server()


def test_a_refused_manifest_runs_no_node_and_says_why(tmp_path: Path, via: dict[str, str]) -> None:
    project = _probe(tmp_path, "ops")
    done, _ = _dbt(project, ["run"], _env(project, **via, **dbt_gate.request(CHECK, products=[])))
    assert done.returncode != 0
    problems = dbt_gate.verdict(project / "target", CHECK)
    assert problems and "probe_model" in problems[0] and "不是登记的场景产品" in problems[0], problems
    assert "probe_model" not in _tables(project)  # nothing ran
    assert "refused before any node ran" in done.stdout
    assert not (project / "target" / "run_results.json").exists()


def test_a_passing_manifest_runs_and_dbt_never_sees_the_request(tmp_path: Path, via: dict[str, str]) -> None:
    project = _probe(tmp_path, "other")
    done, _ = _dbt(project, ["run"], _env(project, **via, **dbt_gate.request(CHECK, products=[])))
    assert done.returncode == 0, done.stdout[-3000:]
    assert dbt_gate.verdict(project / "target", CHECK) == []
    with duckdb.connect(str(project / "probe.duckdb"), read_only=True) as con:
        assert con.execute("select gate_seen from probe_model").fetchall() == [("absent",)]


def test_without_a_request_there_is_no_gate_and_no_verdict(tmp_path: Path, via: dict[str, str]) -> None:
    project = _probe(tmp_path, "ops")  # what the gate would refuse runs: the gate is the request's, not dbt's
    done, _ = _dbt(project, ["run"], _env(project, **via))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "probe_model" in _tables(project)
    assert dbt_gate.verdict(project / "target", CHECK) is None


@pytest.mark.parametrize("raw", ['{"check": "no_such_check"}', "not json", '{"products": []}'])
def test_a_gate_that_cannot_be_installed_stops_dbt_before_it_parses(tmp_path: Path, via: dict[str, str],
                                                                    raw: str) -> None:
    project = _probe(tmp_path, "other")
    done, _ = _dbt(project, ["run"], _env(project, **via, **{dbt_gate.GATE_ENV: raw}))
    assert done.returncode == 2
    assert "the requested dbt gate could not be installed" in done.stderr
    assert not (project / "target" / "manifest.json").exists() and _tables(project) == set()


def test_a_request_names_a_known_check() -> None:
    assert json.loads(dbt_gate.request(CHECK, products=["b", "a"])[dbt_gate.GATE_ENV]) == {
        "check": CHECK, "products": ["b", "a"]}
    with pytest.raises(ValueError, match="unknown dbt gate check"):
        dbt_gate.request("no_such_check")


# ---------------------------------------------------------------- the step's side: assets.dbt_common.gated


def test_the_step_fails_with_the_problems_of_a_refusal(tmp_path: Path) -> None:
    def build():
        dbt_gate.write_verdict(tmp_path, CHECK, ["运营平台模型 x 不是登记的场景产品"])
        raise RuntimeError("dbt exited with 2")
        yield  # a generator, as the step's build is

    with pytest.raises(dg.Failure) as info:
        list(dbt_common.gated(tmp_path, CHECK, build))
    assert info.value.metadata["problems"].value == ["运营平台模型 x 不是登记的场景产品"]
    assert "refused before any node ran" in info.value.description


def test_a_failure_without_a_refusal_is_the_builds_own(tmp_path: Path) -> None:
    def build():
        dbt_gate.write_verdict(tmp_path, CHECK, [])
        raise RuntimeError("a model failed")
        yield

    with pytest.raises(RuntimeError, match="a model failed"):
        list(dbt_common.gated(tmp_path, CHECK, build))


@pytest.mark.parametrize("verdict", [None, ["a problem"], "other check"])
def test_a_build_without_a_passing_verdict_is_not_accepted(tmp_path: Path, verdict) -> None:
    def build():
        if verdict == "other check":
            dbt_gate.write_verdict(tmp_path, "another", [])
        elif verdict is not None:
            dbt_gate.write_verdict(tmp_path, CHECK, verdict)
        yield "event"

    with pytest.raises(dg.Failure, match="no passing verdict"):
        list(dbt_common.gated(tmp_path, CHECK, build))


def test_a_passing_build_gives_its_events(tmp_path: Path) -> None:
    def build():
        dbt_gate.write_verdict(tmp_path, CHECK, [])
        yield from ("a", "b")

    assert list(dbt_common.gated(tmp_path, CHECK, build)) == ["a", "b"]


def test_the_gate_needs_the_client_that_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(dbt_common, "dbt_executable", lambda: dbt_fork.real_dbt())

    def build():
        ran.append(True)
        yield "event"

    with pytest.raises(dg.Failure, match="needs the zq-dbt client"):
        list(dbt_common.gated(tmp_path, CHECK, build))
    assert ran == []
