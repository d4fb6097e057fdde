"""The dbt project for Dagster: one cached DbtProject, the one translator, and the dbt vars built from the registry.

The manifest is prepared once, never at import: when missing or stale at definitions load (`dbt_project()`), or by
`python -m assets.dbt_common` (runs `dbt parse`; the Makefile/CI should call it before loading definitions).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from packaging import version
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliInvocation,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from zqdata import asset_keys
from zqdata import column_lineage as cl
from zqdata import dbt_fork, dbt_gate, dbt_guard, jinja_code
from zqdata.lineage_page import lineage_page_path, lineage_page_url, update_lineage_page
from zqdata.quality import check_info
from zqdata.registry import Registry, registry
from zqdata.settings import get_settings, repo_root

DBT_PROJECT_DIR = repo_root() / "dbt_project"
# the column lineage of compiled models, reused from night to night (zqdata.column_lineage.cached_sql_column_lineage):
# names of relations and columns only, beside dbt's own partial-parse states
LINEAGE_CACHE_DIR = DBT_PROJECT_DIR / "target" / "column_lineage"
DEFAULT_K_ANONYMITY = 5
TRANSIT_PRODUCT = "ops_transit_ridership"
GOV_DBT_STEP = "gov_dbt_models"  # the step (op) of `dbt build --target gov`


def dbt_env(gov_db: Path, ops_db: Path) -> dict[str, str]:
    """What profiles.yml reads: the two DuckDB files and the DuckDB memory limit (settings)."""
    return {"ZQ_GOV_DB": str(gov_db), "ZQ_OPS_DB": str(ops_db),
            "ZQ_DUCKDB_MEMORY_LIMIT": get_settings().duckdb_memory_limit}


def set_dbt_env() -> None:
    """Point the dbt profile's two targets at the configured DuckDB files (for `dbt parse` and manual dbt runs)."""
    s = get_settings()
    os.environ.update(dbt_env(s.gov_db, s.ops_db))
    s.gov_db.parent.mkdir(parents=True, exist_ok=True)
    s.ops_db.parent.mkdir(parents=True, exist_ok=True)


@functools.cache
def dbt_project() -> DbtProject:
    """The dbt project (both targets share one manifest; the target is chosen per invocation with --target).

    Not `DbtProject.prepare_if_dev()`: under `dagster dev` it runs `dbt` from PATH (absent when the venv is not
    activated) and rewrites target/manifest.json in place while other processes read it. The manifest is built here
    only when missing or older than the project's files, with the venv's dbt, and replaced atomically.
    """
    set_dbt_env()
    project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
    if manifest_stale(project.manifest_path):
        prepare_manifest()
    return project


def manifest_stale(manifest: Path) -> bool:
    """True when the manifest is missing or a model, macro, test or project file is newer than it."""
    if not manifest.is_file():
        return True
    built = manifest.stat().st_mtime
    sources = [DBT_PROJECT_DIR / "dbt_project.yml", DBT_PROJECT_DIR / "profiles.yml"]
    for folder in ("models", "macros", "tests"):
        sources += [p for p in (DBT_PROJECT_DIR / folder).rglob("*") if p.suffix in (".sql", ".yml", ".yaml")]
    return any(p.stat().st_mtime > built for p in sources if p.is_file())


class ZhaoqingDbtCliResource(DbtCliResource):
    """dagster-dbt's `dbt` resource without two start-up costs it pays before every dbt step (3.2 s measured before
    each night's gov build):

    - `dbt --version` in a subprocess (1.8 s): with the venv's own dbt, the version comes from dbt-core's metadata;
    - an in-process dbt adapter (1.4 s), used only by `.fetch_row_counts()` / `.fetch_column_metadata()`, which this
      project never calls (they would open the DuckDB file in this process with another configuration).
    """

    @functools.cached_property
    def _cli_version(self) -> version.Version:
        if Path(self.dbt_executable).parent == Path(sys.executable).parent:
            return version.parse(importlib.metadata.version("dbt-core"))
        return DbtCliResource._cli_version.func(self)  # another dbt: ask it

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:  # type: ignore[override]
        return None


@functools.cache
def dbt_resource() -> DbtCliResource:
    """The `dbt` resource (one instance, so merging the gov and ops definitions does not conflict)."""
    return ZhaoqingDbtCliResource(project_dir=dbt_project(), dbt_executable=dbt_executable())


def dbt_executable() -> str:
    """What a step starts as dbt: `zq-dbt` (zqdata/dbt_fork.py: dbt run by this process's fork server, which has
    imported dbt once; without one it execs dbt itself) beside this interpreter, else dbt's own executable."""
    client = Path(sys.executable).parent / dbt_fork.CLIENT
    return str(client) if client.exists() else dbt_fork.real_dbt()


# ---------------------------------------------------------------- sealed dbt subprocesses (docs/security.md)

_SEALED: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("zq_sealed_dbt", default=None)


