"""Column lineage of the dbt models: computed from the compiled SQL and the DuckDB schema after `dbt build`, and stored
as `dagster/column_lineage` on the materializations of the dbt assets."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dbt.cli.main import dbtRunner

from assets.dbt_common import (
    DBT_PROJECT_DIR,
    add_column_lineage,
    dbt_vars,
    relation_asset_keys,
    release_in_process_dbt,
    to_column_lineage,
)
from zqdata import asset_keys, column_lineage as cl
from zqdata.ingest import ensure_gov_tables
from zqdata.reference import intermediate_model, staging_model, sync_reference_tables
from zqdata.registry import load_registry

DAY = "2025-05-01"
REG = load_registry()
DATASET = "resident_population"
STG, INT = staging_model(REG, DATASET), intermediate_model(DATASET)
PRODUCT, SCENARIO = "ops_sme_credit_profile", "sme_credit_profile"


def _gov_db(path: Path) -> None:
    """An empty gov DB: the ODS tables exactly as ingestion creates them, and the ref.* tables from the registry."""
    with duckdb.connect(str(path)) as con:
        for ds in REG.datasets.values():
            ensure_gov_tables(con, ds)
        sync_reference_tables(con, REG)


def _ops_db(path: Path) -> None:
    """An empty ops DB holding the scenario tables of the credit-profile scenario (its authorized fields only)."""
    with duckdb.connect(str(path)) as con:
        con.execute(f"create schema scenario_{SCENARIO}")
        for dataset, fields in REG.scenarios[SCENARIO].authorized_fields.items():
            cols = ", ".join(f"{f} varchar" for f in fields)
            con.execute(f"create table scenario_{SCENARIO}.{dataset} ({cols}, _lineage_id varchar, _partition_date date)")


def _dbt_build(tmp: Path, target: str, select: list[str], scenarios: bool = False) -> dict:
    """`dbt build` into tmp/target; returns the run-time manifest (compiled_code of the executed models)."""
    vars_ = json.dumps(dbt_vars(REG, DAY, scenarios=scenarios))
    res = dbtRunner().invoke(["build", "--target", target, "--select", *select, "--vars", vars_,
                              "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
                              "--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs")])
    release_in_process_dbt()  # the profile opens DuckDB locked: close it before the test opens the file
    assert res.success, res.exception
    return json.loads((tmp / "target" / "manifest.json").read_text())


def _uid(manifest: dict, name: str) -> str:
    return next(uid for uid, n in manifest["nodes"].items() if n["resource_type"] == "model" and n["name"] == name)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("column_lineage")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZQ_GOV_DB", str(tmp / "gov.duckdb"))
    mp.setenv("ZQ_OPS_DB", str(tmp / "ops.duckdb"))
    _gov_db(tmp / "gov.duckdb")
    _ops_db(tmp / "ops.duckdb")
    gov = _dbt_build(tmp / "gov", "gov", [STG, INT])
    ops = _dbt_build(tmp / "ops", "ops", [PRODUCT], scenarios=True)
    yield {"tmp": tmp, "gov": gov, "ops": ops}
    mp.undo()


def _lineage(manifest: dict, db: Path, names: list[str]) -> dict[str, cl.ColumnLineage]:
    ids = [_uid(manifest, n) for n in names]
    columns = cl.read_relation_columns_file(db, cl.relations_to_read(manifest, ids))
    result = cl.manifest_column_lineage(manifest, columns, ids)
    assert result.errors == {}
    return {manifest["nodes"][uid]["name"]: result.by_model[uid] for uid in ids}


def test_staging_column_traces_to_ods_column(built: dict) -> None:
    got = _lineage(built["gov"], built["tmp"] / "gov.duckdb", [STG])[STG]
    assert got["birth_date"] == [(f"ods.{DATASET}", "birth_date")]
    # every registry field and the lineage columns trace 1:1 to the same-named ODS column
    for field in REG.datasets[DATASET].field_names + ["_lineage_id", "_partition_date"]:
        assert got[field] == [(f"ods.{DATASET}", field)], field


def test_intermediate_column_traces_to_staging_column(built: dict) -> None:
    got = _lineage(built["gov"], built["tmp"] / "gov.duckdb", [INT])[INT]
    # `select staged.*` is expanded from the staging table read back from DuckDB
    with duckdb.connect(str(built["tmp"] / "gov.duckdb"), read_only=True) as con:
        table_columns = [r[0] for r in con.execute(
            "select column_name from information_schema.columns where table_schema = 'intermediate' and table_name = ?",
            [INT]).fetchall()]
    assert sorted(got) == sorted(table_columns)
    assert got["birth_date"] == [(f"staging.{STG}", "birth_date")]


def test_product_column_traces_to_scenario_column(built: dict) -> None:
    got = _lineage(built["ops"], built["tmp"] / "ops.duckdb", [PRODUCT])[PRODUCT]
    assert got["insured_headcount"] == [(f"scenario_{SCENARIO}.social_insurance", "insured_headcount")]
    assert got["daily_kwh"] == [(f"scenario_{SCENARIO}.electricity_usage", "kwh")]
    # the lineage-id list draws on every input table of the product
    assert {rel for rel, col in got["_source_lineage_ids"] if col == "_lineage_id"} == {
        f"scenario_{SCENARIO}.{ds}" for ds in REG.scenarios[SCENARIO].authorized_fields}


def test_relations_map_to_translator_asset_keys(built: dict) -> None:
    keys = {**relation_asset_keys(built["gov"]), **relation_asset_keys(built["ops"])}
    assert keys[f"ods.{DATASET}"] == dg.AssetKey(asset_keys.ods(DATASET))
    assert keys[f"staging.{STG}"] == dg.AssetKey(["gov", "staging", STG])
    assert keys[f"intermediate.{INT}"] == dg.AssetKey(["gov", "intermediate", INT])
    assert keys[f"scenario_{SCENARIO}.social_insurance"] == dg.AssetKey(asset_keys.desensitized("social_insurance"))
    assert keys[f"products.{PRODUCT}"] == dg.AssetKey(["ops", "products", PRODUCT])
    lineage = to_column_lineage({"birth_date": [(f"ods.{DATASET}", "birth_date"), ("elsewhere.t", "x")]}, keys)
    assert lineage.deps_by_column["birth_date"] == [
        dg.TableColumnDep(asset_key=dg.AssetKey(asset_keys.ods(DATASET)), column_name="birth_date")]


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)

    def debug(self, msg: str) -> None:
        pass


def test_unparseable_model_gets_a_warning_and_no_lineage(built: dict) -> None:
    manifest = json.loads(json.dumps(built["gov"]))
    stg, int_ = _uid(manifest, STG), _uid(manifest, INT)
    manifest["nodes"][int_]["compiled_code"] = "select from where ((("
    events = [dg.Output(None, output_name=n, metadata={"unique_id": uid}) for n, uid in (("a", stg), ("b", int_))]
    log = _Log()
    out = add_column_lineage(events, manifest, built["tmp"] / "gov.duckdb", log)
    assert "dagster/column_lineage" in out[0].metadata and "dagster/column_schema" in out[0].metadata
    assert "dagster/column_lineage" not in out[1].metadata and out[1].metadata == events[1].metadata
    assert len(log.warnings) == 1 and int_ in log.warnings[0]


def test_a_later_night_reuses_the_lineage_only_while_sql_and_columns_are_unchanged(
        built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lineage cache: the next night's SQL (another day literal) is served from the cache with the same result;
    a changed upstream column or a changed SQL is computed again."""
    manifest = built["gov"]
    uid = _uid(manifest, INT)
    sql = manifest["nodes"][uid]["compiled_code"]
    assert f"'{DAY}'" in sql  # the partition's day is a literal of the compiled SQL
    columns = cl.read_relation_columns_file(built["tmp"] / "gov.duckdb", cl.relations_to_read(manifest, [uid]))
    cache = tmp_path / "lineage"
    expected = cl.sql_column_lineage(sql, columns)
    assert expected and cl.cached_sql_column_lineage(sql, columns, cache) == expected
    computed: list[str] = []
    real = cl.sql_column_lineage
    monkeypatch.setattr(cl, "sql_column_lineage", lambda q, c: computed.append(q) or real(q, c))
    next_night = sql.replace(f"'{DAY}'", "'2025-05-02'")
    assert cl.cached_sql_column_lineage(next_night, columns, cache) == expected and computed == []
    stg = next(rel for rel in columns if rel.startswith("staging."))
    widened = {**columns, stg: {**columns[stg], "extra_col": "VARCHAR"}}  # an upstream schema change
    got = cl.cached_sql_column_lineage(next_night, widened, cache)  # `select *`: the new column is in the lineage
    assert len(computed) == 1 and got == {**expected, "extra_col": [(stg, "extra_col")]}
    head, _, tail = sql.rpartition("select * from final")
    assert tail.strip() == ""
    changed = head + "select final.*, final._lineage_id as lineage_copy from final"  # the model's SQL changed
    got = cl.cached_sql_column_lineage(changed, columns, cache)
    assert len(computed) == 2 and got == {**expected, "lineage_copy": expected["_lineage_id"]}
    (cache / f"{cl.lineage_cache_key(sql, columns)}.json").write_text("{not json")  # a damaged entry: recomputed
    assert cl.cached_sql_column_lineage(sql, columns, cache) == expected and len(computed) == 3


