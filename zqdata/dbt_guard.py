"""Guards of the sealed dbt steps (issue 11, finding 1): what a dbt subprocess may see, which models may run on the
ops platform, and which tables a scenario product may read. Plain functions; the Dagster wiring is in assets/.

- `sealed_env`: the dbt subprocess gets the variables profiles.yml needs for ITS target and the bare process
  necessities, nothing else of the parent environment (no pseudonymization key, no other platform's file, no S3/SMTP/
  operational-DB secrets), so `env_var()` in a model or macro finds nothing to read.
- `ops_manifest_problems`: every model under models/ops is a registered scenario product (registry/scenarios.yaml
  `product:`) writing exactly `products.<product>`; no hooks run on the ops platform. Checked on the run's own
  `dbt parse` before `dbt build` starts.
- `scenario_read_problems`: the compiled SQL dbt ran for a product (and for its tests) reads only its own scenario's
  tables `scenario_<code>.*` (and itself, for incremental runs); parsed by DuckDB's own parser
  (`json_serialize_sql`), no table function but `range`/`generate_series`/`unnest`.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any

import duckdb

# ---------------------------------------------------------------- the sealed environment

PROFILE_DB_VARS = {"gov": "ZQ_GOV_DB", "ops": "ZQ_OPS_DB"}  # profiles.yml: the one DuckDB file of each target
PROCESS_VARS = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TEMP", "TMP", "TZ", "USER", "LOGNAME", "VIRTUAL_ENV",
    "SYSTEMROOT", "COMSPEC", "PATHEXT", "WINDIR",  # Windows process necessities
    "DAGSTER_DBT_CLI",  # set by dagster-dbt for its own subprocess
})
PROCESS_PREFIXES = ("LC_", "PYTHON", "DBT_")
# dbt's own carriers of user data (DBT_ENV_SECRET_*, DBT_ENV_CUSTOM_ENV_*) and dbt Cloud credentials are not flags
DENIED_PREFIXES = ("DBT_ENV_", "DBT_CLOUD_")


LAKE_TARGETS = {"gov_lake": "gov", "ops_lake": "ops"}  # ZQ_WAREHOUSE=ducklake: profiles.yml's targets per domain


def dbt_target(domain: str) -> str:
    """The profiles.yml target of a domain's dbt step: ``gov`` / ``ops`` (DuckDB files, the embedded default), or
    ``gov_lake`` / ``ops_lake`` when ``ZQ_WAREHOUSE=ducklake``; the environment alone decides."""
    from zqdata import lakes

    if domain not in PROFILE_DB_VARS:
        raise ValueError(f"未知的 dbt 目标 (unknown dbt target): {domain!r}")
    return f"{domain}_lake" if lakes.warehouse_mode() == "ducklake" else domain


def profile_env(target: str, db_path: Any, memory_limit: str, partition_date: str | None = None,
                partition_range: tuple[str, str] | None = None) -> dict[str, str]:
    """What profiles.yml reads for `target`: that target's DuckDB file and the memory limit (and the partition: one
    day, or the first and last day of a range build, macros/partition.sql).
    A ``*_lake`` target: that domain's lake only (``zqdata.lakes.dbt_environment``) instead of the file."""
    if target in LAKE_TARGETS:
        from zqdata import lakes

        env = lakes.dbt_environment(LAKE_TARGETS[target])
    elif target in PROFILE_DB_VARS:
        env = {PROFILE_DB_VARS[target]: str(db_path)}
    else:
        raise ValueError(f"未知的 dbt 目标 (unknown dbt target): {target!r}")
    # The run's logs in plain text: no ANSI escape codes, and the file log (dbt.log, kept with the run's folder for
    # audit: every statement dbt ran) as dbt's debug text, not JSON: the SQL readable as it ran, and ~0.7 s of CPU
    # less a gov build (each of its ~5,000 debug events is no longer converted to a dict and JSON; bench/notes.md 17).
    # The JSON events dagster-dbt reads are on stdout, unchanged.
    env.update({"ZQ_DUCKDB_MEMORY_LIMIT": str(memory_limit), "DBT_USE_COLORS": "false", "DBT_LOG_FORMAT_FILE": "debug"})
    if partition_date is not None:
        env["ZQ_PARTITION_DATE"] = str(partition_date)
    if partition_range is not None:
        env["ZQ_PARTITION_START"], env["ZQ_PARTITION_END"] = (str(d) for d in partition_range)
    return env