class SealedDbtCliInvocation(DbtCliInvocation):
    """dagster-dbt's invocation; inside `sealed_cli` the subprocess gets the sealed environment instead of the copy
    of os.environ `DbtCliResource.cli()` builds (dagster-dbt 0.29 has no env parameter: this is where it is used)."""

    @classmethod
    def run(cls, args: Sequence[str], env: dict[str, str], *rest: Any, **kwargs: Any) -> DbtCliInvocation:
        state = _SEALED.get()
        if state is not None:
            env = dbt_guard.sealed_env(env, state["profile"])
            state["applied"] = True
        return super().run(args, env, *rest, **kwargs)


class _SubprocessDyingWithParent:
    """The `subprocess` module as dagster-dbt's invocation sees it: Popen children die with their parent."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the module's name
        if sys.platform.startswith("linux") and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = dbt_fork.die_with_parent
        return subprocess.Popen(*args, **kwargs)


def _install_sealed_invocation() -> None:
    import dagster_dbt.core.dbt_cli_invocation as invocation_module
    import dagster_dbt.core.resource as resource_module

    if not issubclass(resource_module.DbtCliInvocation, SealedDbtCliInvocation):
        resource_module.DbtCliInvocation = SealedDbtCliInvocation
    if not isinstance(invocation_module.subprocess, _SubprocessDyingWithParent):
        invocation_module.subprocess = _SubprocessDyingWithParent()


_install_sealed_invocation()


def sealed_cli(dbt: DbtCliResource, args: Sequence[str], profile: Mapping[str, str],
               warm_state: Path | None = None, **kwargs: Any) -> DbtCliInvocation:
    """`dbt.cli(args, **kwargs)` whose subprocess environment holds only the process necessities and `profile`
    (dbt_guard.profile_env): no pseudonymization key, no other platform's file, no S3/SMTP/operational-DB secret.
    Fails closed: a dbt started without the seal is stopped and the step fails. `warm_state`: the partial-parse
    state the dbt fork server warms itself with, once (zqdata/dbt_fork.py `ensure_server`, `warm_up`)."""
    state: dict[str, Any] = {"profile": {**profile, **dbt_fork.ensure_server(warm_state=warm_state)},
                             "applied": False}
    token = _SEALED.set(state)
    try:
        invocation = dbt.cli(list(args), **kwargs)
    finally:
        _SEALED.reset(token)
    if not state["applied"]:
        with contextlib.suppress(Exception):
            invocation.process.kill()
        raise dg.Failure(description="dbt 子进程未能在封闭环境中启动，已终止 (dbt was not started in the sealed "
                                     "environment: dagster-dbt changed how it starts dbt)")
    return invocation


def release_in_process_dbt() -> None:
    """Close the DuckDB instance an in-process dbt (`dbtRunner`: tests, manual use) keeps open after it returns.

    dbt-duckdb caches its connection for the process; the profile opens the file locked (another configuration than
    a plain `duckdb.connect`), and DuckDB refuses a second configuration of an open file in one process."""
    from dbt.adapters.duckdb.connections import DuckDBConnectionManager

    env, DuckDBConnectionManager._ENV = DuckDBConnectionManager._ENV, None
    if env is not None:
        env.close()


def sealed_subprocess_env(target: str, gov_db: Path, ops_db: Path, partition_date: str | None = None) -> dict[str, str]:
    """The sealed environment of a dbt subprocess started directly (dbt parse): process necessities + the target's
    profile variables only."""
    db = gov_db if target == "gov" else ops_db
    profile = dbt_guard.profile_env(target, db, get_settings().duckdb_memory_limit, partition_date)
    return dbt_guard.sealed_env(os.environ, profile)


def prepare_manifest() -> Path:
    """Run `dbt parse` to write target/manifest.json (what `python -m assets.dbt_common` does).

    dbt writes into a folder of its own; the manifest then replaces the old one atomically, so a process reading it
    (a code server, a sensor, a run) never sees half a file. dbt parses in the sealed environment of the gov target:
    a value read by env_var() while parsing is stored in the manifest and the partial-parse state.
    """
    set_dbt_env()
    s = get_settings()
    target = DBT_PROJECT_DIR / "target"
    target.mkdir(parents=True, exist_ok=True)
    scratch = target / f".parse-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(
            [dbt_executable(), "parse", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
             "--target", "gov", "--target-path", str(scratch), "--quiet"],
            check=True, env=sealed_subprocess_env("gov", s.gov_db, s.ops_db),
        )
        os.replace(scratch / "manifest.json", target / "manifest.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target / "manifest.json"


def authorized_fields_var(registry: Registry, day: dt.date | None = None) -> dict[str, dict[str, list[str]]]:
    """{scenario: {dataset: [fields]}} of the scenarios active on `day` (Art. 23: 一场景一授权)."""
    return {
        s.code: {ds: list(fields) for ds, fields in s.authorized_fields.items()}
        for s in registry.scenarios.values()
        if s.status == "active" and (day is None or s.valid_from <= day <= s.valid_to)
    }


def k_anonymity_var(registry: Registry, product: str = TRANSIT_PRODUCT) -> int:
    """k of the scenario owning the aggregate product (registry), default 5."""
    try:
        return registry.scenario_for_product(product).k_anonymity or DEFAULT_K_ANONYMITY
    except KeyError:
        return DEFAULT_K_ANONYMITY


def dbt_vars(registry: Registry, partition_date: str | dt.date, scenarios: bool = False) -> dict[str, Any]:
    """The --vars of a manual run or test: the partition, and for ops products the authorizations and k.

    Dagster's nightly runs pass the partition in the environment instead (`build_partition`), so --vars stay the same
    from night to night and dbt keeps its partial parse.
    """
    day = dt.date.fromisoformat(str(partition_date))
    return {"partition_date": day.isoformat(), **(scenario_vars(registry, day) if scenarios else {})}


def scenario_vars(registry: Registry, day: dt.date) -> dict[str, Any]:
    """The ops products' --vars: the authorized fields of the scenarios in force and k, from the registry."""
    return {"authorized_fields": authorized_fields_var(registry, day), "k_anonymity": k_anonymity_var(registry)}