def test_missing_database_never_raises(built: dict, tmp_path: Path) -> None:
    events = [dg.Output(None, output_name="a", metadata={"unique_id": _uid(built["gov"], STG)})]
    log = _Log()
    assert add_column_lineage(events, built["gov"], tmp_path / "absent" / "gov.duckdb", log) == events
    assert log.warnings


# ---------------------------------------------------------------- Dagster

def test_materialization_stores_column_lineage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from assets.dbt_common import dbt_resource
    from assets.gov_platform.dbt_models import gov_dbt_assets
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    gov_db, ops_db = tmp_path / "gov.duckdb", tmp_path / "ops.duckdb"
    _gov_db(gov_db)
    stg_key = dg.AssetKey(["gov", "staging", STG])
    int_key = dg.AssetKey(["gov", "intermediate", INT])
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [gov_dbt_assets()], selection=[stg_key, int_key], partition_key=DAY, instance=instance,
            resources={"dbt": dbt_resource(), "warehouse": WarehouseResource(gov_db=str(gov_db), ops_db=str(ops_db))})
        assert result.success
        event = instance.get_latest_materialization_event(stg_key)
        metadata = event.asset_materialization.metadata
        lineage = metadata["dagster/column_lineage"].value
        assert lineage.deps_by_column["birth_date"] == [
            dg.TableColumnDep(asset_key=dg.AssetKey(asset_keys.ods(DATASET)), column_name="birth_date")]
        schema = metadata["dagster/column_schema"].value
        assert {c.name: c.type for c in schema.columns}["birth_date"] == "DATE"
        int_lineage = instance.get_latest_materialization_event(int_key).asset_materialization.metadata[
            "dagster/column_lineage"].value
        assert int_lineage.deps_by_column["birth_date"] == [
            dg.TableColumnDep(asset_key=stg_key, column_name="birth_date")]