def is_process_var(name: str) -> bool:
    """True for the bare process necessities and non-secret dbt flags a dbt subprocess may inherit."""
    if name.startswith(DENIED_PREFIXES):
        return False
    return name in PROCESS_VARS or name.startswith(PROCESS_PREFIXES)


def sealed_env(environ: Mapping[str, str], profile: Mapping[str, str]) -> dict[str, str]:
    """The dbt subprocess environment: process necessities of `environ`, then exactly `profile` (profile_env)."""
    return {**{k: v for k, v in environ.items() if is_process_var(k)}, **profile}


# ---------------------------------------------------------------- every table on ops is a registered product

OPS_MODELS = ("models", "ops")
PRODUCT_SCHEMA = "products"
TEST_SCHEMA = "dq_audit"  # store_failures of the data tests (dbt_project.yml)


def is_ops_node(node: Mapping[str, Any]) -> bool:
    """A node defined under models/ops/ (dbt's `path:models/ops` selection)."""
    parts = PurePosixPath(str(node.get("original_file_path", "")).replace("\\", "/")).parts
    return parts[:2] == OPS_MODELS


def node_hooks(node: Mapping[str, Any]) -> list[str]:
    """The pre-/post-hook SQL configured on a node."""
    config = node.get("config") or {}
    hooks = [*(config.get("pre-hook") or config.get("pre_hook") or []),
             *(config.get("post-hook") or config.get("post_hook") or [])]
    return [h.get("sql", "") if isinstance(h, Mapping) else str(h) for h in hooks]


# Jinja that runs a query while dbt compiles (its result could be pasted into the compiled SQL as literals, where the
# compiled-SQL check below cannot see which table it came from), or that reaches such a call indirectly.
COMPILE_TIME_QUERY = re.compile(
    r"\b(run_query|statement|load_result|execute_macro|context|builtins|graph)\b|\badapter\s*\.|\battr\s*\("
    r"|\bmodules\s*\.\s*(?!re\b|datetime\b)|\.\s*__|\[\s*['\"]__")  # modules.re / .datetime only; no dunder attributes


def compile_time_query_problems(manifest: Mapping[str, Any], uids: Iterable[str]) -> list[str]:
    """Ops models and their tests, and every project macro they reach, must not query the database while dbt compiles:
    a product's data flows only through the SQL it runs, which `product_read_problems` checks."""
    nodes, macros = manifest.get("nodes", {}), manifest.get("macros", {})
    project = manifest.get("metadata", {}).get("project_name") or "zhaoqing"
    problems: list[str] = []
    seen: set[str] = set()
    todo = list(uids)
    while todo:
        uid = todo.pop()
        if uid in seen:
            continue
        seen.add(uid)
        node = nodes.get(uid) or macros.get(uid)
        if node is None:
            continue
        code = node.get("raw_code") if uid in nodes else node.get("macro_sql")
        if uid in nodes or node.get("package_name") == project:  # dbt's own macros are trusted; project code is not
            match = COMPILE_TIME_QUERY.search(code or "")
            if match:
                problems.append(f"{uid} 在编译时查询数据库或调用受限的 Jinja（{match.group(0)!r}），运营平台不允许 "
                                f"(queries while compiling are not allowed on the ops platform)")
            todo.extend((node.get("depends_on") or {}).get("macros") or [])
    return sorted(problems)