class ZhaoqingDbtTranslator(DagsterDbtTranslator):
    """Asset keys gov/staging|intermediate/<model>, ops/products/<model>; sources gov/ods/ods_<t>,
    ops/desensitized/desensitized_<t> (`zqdata.asset_keys`)."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            source, table = dbt_resource_props["source_name"], dbt_resource_props["name"]
            if source == "ods":
                return dg.AssetKey(asset_keys.ods(table))
            if source.startswith("scenario_"):
                # the scenario tables are written by the boundary crossing together with ops/desensitized/<dataset>
                return dg.AssetKey(asset_keys.desensitized(table))
            return dg.AssetKey(["gov", source, table])  # ref.* reference tables
        fqn = dbt_resource_props.get("fqn") or []
        # fqn = [project, platform, layer, ..., model]: gov/staging/<model>, gov/intermediate/<model>, ops/products/<model>
        if len(fqn) >= 4:
            return dg.AssetKey([fqn[1], fqn[2], dbt_resource_props["name"]])
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        if dbt_resource_props["resource_type"] == "source":
            # a source belongs to the platform whose DB holds it: gov/* keys -> gov_platform, ops/* -> ops_platform
            return f"{self.get_asset_key(dbt_resource_props).path[0]}_platform"
        fqn = dbt_resource_props.get("fqn") or []
        if len(fqn) >= 2 and fqn[1] in ("gov", "ops"):
            return f"{fqn[1]}_platform"
        return None

    def get_description(self, dbt_resource_props: Mapping[str, Any]) -> str:
        return dbt_resource_props.get("description") or super().get_description(dbt_resource_props)

    def get_asset_check_spec(self, asset_spec: dg.AssetSpec, manifest: Mapping[str, Any], unique_id: str,
                             project: DbtProject | None) -> dg.AssetCheckSpec | None:
        """dagster-dbt's check spec, partitioned like its asset (evaluations carry their partition), described by its
        rule (Art. 20 dimension, severity, agency; zqdata.quality.check_info)."""
        from orchestration.partitions import daily_partitions

        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None:
            return None
        node = manifest["nodes"][unique_id]
        meta = check_info.rule_meta(node)
        agency = test_agency(manifest, node)
        own = (node.get("description") or "").strip() or None
        return spec._replace(partitions_def=daily_partitions,
                             description=check_info.check_description(meta, agency, own) or spec.description,
                             metadata={**(spec.metadata or {}), **check_info.check_spec_metadata(meta, agency)})


def test_agency(manifest: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """The agency whose data a dbt test checks (the dataset of the model it is attached to); None for products."""
    from zqdata.quality.scores import dataset_of_model

    model = (node.get("attached_node") or "").rsplit(".", 1)[-1]
    ds = dataset_of_model(model, registry()) if model else None
    return registry().datasets[ds].agency if ds else None


def enrich_check_result(event: dg.AssetCheckResult, node: Mapping[str, Any], manifest: Mapping[str, Any],
                        records_checked: int | None) -> dg.AssetCheckResult:
    """A dbt check evaluation with its rule's metadata entries, records checked / failed, pass rate, and the UI
    severity of its rule (a failed error rule shows ERROR; a warn rule WARN)."""
    meta = check_info.rule_meta(node)
    failed = event.metadata.get("dagster_dbt/failed_row_count")
    failed = getattr(failed, "value", failed)
    entries = check_info.evaluation_metadata(meta, test_agency(manifest, node), records_checked,
                                             None if failed is None else int(failed))
    severity = (dg.AssetCheckSeverity.ERROR if meta.get("severity", "error") == "error" else dg.AssetCheckSeverity.WARN)
    metadata = {k: v for k, v in event.metadata.items() if k != "status"}
    if "status" in event.metadata:  # dbt's own test status (warn/fail/pass) follows its config, not the rule: renamed
        metadata["dbt_test_status"] = event.metadata["status"]
    return event._replace(metadata={**metadata, **entries}, severity=severity)


@functools.cache
def translator() -> ZhaoqingDbtTranslator:
    """The one translator; dbt tests become asset checks (error-severity tests are blocking in dagster-dbt 0.29)."""
    return ZhaoqingDbtTranslator(settings=DagsterDbtTranslatorSettings(enable_asset_checks=True))


def manifest_model(manifest: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The manifest node of a model by name."""
    for node in manifest.get("nodes", {}).values():
        if node.get("resource_type") == "model" and node.get("name") == name:
            return node
    raise KeyError(f"dbt manifest has no model {name!r}")