def test_ref_sources_are_in_gov_platform_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from assets.gov_platform.dbt_models import gov_dbt_defs
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    defs = dg.Definitions.merge(gov_dbt_defs(), dg.Definitions(resources={"warehouse": WarehouseResource()}))
    graph = defs.resolve_asset_graph()
    for table in ("code_tables", "fields"):
        node = graph.get(dg.AssetKey(["gov", "ref", table]))
        assert node.group_name == "gov_platform" and node.description


def test_failed_dbt_build_still_records_lineage_of_built_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from assets.dbt_common import dbt_resource
    from assets.gov_platform.dbt_models import gov_dbt_assets
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path / "data"))
    gov_db = tmp_path / "gov.duckdb"
    _gov_db(gov_db)
    broken = "subject_consent"
    with duckdb.connect(str(gov_db)) as con:
        con.execute(f"drop table ods.{broken}")  # its staging model errors
    stg_key = dg.AssetKey(["gov", "staging", STG])
    broken_key = dg.AssetKey(["gov", "staging", staging_model(REG, broken)])
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [gov_dbt_assets()], selection=[stg_key, broken_key], partition_key=DAY, instance=instance,
            raise_on_error=False,
            resources={"dbt": dbt_resource(),
                       "warehouse": WarehouseResource(gov_db=str(gov_db), ops_db=str(tmp_path / "ops.duckdb"))})
        # the failure is confined to its dataset (issue 12): the step goes on, the broken model says it did not build
        assert result.success
        event = instance.get_latest_materialization_event(stg_key)
        assert "dagster/column_lineage" in event.asset_materialization.metadata
        assert "column_lineage_page" in event.asset_materialization.metadata
        broken_meta = instance.get_latest_materialization_event(broken_key).asset_materialization.metadata
        assert broken_meta["dbt_status"].value == "error" and broken_meta["partition_rebuilt"].value is False
        assert "dagster/column_lineage" not in broken_meta
