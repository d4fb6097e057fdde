"""Sealed dbt steps (issue 11, finding 1): a malicious model in a COPY of the dbt project, built the way the Dagster
ops step builds it (`dbt build` through dagster-dbt with the sealed environment and the locked DuckDB profile, gated on
its own manifest before any node runs: zqdata/dbt_gate.py), can neither reach the gov file nor the pseudonymization key, nor be an unregistered
table, nor read outside its own scenario without failing the publishing gate."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from assets import dbt_common
from assets.dbt_common import DBT_PROJECT_DIR, ZhaoqingDbtCliResource, dbt_executable, dbt_vars, sealed_cli
from assets.ops_platform.products import ops_gate, scenario_read_result
from assets.ops_platform.publish import REQUIRED_GATES
from zqdata import dbt_gate, dbt_guard
from zqdata.registry import load_registry
from zqdata.settings import get_settings

REG = load_registry()
DAY = "2025-05-01"
KEY = "sealed-test-key-not-a-secret-0123456789abcdef"
RAW_ID = "441202198001011237"
PRODUCTS = "dbt_project/models/ops/products"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A copy of dbt_project, a gov file with a raw ID number, an ops file with both scenarios' tables and
    desensitized.*, and the parent environment of a platform process: key, both paths, S3/SMTP secrets."""
    proj = tmp_path / "dbt_project"
    shutil.copytree(DBT_PROJECT_DIR, proj, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    gov, ops = tmp_path / "gov.duckdb", tmp_path / "ops.duckdb"
    with duckdb.connect(str(gov)) as con:
        con.execute("create schema ods")
        con.execute("create table ods.resident_population (citizen_id varchar)")
        con.execute("insert into ods.resident_population values (?)", [RAW_ID])
    with duckdb.connect(str(ops)) as con:
        con.execute("create schema desensitized")
        con.execute("create table desensitized.resident_population (citizen_id varchar, _partition_date date)")
        con.execute("insert into desensitized.resident_population values ('pseudonym-of-a-resident', ?)", [DAY])
        for code, scenario in REG.scenarios.items():
            con.execute(f"create schema scenario_{code}")
            for dataset, fields in scenario.authorized_fields.items():
                cols = ", ".join(f"{f} varchar" for f in fields)
                con.execute(f"create table scenario_{code}.{dataset} ({cols}, _lineage_id varchar, _partition_date date)")
    monkeypatch.setattr(dbt_common, "DBT_PROJECT_DIR", proj)
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("ZQ_GOV_DB", str(gov))
    monkeypatch.setenv("ZQ_OPS_DB", str(ops))
    monkeypatch.setenv("ZQ_S3_SECRET_KEY", "s3-secret-not-for-dbt")
    monkeypatch.setenv("ZQ_SMTP_PASSWORD", "smtp-secret-not-for-dbt")
    monkeypatch.setenv("DBT_ENV_CUSTOM_ENV_TOKEN", "dbt-custom-not-for-dbt")
    return SimpleNamespace(dir=proj, gov=gov, ops=ops, run=tmp_path / "run")


def _write(p: SimpleNamespace, name: str, sql: str) -> None:
    (p.dir / "models" / "ops" / "products" / f"{name}.sql").write_text(sql, encoding="utf-8")


def _ops_build(p: SimpleNamespace, select: str, gate: bool = True, day: str = DAY):
    """The ops step's dbt: the sealed build, gated on its own manifest as the step's is (build_partition `gate`), or
    without the gate (what the locked DuckDB alone does to a model). Returns (the gate's problems, or None when it
    left no verdict; whether dbt succeeded; the run folder)."""
    run = p.run / ("gated" if gate else "ungated") / day
    vars_ = dbt_vars(REG, day, scenarios=True)
    profile = dbt_guard.profile_env("ops", p.ops, get_settings().duckdb_memory_limit, day)
    dbt = ZhaoqingDbtCliResource(project_dir=str(p.dir), dbt_executable=dbt_executable())
    invocation = sealed_cli(dbt, ["build", "--target", "ops", "--select", select, "--vars", json.dumps(vars_)],
                            {**profile, **(dbt_gate.request(**ops_gate()) if gate else {})}, target_path=run,
                            raise_on_error=False)
    invocation.wait()
    return dbt_gate.verdict(run, "ops_products"), invocation.is_successful(), run


def _messages(run: Path) -> str:
    results = json.loads((run / "run_results.json").read_text(encoding="utf-8"))["results"]
    return "\n".join(str(r.get("message")) for r in results) + (run / "dbt.log").read_text(encoding="utf-8")


def _ops_values(p: SimpleNamespace, sql: str) -> list:
    with duckdb.connect(str(p.ops), read_only=True) as con:
        return con.execute(sql).fetchall()


def _ops_tables(p: SimpleNamespace) -> set[str]:
    return {f"{s}.{t}" for s, t in _ops_values(p, "select table_schema, table_name from information_schema.tables")}


# ---------------------------------------------------------------- (a)(b) the gov file: DuckDB is locked

def test_a_model_attaching_the_gov_file_fails_and_copies_nothing(project) -> None:
    _write(project, "ops_transit_ridership", f"""
{{% do run_query("attach '{project.gov}' as gov_file (read_only)") %}}
select citizen_id as route_id, cast(_partition_date as date) as _partition_date
from gov_file.ods.resident_population, (select date '{DAY}' as _partition_date)
""")
    _, ok, run = _ops_build(project, "ops_transit_ridership", gate=False)  # the gate refuses run_query: below it
    assert ok is False
    assert "file system operations are disabled" in _messages(run)
    assert "products.ops_transit_ridership" not in _ops_tables(project)


@pytest.mark.parametrize("hook", [
    "attach '{gov}' as gov_file (read_only)",
    "set enable_external_access = true",   # undoing the lock is refused too
    "reset lock_configuration",
    "copy (select 1) to '{gov}.csv'",
])
def test_b_a_pre_hook_is_refused_before_dbt_and_fails_in_duckdb_anyway(project, hook: str) -> None:
    sql = hook.format(gov=project.gov)
    _write(project, "ops_transit_ridership", f"""{{{{ config(pre_hook="{sql}") }}}}
select route_id, cast(_partition_date as date) as _partition_date
from {{{{ scenario_source('transit_ridership', 'bus_card_swipes', ['route_id']) }}}}
""")
    problems, ok, run = _ops_build(project, "ops_transit_ridership")
    assert any("pre-hook/post-hook" in p and "hooks are not allowed" in p for p in problems), problems
    assert ok is False and not (run / "run_results.json").exists()  # refused: no node ran
    assert "products.ops_transit_ridership" not in _ops_tables(project)
    _, ok, run = _ops_build(project, "ops_transit_ridership", gate=False)
    assert ok is False  # built without the gate (as an old code path would): the locked connection refuses the hook
    assert ("file system operations are disabled" in _messages(run)
            or "the configuration has been locked" in _messages(run))


def test_b_a_hook_armed_on_one_date_is_refused_by_that_days_own_gate(project) -> None:
    """The sealed environment holds the day being built, and a model can declare a hook only on some date: a check of
    one day's parse says nothing of another, so every build (each day of a range run too) checks its own manifest."""
    armed = (dt.date.fromisoformat(DAY) + dt.timedelta(days=1)).isoformat()
    _write(project, "ops_transit_ridership", f"""{{% if env_var('ZQ_PARTITION_DATE', '') == '{armed}' %}}
{{{{ config(pre_hook="attach '{project.gov}' as gov_file (read_only)") }}}}
{{% endif %}}
select route_id, cast(_partition_date as date) as _partition_date
from {{{{ scenario_source('transit_ridership', 'bus_card_swipes', ['route_id']) }}}}
""")
    problems, _, run = _ops_build(project, "ops_transit_ridership", day=DAY)
    assert problems == [] and (run / "run_results.json").exists()  # passed: dbt ran it (its tests' results aside)
    problems, ok, run = _ops_build(project, "ops_transit_ridership", day=armed)
    assert ok is False and any("hooks are not allowed" in p for p in problems), problems
    assert not (run / "run_results.json").exists()  # refused: nothing ran


# ---------------------------------------------------------------- (c) the environment: sealed

def test_c_the_pseudonym_key_and_the_gov_path_are_not_in_the_ops_dbt_environment(project) -> None:
    _write(project, "ops_transit_ridership", """
select '{{ env_var('ZQ_PSEUDONYM_KEY') }}' as route_id, date '2025-05-01' as _partition_date
""")
    problems, ok, run = _ops_build(project, "ops_transit_ridership")
    assert ok is False and problems is None  # dbt could not parse the model: nothing to check, nothing ran
    log = (run / "dbt.log").read_text(encoding="utf-8")
    assert "Env var required but not provided: 'ZQ_PSEUDONYM_KEY'" in log and KEY not in log
    leaked = [f for f in project.run.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert not leaked


def test_c_the_ops_dbt_process_sees_only_its_profile_and_process_variables(project) -> None:
    probes = ["ZQ_PSEUDONYM_KEY", "ZQ_GOV_DB", "ZQ_S3_SECRET_KEY", "ZQ_SMTP_PASSWORD", "DBT_ENV_CUSTOM_ENV_TOKEN",
              dbt_gate.GATE_ENV]  # the gate's request is taken out of the environment before dbt starts
    seen = " || '|' || ".join(f"'{{{{ env_var('{v}', 'absent') }}}}'" for v in probes)
    _write(project, "ops_transit_ridership", f"""
select {seen} as route_id, 0 as hour_of_day, 5 as distinct_riders,
       '{{{{ env_var('ZQ_OPS_DB') }}}}' as ops_file, date '{DAY}' as _partition_date
""")
    _, ok, run = _ops_build(project, "ops_transit_ridership")
    assert ok, _messages(run)
    [(values, ops_file)] = _ops_values(project, "select route_id, ops_file from products.ops_transit_ridership")
    assert values == "|".join(["absent"] * len(probes)) and ops_file == str(project.ops)


def test_sealed_env_keeps_only_process_necessities_and_the_target_profile() -> None:
    parent = {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/t", "PYTHONUNBUFFERED": "1",
              "DBT_LOG_FORMAT": "json", "DBT_TARGET_PATH": "/r", "DAGSTER_DBT_CLI": "true",
              "ZQ_PSEUDONYM_KEY": KEY, "ZQ_GOV_DB": "/gov", "ZQ_OPS_DB": "/ops", "ZQ_OPDB_URL": "postgresql://u:p@h/db",
              "AWS_SECRET_ACCESS_KEY": "x", "ZQ_S3_SECRET_KEY": "x", "ZQ_SMTP_PASSWORD": "x",
              "DBT_ENV_SECRET_GIT": "x", "DBT_ENV_CUSTOM_ENV_X": "x", "ZQ_DATA_DIR": "/d", "SOMETHING": "x"}
    ops = dbt_guard.sealed_env(parent, dbt_guard.profile_env("ops", "/tmp/ops.duckdb", "1GB", DAY))
    assert ops == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/t",
                   "PYTHONUNBUFFERED": "1", "DBT_LOG_FORMAT": "json", "DBT_TARGET_PATH": "/r", "DAGSTER_DBT_CLI": "true",
                   "ZQ_OPS_DB": "/tmp/ops.duckdb", "ZQ_DUCKDB_MEMORY_LIMIT": "1GB", "ZQ_PARTITION_DATE": DAY,
                   "DBT_USE_COLORS": "false", "DBT_LOG_FORMAT_FILE": "debug"}
    gov = dbt_guard.sealed_env(parent, dbt_guard.profile_env("gov", "/tmp/gov.duckdb", "1GB", DAY))
    assert "ZQ_OPS_DB" not in gov and "ZQ_PSEUDONYM_KEY" not in gov and gov["ZQ_GOV_DB"] == "/tmp/gov.duckdb"


def test_profiles_lock_both_targets_and_need_only_their_own_file() -> None:
    import yaml

    outputs = yaml.safe_load((DBT_PROJECT_DIR / "profiles.yml").read_text(encoding="utf-8"))["zhaoqing"]["outputs"]
    assert {"gov", "ops"} <= set(outputs)
    for name, out in outputs.items():
        opts = out["config_options"]
        if name.endswith("_lake"):  # ZQ_WAREHOUSE=ducklake: reaches PostgreSQL and S3 (test_distributed_settings.py)
            domain, other = name.removesuffix("_lake"), {"gov_lake": "ops", "ops_lake": "gov"}[name]
            assert opts["lock_configuration"] is True and "settings" not in out, name
            assert out["attach"][0]["alias"] == f"{domain}_platform" and f"{other}_platform" not in json.dumps(out)
            assert not [v for v in ("ZQ_GOV_", "ZQ_OPS_") if v in json.dumps(out)], name  # domain-neutral names
            continue
        assert opts["enable_external_access"] is False and opts["lock_configuration"] is True, name
        assert "settings" not in out  # dbt-duckdb re-SETs `settings` on every cursor: refused once locked
        other = {"gov": "ZQ_OPS_DB", "ops": "ZQ_GOV_DB"}[name]
        assert other not in json.dumps(out)


# ---------------------------------------------------------------- (d) every table on ops is a registered product

@pytest.mark.parametrize("name,sql,expected", [
    ("ops_leak", "select 1 as x", "ops_leak（models/ops/products/ops_leak.sql）不是登记的场景产品"),
    ("ops_transit_ridership", "{{ config(schema='desensitized', alias='anything') }} select 1 as x",
     "产品 ops_transit_ridership 只能写入 products.ops_transit_ridership，却配置为 desensitized.anything"),
])
def test_d_an_unregistered_or_misplaced_ops_model_is_refused_before_dbt_runs(project, name, sql, expected) -> None:
    _write(project, name, sql)
    problems, ok, run = _ops_build(project, "path:models/ops")
    assert ok is False and any(expected in p for p in problems), problems
    assert not any(t.startswith("products.") for t in _ops_tables(project))
    assert "refused before any node ran" in (run / "dbt.log").read_text(encoding="utf-8")


def test_the_real_project_passes_the_gate(project) -> None:
    problems, ok, run = _ops_build(project, "path:models/ops")
    assert problems == [] and ok, _messages(run)
    for product in sorted({s.product for s in REG.scenarios.values()}):
        result = scenario_read_result(product, run)
        assert result.passed, result.metadata


@pytest.mark.parametrize("jinja", [
    "{% set rows = run_query('select citizen_id from desensitized.resident_population') %}",
    "{% call statement('x', fetch_result=True) %}select 1{% endcall %}",
    "{% set r = adapter.execute('select 1', fetch=True) %}",
    "{% set f = context['run_' ~ 'query'] %}",
])
def test_d_a_product_querying_while_dbt_compiles_is_refused_before_dbt_runs(project, jinja) -> None:
    """run_query & co. could read any ops table at compile time and paste the values into the compiled SQL as
    literals, where the compiled-SQL check cannot see them: refused before dbt runs, in a model or a macro it calls."""
    _write(project, "ops_transit_ridership", jinja + "\nselect 1 as x, date '2025-05-01' as _partition_date")
    problems, ok, _ = _ops_build(project, "path:models/ops")
    assert ok is False and any("编译时查询数据库" in p and "ops_transit_ridership" in p for p in problems), problems
    (project.dir / "macros" / "innocent.sql").write_text(
        "{% macro innocent() %}" + jinja + "{{ return('1') }}{% endmacro %}", encoding="utf-8")
    _write(project, "ops_transit_ridership", "select {{ innocent() }} as x, date '2025-05-01' as _partition_date")
    problems, ok, _ = _ops_build(project, "path:models/ops")
    assert ok is False and any("macro.zhaoqing.innocent" in p for p in problems), problems


# ---------------------------------------------------------------- (e) a product reads only its own scenario

@pytest.mark.parametrize("source,outside", [
    ("desensitized.resident_population", "desensitized.resident_population"),
    ("scenario_sme_credit_profile.enterprise_registry", "scenario_sme_credit_profile.enterprise_registry"),
    ("{{ source('scenario_sme_credit_profile', 'enterprise_registry') }}",
     "ops.scenario_sme_credit_profile.enterprise_registry"),
    ("read_csv('{gov}.csv')", "read_csv"),
])
def test_e_a_product_reading_outside_its_scenario_fails_the_publishing_gate(project, source, outside) -> None:
    _write(project, "ops_transit_ridership", f"""
with s as (
    select route_id, _partition_date from {{{{ scenario_source('transit_ridership', 'bus_card_swipes', ['route_id']) }}}}
)
select s.route_id, x.* exclude (_partition_date), cast(s._partition_date as date) as _partition_date
from s left join (select * from {source.replace("{gov}", str(project.gov))}) x on false
""")
    _, ok, run = _ops_build(project, "ops_transit_ridership")
    result = scenario_read_result("ops_transit_ridership", run)
    assert not result.passed
    problems = result.metadata["problems"].value
    assert any(outside in p and ("only scenario_transit_ridership.* is allowed" in p or "table functions" in p)
               for p in problems), problems
    assert "reads_only_own_scenario" in REQUIRED_GATES


def test_scenario_read_problems_follow_cte_scope_and_case() -> None:
    ok = ("with a as (select * from SCENARIO_T.x), b as (select * from a) "
          "select * from b join range(3) r on true where exists (select 1 from products.p)")
    assert dbt_guard.scenario_read_problems(ok, "t", "p") == []
    # a CTE name shields only where the CTE is in scope; a qualified name is never a CTE
    bad = "select * from (with a as (select 1) select * from a) q, a, main.a, query_table('desensitized.x')"
    problems = dbt_guard.scenario_read_problems(bad, "t", "p")
    assert len(problems) == 3, problems
    assert dbt_guard.scenario_read_problems("create table x as select 1", "t", "p")[0].startswith("无法解析")