def dbt_source_specs(manifest: Mapping[str, Any], source_names: Iterable[str]) -> list[dg.AssetSpec]:
    """External asset specs of dbt sources no other asset defines (ref.*), so they get the translator's group.

    dagster-dbt only makes sources `deps`, which Dagster puts in group `default`.
    """
    names = set(source_names)
    tr = translator()
    return [
        dg.AssetSpec(key=tr.get_asset_key(props), group_name=tr.get_group_name(props),
                     description=tr.get_description(props), kinds={"duckdb"})
        for props in manifest.get("sources", {}).values() if props["source_name"] in names
    ]


# ---------------------------------------------------------------- column lineage as asset metadata

def relation_asset_keys(manifest: Mapping[str, Any]) -> dict[str, dg.AssetKey]:
    """{relation `<schema>.<table>`: asset key} of every dbt model and source, by the one translator."""
    tr = translator()
    out: dict[str, dg.AssetKey] = {}
    for section in ("nodes", "sources"):
        for props in manifest.get(section, {}).values():
            if props.get("relation_name") and props["resource_type"] in ("model", "snapshot", "seed", "source"):
                out[cl.relation_of(props["relation_name"])] = tr.get_asset_key(props)
    return out


def to_column_lineage(lineage: cl.ColumnLineage, keys: Mapping[str, dg.AssetKey]) -> dg.TableColumnLineage:
    """Dagster's TableColumnLineage; upstream relations that are not dbt models/sources are left out."""
    return dg.TableColumnLineage(deps_by_column={
        column: [dg.TableColumnDep(asset_key=keys[rel], column_name=col) for rel, col in deps if rel in keys]
        for column, deps in lineage.items()
    })


def classified_schema(schema: dg.TableSchema, keys: Mapping[str, dg.AssetKey], manifest: Mapping[str, Any],
                      uid: str) -> dg.TableSchema:
    """The materialized schema with each registered field's classification (zqdata.catalog), as the definition has."""
    from zqdata.catalog import catalog_entry, merge_columns

    key = keys.get(cl.relation_of(manifest["nodes"][uid]["relation_name"]))
    entry = catalog_entry(key.path, registry()) if key is not None else None
    if entry is None or entry.dataset is None:
        return schema
    columns = merge_columns([(c.name, c.type, c.description) for c in schema.columns], entry.dataset, entry.crossing)
    return dg.TableSchema(columns=[dg.TableColumn(n, t, description=d, tags=dict(tags) or None)
                                   for n, t, d, tags in columns])


def to_column_schema(columns: Mapping[str, str]) -> dg.TableSchema:
    """Dagster's TableSchema from {column: DuckDB type}."""
    return dg.TableSchema(columns=[dg.TableColumn(name=name, type=type_) for name, type_ in columns.items()])