def ops_manifest_problems(manifest: Mapping[str, Any], products: Iterable[str]) -> list[str]:
    """Why the ops dbt build must not start (empty: it may). Chinese with English, one line per problem."""
    registered = set(products)
    problems: list[str] = []
    nodes = manifest.get("nodes", {})
    ops_models = {uid for uid, n in nodes.items() if n.get("resource_type") in ("model", "snapshot", "seed")
                  and is_ops_node(n)}
    for uid in sorted(ops_models):
        n = nodes[uid]
        name, path = n.get("name"), n.get("original_file_path")
        if n.get("resource_type") != "model" or name not in registered:
            problems.append(f"运营平台模型 {name}（{path}）不是登记的场景产品，拒绝构建 "
                            f"(not a registered scenario product: registry/scenarios.yaml `product:`)")
            continue
        schema, alias = (n.get("schema") or "").lower(), (n.get("alias") or name).lower()
        if (schema, alias) != (PRODUCT_SCHEMA, name.lower()):
            problems.append(f"产品 {name} 只能写入 {PRODUCT_SCHEMA}.{name}，却配置为 {schema}.{alias} "
                            f"(a product writes only {PRODUCT_SCHEMA}.<product>)")
        if node_hooks(n):
            problems.append(f"产品 {name} 配置了 pre-hook/post-hook，运营平台不允许钩子 (hooks are not allowed on ops models)")
    for uid, n in sorted(nodes.items()):
        if n.get("resource_type") == "operation":
            problems.append(f"项目钩子 {n.get('name')}（on-run-start/on-run-end）不允许在运营平台运行 "
                            f"(project hooks are not allowed on the ops platform)")
        elif n.get("resource_type") == "test" and set((n.get("depends_on") or {}).get("nodes") or []) & ops_models:
            schema = (n.get("schema") or "").lower()
            if schema != TEST_SCHEMA:
                problems.append(f"产品测试 {n.get('name')} 只能写入 {TEST_SCHEMA}，却配置为 {schema} "
                                f"(product tests store failures only in {TEST_SCHEMA})")
            if node_hooks(n):
                problems.append(f"产品测试 {n.get('name')} 配置了钩子 (hooks are not allowed on ops tests)")
    tests = [uid for uid, n in nodes.items() if n.get("resource_type") == "test"
             and set((n.get("depends_on") or {}).get("nodes") or []) & ops_models]
    problems += compile_time_query_problems(manifest, [*sorted(ops_models), *sorted(tests)])
    return problems


# ---------------------------------------------------------------- a product reads only its own scenario

SAFE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})


_PARSER: dict[int, duckdb.DuckDBPyConnection] = {}  # pid -> an in-memory connection that only parses (never reads)
_PARSER_LOCK = threading.Lock()


def _serialize_sql(sql: str) -> str:
    """DuckDB's `json_serialize_sql` of ``sql`` on one in-memory connection per process: opening a connection per call
    took ~11 ms, the parse itself ~0.2 ms, and a range run checks every product's SQL of every day (issue 15)."""
    with _PARSER_LOCK:
        con = _PARSER.get(os.getpid())
        if con is None:  # first call in this process (a forked child does not reuse its parent's connection)
            _PARSER.clear()
            con = _PARSER[os.getpid()] = duckdb.connect()
        return con.execute("select json_serialize_sql(?)", [sql]).fetchone()[0]