def add_column_lineage(events: list[Any], manifest: Mapping[str, Any], db_path: Path,
                       log: logging.Logger, domain: str | None = None) -> list[Any]:
    """The model events with `dagster/column_lineage` and `dagster/column_schema` added; other events unchanged.

    Lineage is best effort: a model whose lineage fails gets a warning and no lineage, the run goes on.
    """
    started = time.monotonic()
    model_ids = [uid for e in events if isinstance(e, (dg.Output, dg.AssetMaterialization))
                 and (uid := _unique_id(e)) and uid in manifest.get("nodes", {})]
    if not model_ids:
        return events
    try:
        columns = cl.read_relation_columns_file(db_path, cl.relations_to_read(manifest, model_ids), domain)
        result = cl.manifest_column_lineage(manifest, columns, model_ids, cache_dir=LINEAGE_CACHE_DIR)
        keys = relation_asset_keys(manifest)
    except Exception as e:  # noqa: BLE001 - lineage must never fail the dbt run
        log.warning(f"列级血缘未能计算 (column lineage skipped): {type(e).__name__}: {e}")
        return events
    for uid, reason in result.errors.items():
        log.warning(f"模型 {uid} 的列级血缘未能计算 (column lineage skipped): {reason}")
    page = None
    try:  # the open-source UI does not show dagster/column_lineage: a page of the project's lineage, linked per model
        page = update_lineage_page(lineage_page_path(), manifest, result.by_model, result.errors)
    except Exception as e:  # noqa: BLE001 - lineage must never fail the dbt run
        log.warning(f"列级血缘页面未能更新 (column lineage page not updated): {type(e).__name__}: {e}")
    out = []
    for event in events:
        uid = _unique_id(event) if isinstance(event, (dg.Output, dg.AssetMaterialization)) else None
        if uid in result.by_model:
            try:
                extra: dict[str, Any] = {"dagster/column_lineage": to_column_lineage(result.by_model[uid], keys)}
                own = columns.get(cl.relation_of(manifest["nodes"][uid]["relation_name"]))
                if own:
                    extra["dagster/column_schema"] = classified_schema(to_column_schema(own), keys, manifest, uid)
                if page is not None:
                    extra["column_lineage_page"] = dg.MetadataValue.url(lineage_page_url(
                        manifest["nodes"][uid]["name"], page, get_settings().docs_base_url))
                event = event.with_metadata({**event.metadata, **extra})
            except Exception as e:  # noqa: BLE001 - lineage must never fail the dbt run
                log.warning(f"模型 {uid} 的列级血缘未能附加 (column lineage skipped): {type(e).__name__}: {e}")
        out.append(event)
    log.debug(f"column lineage of {len(result.by_model)} models in {time.monotonic() - started:.2f}s")
    return out


def _unique_id(event: Any) -> str | None:
    value = (event.metadata or {}).get("unique_id")
    return getattr(value, "value", value)


UnbuiltHandler = Callable[[Mapping[str, Any], Mapping[str, Any]], "list[Any] | None"]


def stream_with_column_lineage(invocation: DbtCliInvocation, db_path: Path, context: dg.AssetExecutionContext,
                               on_unbuilt: UnbuiltHandler | None = None, *, domain: str | None = None
                               ) -> Iterator[Any]:
    """`invocation.stream()` buffered, then re-yielded with column lineage; a dbt failure is re-raised afterwards.

    The schema is read with a plain read-only connection after the dbt subprocess exits: dagster-dbt's in-process
    adapter fetches would keep the DuckDB file open with another configuration.

    ``on_unbuilt(run_results, manifest)``: called when dbt failed; when it returns events (it confined the failure to
    the models that did not build, zqdata.quality.model_failures), they follow the built models' events and the step
    goes on; when it returns None the failure is re-raised.
    """
    events: list[Any] = []
    failure: BaseException | None = None
    try:
        events.extend(invocation.stream())
    except Exception as e:  # noqa: BLE001 - re-raised below, after the successful models are recorded
        failure = e
    if failure is not None:
        _retry_if_lost_commit_race(invocation, context, failure)
    try:
        manifest = invocation.get_artifact("manifest.json")
    except Exception as e:  # noqa: BLE001
        context.log.warning(f"读取 dbt 运行清单失败，无列级血缘 (no run manifest): {type(e).__name__}: {e}")
        manifest = None
    if manifest is not None:
        events = add_column_lineage(events, manifest, db_path, context.log, domain)
    if failure is not None and on_unbuilt is not None and manifest is not None:
        try:
            run_results = invocation.get_artifact("run_results.json")
        except Exception:  # noqa: BLE001 - no results to confine the failure with: re-raised below
            run_results = None
        confined = on_unbuilt(run_results, manifest) if run_results is not None else None
        if confined is not None:
            events, failure = [*events, *confined], None
    yield from events
    if failure is not None:
        raise failure


LAKE_RACE_RETRIES = 5  # a dbt build that lost a DuckLake commit race to a concurrent day runs again up to this often


def _retry_if_lost_commit_race(invocation: DbtCliInvocation, context: dg.AssetExecutionContext,
                               failure: BaseException) -> None:
    """On a DuckLake, a model or a test (its stored failures) that lost a commit race to a concurrent day is not the
    data's fault: the whole step runs again (idempotent per partition) before any of its results is reported, so no
    check fails and no dataset is held back for it. Nothing to do on DuckDB files, where steps never race."""
    from zqdata.lakes import warehouse_mode
    from zqdata.quality.model_failures import lost_commit_race

    if warehouse_mode() != "ducklake":
        return
    try:
        run_results = invocation.get_artifact("run_results.json")
    except Exception:  # noqa: BLE001 - no results: the failure is handled as before
        return
    if lost_commit_race(run_results):
        import random

        wait = round(random.uniform(2.0, 10.0), 1)
        context.log.warning(f"dbt 提交与并发运行冲突，{wait} 秒后重跑本步骤 (a dbt commit lost a race with a concurrent "
                            f"day: the step runs again in {wait}s)")
        raise dg.RetryRequested(max_retries=LAKE_RACE_RETRIES, seconds_to_wait=wait) from failure


# ---------------------------------------------------------------- one partition's dbt build


def partitioned_dbt_assets(select: str, name: str, pool: str):
    """`@dbt_assets` as both platforms use it: the one manifest and translator, daily partitions, under the pool of
    the DuckDB file dbt writes. An embedded backfill runs as one run over its range (issue 15; a lake: one per day):
    one dbt build over the range's days (gov), or over each stretch of them (ops), its events split by day
    (`split_by_day`) and recorded per day (`ranged_dbt_events`)."""
    from orchestration.partitions import daily_partitions
    from orchestration.ranges import nightly_backfill_policy

    project = dbt_project()
    return dbt_assets(manifest=project.manifest_path, project=project, select=select, name=name,
                      dagster_dbt_translator=translator(), partitions_def=daily_partitions, pool=pool,
                      backfill_policy=nightly_backfill_policy())


def ranged_dbt_events(events: Iterable[Any], day: dt.date, day_events: Any) -> Iterator[Any]:
    """One day's events of a dbt step, as the step records them (orchestration.ranges.DayEvents): unchanged in a
    single-day run; in a range run each model's metadata and each test's evaluation go to the day's partition, and
    the outputs are yielded once by `day_events.finish()`."""
    if day_events.single:
        yield from events
        return
    ctx = day_events.context
    ad = ctx.assets_def
    for event in events:
        if isinstance(event, dg.Output):
            key = ad.keys_by_output_name[event.output_name]
            ctx.add_asset_metadata(dict(event.metadata or {}), asset_key=key, partition_key=day.isoformat())
            day_events.output_materialized(key)
        elif isinstance(event, dg.MaterializeResult):
            yield from day_events.materialize(day, event.asset_key, dict(event.metadata or {}),
                                              event.check_results or ())
        elif isinstance(event, dg.AssetCheckResult):
            yield from day_events.check(day, event)
        elif isinstance(event, (dg.AssetMaterialization, dg.AssetObservation)):
            yield event._replace(partition=day.isoformat())
        else:
            yield event


# ---------------------------------------------------------------- one build over a range, split by day (issue 15)

def split_by_day(con: Any, events: list[Any], manifest: Mapping[str, Any],
                 days: list[dt.date]) -> dict[dt.date, list[Any]] | None:
    """A range build's events (gov or ops) as each day's own build would have given them: every model event on each
    day; every test's result per day, failed when its stored failures (dq_audit, every row with its `_partition_date`)
    hold rows of that day. None when a failing test's stored failures cannot be told apart by day."""
    tests = {n["name"]: n for n in manifest.get("nodes", {}).values() if n.get("resource_type") == "test"}
    out: dict[dt.date, list[Any]] = {day: [] for day in days}
    for event in events:
        if not (isinstance(event, dg.AssetCheckResult) and event.check_name in tests):
            for day in days:
                out[day].append(event)
            continue
        node = tests[event.check_name]
        total = event.metadata.get("dagster_dbt/failed_row_count")
        total = int(getattr(total, "value", total) or 0)
        per_day = failures_by_day(con, node, total)
        if per_day is None:
            return None
        for day in days:
            out[day].append(day_check_result(event, node, per_day.get(day, 0)))
    return out


def failures_by_day(con: Any, node: Mapping[str, Any], total: int) -> dict[dt.date, int] | None:
    """{day: failing rows} of a test from its stored failures; None when they cannot be split by day (no
    `_partition_date`, or not the rows dbt counted)."""
    if total == 0:
        return {}
    schema, table = node.get("schema"), node.get("alias") or node.get("name")
    try:
        rows = con.execute(f'select cast(_partition_date as date), count(*) from "{schema}"."{table}" group by 1'
                           ).fetchall()
    except Exception:  # noqa: BLE001 - no table, or no _partition_date: not splittable
        return None
    counts = {day: int(n) for day, n in rows}
    return counts if sum(counts.values()) == total and None not in counts else None


def day_check_result(event: dg.AssetCheckResult, node: Mapping[str, Any], failed: int) -> dg.AssetCheckResult:
    """dagster-dbt's check result of a range build, for one day with `failed` failing rows: the status dbt gives a
    test with that many failures under its own severity (pass, or warn / fail)."""
    warn = str((node.get("config") or {}).get("severity", "error")).lower() == "warn"
    status = "pass" if failed == 0 else ("warn" if warn else "fail")
    metadata = {**event.metadata, "status": dg.MetadataValue.text(status),
                "dagster_dbt/failed_row_count": dg.MetadataValue.int(failed)}
    return event._replace(passed=failed == 0, metadata=metadata,
                          severity=dg.AssetCheckSeverity.WARN if status == "warn" else dg.AssetCheckSeverity.ERROR)