def referenced_relations(sql: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(catalog, schema, table) of every table the SQL reads that is not a CTE in scope, and every table function,
    by DuckDB's own parser. Raises ValueError when DuckDB cannot serialize it (anything but SELECT statements)."""
    tree = json.loads(_serialize_sql(sql))
    if tree.get("error"):
        raise ValueError(tree.get("error_message") or "unparseable SQL")
    tables: list[tuple[str, str, str]] = []
    functions: list[str] = []

    def walk(obj: Any, ctes: frozenset[str]) -> None:
        if isinstance(obj, list):
            for item in obj:
                walk(item, ctes)
            return
        if not isinstance(obj, dict):
            return
        cte_map = obj.get("cte_map")
        if isinstance(cte_map, dict):
            ctes = ctes | {str(e.get("key", "")).lower() for e in cte_map.get("map") or []}
        kind = obj.get("type")
        if kind == "BASE_TABLE" and "table_name" in obj:
            catalog, schema = obj.get("catalog_name") or "", obj.get("schema_name") or ""
            table = obj.get("table_name") or ""
            if catalog or schema or table.lower() not in ctes:
                tables.append((catalog, schema, table))
        elif kind == "TABLE_FUNCTION":
            fn = obj.get("function") or {}
            functions.append(".".join(p for p in (fn.get("catalog"), fn.get("schema"), fn.get("function_name")) if p))
        for value in obj.values():
            walk(value, ctes)

    walk(tree.get("statements"), frozenset())
    return tables, functions


def scenario_read_problems(sql: str, scenario: str, product: str, database: str = "") -> list[str]:
    """Why `sql` (compiled for `product` of `scenario`) reads outside `scenario_<scenario>.*` (empty: it does not)."""
    own_schema = f"scenario_{scenario}".lower()
    try:
        tables, functions = referenced_relations(sql)
    except ValueError as exc:
        return [f"无法解析产品 {product} 的 SQL，拒绝发布 (cannot parse the compiled SQL): {exc}"]
    catalogs = {"", database.lower()}
    problems = []
    for catalog, schema, table in tables:
        rel = ".".join(p for p in (catalog, schema, table) if p)
        ok = catalog.lower() in catalogs and (
            schema.lower() == own_schema or (schema.lower(), table.lower()) == (PRODUCT_SCHEMA, product.lower()))
        if not ok:
            problems.append(f"产品 {product} 读取了场景 {scenario} 以外的表 {rel} "
                            f"(reads outside its scenario: only scenario_{scenario}.* is allowed)")
    for fn in functions:
        if fn.lower() not in SAFE_TABLE_FUNCTIONS:
            problems.append(f"产品 {product} 使用了表函数 {fn} (table functions such as read_csv are not allowed)")
    return problems


def product_read_problems(manifest: Mapping[str, Any], product: str, scenario: str) -> list[str]:
    """The scenario-read problems of a product in a dbt run's manifest: its hooks, its sources, the compiled SQL of
    the model and of every test on it. A product or test not compiled in that run is a problem (nothing to vouch)."""
    nodes = manifest.get("nodes", {})
    model = next((n for n in nodes.values() if n.get("resource_type") == "model" and n.get("name") == product), None)
    if model is None:
        return [f"本次 dbt 运行清单中没有产品 {product} (product missing from the run's manifest)"]
    problems = [f"产品 {product} 配置了钩子 (hooks are not allowed on ops models): {h}" for h in node_hooks(model)]
    own = f"scenario_{scenario}"
    sources = manifest.get("sources", {})
    for dep in (model.get("depends_on") or {}).get("nodes") or []:
        if dep.startswith("source."):
            if (sources.get(dep) or {}).get("source_name") != own:
                problems.append(f"产品 {product} 依赖了场景 {scenario} 以外的数据源 {dep} (source outside its scenario)")
        elif dep != model.get("unique_id"):
            problems.append(f"产品 {product} 依赖了其他模型 {dep} (a product depends only on its scenario's sources)")
    database = str(model.get("database") or "")
    checked = [model] + [n for n in nodes.values() if n.get("resource_type") == "test"
                         and model.get("unique_id") in ((n.get("depends_on") or {}).get("nodes") or [])]
    for node in checked:
        if node is not model:
            problems += [f"产品测试 {node.get('name')} 配置了钩子 (hooks are not allowed): {h}" for h in node_hooks(node)]
        sql = node.get("compiled_code")
        if not node.get("compiled") or sql is None:
            problems.append(f"{node.get('name')} 未在本次运行中编译，无法核验 (not compiled in this run)")
            continue
        problems += [p if node is model else f"{p}（测试 test {node.get('name')}）"
                     for p in scenario_read_problems(sql, scenario, product, database)]
    return problems