RUN_DIRS_KEPT = 14  # per dbt asset: the newest run folders (compiled SQL, run_results.json, dbt.log) kept for audit


def build_partition(dbt: DbtCliResource, context: dg.AssetExecutionContext, target: str, gov_db: Path, ops_db: Path,
                    extra_vars: Mapping[str, Any] | None = None,
                    gate: Mapping[str, Any] | None = None,
                    on_unbuilt: UnbuiltHandler | None = None, exclude: Sequence[str] = (),
                    day: dt.date | None = None, keep_runs: int = RUN_DIRS_KEPT,
                    last_day: dt.date | None = None) -> Iterator[Any]:
    """`dbt build --target <target>` of the run's partition; its events, with column lineage, once dbt has exited.

    - dbt runs sealed (docs/security.md, "Sealed dbt steps"): its environment holds only the process necessities and
      what profiles.yml reads for THIS target (its DuckDB file, the memory limit, the partition), and the DuckDB
      connection is locked by profiles.yml (no external access, configuration locked).
    - `gate`: when given ({"check": <zqdata.dbt_gate.CHECKS name>, ...its data}), the build checks the manifest it
      has parsed before any node runs (zqdata/dbt_gate.py; ops: registered products only). A refusal fails the step
      with the problems (`problems` metadata) and nothing ran; a build without a passing verdict fails the step.
    - The partition reaches dbt as ZQ_PARTITION_DATE in the subprocess environment (macros/partition.sql), not as
      --vars: a new night then changes nothing dbt parses.
    - dbt's partial-parse state is kept per target and profile environment between runs (`partial_parse_cache`) and
      put in the run's own target folder before dbt starts, so a night re-parses only the files that changed.
    - Run folders of this asset beyond the newest `keep_runs` and older than an hour are removed (dagster-dbt makes one
      per run; a range run keeps at least one per day of the range: its checks read them after the step).
    - `day`: the partition to build; default the run's partition. With `last_day` (a later day): ONE build of the
      days [day, last_day] (ZQ_PARTITION_START/END, macros/partition.sql; gov in a range run, issue 15), whose
      events the caller splits by day.
    - `on_unbuilt`: see `stream_with_column_lineage` (gov: a failing model holds back its own dataset only).
    - `exclude`: models not built this run (ops: the products reading a dataset the quality gate held back).
    """
    op_name = context.op_execution_context.op.name
    target_dir = DBT_PROJECT_DIR / "target"
    first = day or dt.date.fromisoformat(context.partition_key)
    ranged = last_day is not None and last_day != first
    label = None if day is None else (f"{first}..{last_day}" if ranged else first.isoformat())
    run_dir = target_dir / run_dir_name(op_name, context.run.run_id, label)
    profile_target = dbt_guard.dbt_target(target)  # gov/ops, or gov_lake/ops_lake (ZQ_WAREHOUSE=ducklake)
    args = ["build", "--target", profile_target, *(["--exclude", " ".join(exclude)] if exclude else [])]
    if extra_vars:
        args += ["--vars", json.dumps(extra_vars, ensure_ascii=False, sort_keys=True)]
    profile = dbt_guard.profile_env(profile_target, gov_db if target == "gov" else ops_db,
                                    get_settings().duckdb_memory_limit, None if ranged else first.isoformat(),
                                    (first.isoformat(), last_day.isoformat()) if ranged else None)
    cache = partial_parse_cache(target_dir, profile_target, profile)
    seed_partial_parse(cache, run_dir)
    try:
        if gate is None:
            invocation = sealed_cli(dbt, args, profile, warm_state=cache, context=context, target_path=run_dir)
            yield from stream_with_column_lineage(invocation, gov_db if target == "gov" else ops_db, context,
                                                  on_unbuilt, domain=target)
        else:
            yield from gated(run_dir, gate["check"], lambda: stream_with_column_lineage(
                sealed_cli(dbt, args, {**profile, **dbt_gate.request(**gate)}, warm_state=cache, context=context,
                           target_path=run_dir),
                gov_db if target == "gov" else ops_db, context, on_unbuilt, domain=target))
    finally:
        keep_partial_parse(run_dir, cache)
        prune_partial_parse_caches(cache.parent)
        prune_run_dirs(target_dir, op_name, keep=keep_runs)
        jinja_code.prune(target_dir / jinja_code.FOLDER)


def run_dir_name(op_name: str, run_id: str, day: str | None = None) -> str:
    """`<op>-<run id[:8]>-<random>`; in a range run `<op>-<run id[:8]>-<day>-<random>` (a build per day) or
    `<op>-<run id[:8]>-<first>..<last>-<random>` (one build over the range)."""
    return "-".join([op_name, run_id[:8], *([day] if day else []), uuid.uuid4().hex[:7]])


def run_dir_covers(name: str, op_name: str, run_id: str, day: str) -> bool:
    """Whether the run folder `name` (`run_dir_name`) is this run's build of `day`: the day's own
    (`<op>-<run>-<day>-<random>`) or a range's that holds it (`<op>-<run>-<first>..<last>-<random>`)."""
    prefix = f"{op_name}-{run_id[:8]}-"
    if not name.startswith(prefix):
        return False
    first, _, last = name[len(prefix):].rsplit("-", 1)[0].partition("..")
    return len(first) == 10 and first <= day <= (last or first)


def gated(run_dir: Path, check: str, build: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """The events of `build()`, a dbt build run with the gate `check` (zqdata/dbt_gate.py) and target folder `run_dir`:
    a refusal is re-raised as the step's failure with the problems (nothing ran); a build that left no passing verdict
    fails the step after it (it ran without the gate: dbt itself started instead of `zq-dbt`)."""
    if Path(dbt_executable()).name != dbt_fork.CLIENT:
        raise dg.Failure(description=f"dbt 检查门需要 {dbt_fork.CLIENT}（pip install -e .），未运行 dbt "
                                     f"(the dbt gate needs the {dbt_fork.CLIENT} client: dbt did not run)")
    try:
        events = list(build())
    except Exception as e:
        problems = dbt_gate.verdict(run_dir, check)
        if problems:
            raise dg.Failure(description="dbt 构建前检查未通过，未运行任何节点 (refused before any node ran):\n"
                                         + "\n".join(problems), metadata={"problems": problems}) from e
        raise
    if dbt_gate.verdict(run_dir, check) != []:
        raise dg.Failure(description=f"dbt 构建没有检查门 {check} 的通过记录，结果不予采用 (the dbt build left no "
                                     f"passing verdict of its gate: its results are not accepted)")
    yield from events


PARTITION_ENV = ("ZQ_PARTITION_DATE", "ZQ_PARTITION_START", "ZQ_PARTITION_END")


def partial_parse_cache(target_dir: Path, profile_target: str, profile: Mapping[str, str]) -> Path:
    """Where the partial-parse state of `profile_target` is kept between runs: one file per target and profile
    environment (the warehouse files, the memory limit; not the partition, which changes every night).

    dbt stores the values profiles.yml read in its state and parses everything again when one differs. Keyed by them,
    processes with other warehouses on the same checkout (a benchmark, another data folder, parallel test workers) keep
    their own state instead of invalidating each other's every night. Secrets are left out of the key (a changed
    password then costs one full parse, as before)."""
    parsed_env = sorted((k, v) for k, v in profile.items()
                        if k not in PARTITION_ENV and not any(w in k for w in ("PASSWORD", "SECRET", "TOKEN")))
    digest = hashlib.sha256(json.dumps(parsed_env).encode()).hexdigest()[:12]
    return target_dir / "partial_parse" / f"{profile_target}-{digest}.msgpack"


PARTIAL_PARSE_CACHES_KEPT = 16  # ~1 MB each: the targets of a few warehouses on one checkout


def prune_partial_parse_caches(folder: Path, keep: int = PARTIAL_PARSE_CACHES_KEPT) -> list[Path]:
    """Remove the kept partial-parse states beyond the newest `keep` (by modification time: a state is rewritten by
    every build that uses it); one removed while a run reads it only costs that run a full parse."""
    states = sorted(folder.glob("*.msgpack"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in states[keep:]:
        old.unlink(missing_ok=True)
    return states[keep:]


def seed_partial_parse(cache: Path, run_dir: Path) -> bool:
    """Copy the target's kept partial-parse state into a new run folder (False when there is none yet)."""
    if not cache.is_file():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache, run_dir / "partial_parse.msgpack")
    return True


def keep_partial_parse(run_dir: Path, cache: Path) -> bool:
    """Keep the state dbt wrote in `run_dir` for the next run of the same target (atomic replace)."""
    state = run_dir / "partial_parse.msgpack"
    if not state.is_file():
        return False
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
    shutil.copyfile(state, tmp)
    os.replace(tmp, cache)
    return True


RUN_DIR_GRACE_SECONDS = 3600  # a run folder younger than this is never pruned: another run may still be reading it


def prune_run_dirs(target_dir: Path, op_name: str, keep: int,
                   grace_seconds: float = RUN_DIR_GRACE_SECONDS) -> list[Path]:
    """Remove `<op_name>-*` run folders beyond the newest `keep` (by modification time) that are older than
    `grace_seconds`; returns the removed ones.

    The grace period protects the folders of concurrent runs (several code locations, or test processes, share the
    project's target folder): a run's checks read its folder after its dbt step, and other runs' builds in between
    must not remove it, however many there are."""
    runs = sorted((p for p in target_dir.glob(f"{op_name}-*") if p.is_dir()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    cutoff = time.time() - grace_seconds
    removed = [p for p in runs[keep:] if p.stat().st_mtime < cutoff]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


if __name__ == "__main__":
    print(prepare_manifest())
