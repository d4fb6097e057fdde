"""The catalog the Dagster UI shows (issue 14): owners, classification tags, storage names on both sides of the
boundary, column classification, and checks that carry their partition, rule, dimension and severity."""

from __future__ import annotations

import warnings

import dagster as dg
import pytest

from zqdata import asset_keys
from zqdata.registry import registry


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ZQ_DATA_DIR", str(tmp_path_factory.mktemp("catalog")))
    mp.setenv("ZQ_PSEUDONYM_KEY", "catalog-test-key-not-a-secret-0123456789")
    from orchestration.definitions import defs

    from orchestration.jobs import NIGHTLY_JOB

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        location = defs()
        g = location.resolve_asset_graph()
        location.resolve_job_def(NIGHTLY_JOB)
    mp.undo()
    return location, g, caught


def _schema(node) -> dg.TableSchema:
    value = node.metadata["dagster/column_schema"]
    return getattr(value, "schema", value)


def _node(g, *path):
    return g.get(dg.AssetKey(list(path)))


def test_each_asset_is_owned_by_the_responsible_organisation(graph):
    _, g, _ = graph
    for key in g.get_all_asset_keys():
        assert g.get(key).owners, f"{key.to_user_string()} has no owner"
    ds = registry().datasets["resident_population"]
    assert _node(g, "landing", "delivery_resident_population").owners == [f"team:{ds.agency}"]
    assert _node(g, "gov", "ods", "ods_resident_population").owners == [f"team:{ds.agency}"]
    assert _node(g, "gov", "staging", f"stg_{ds.agency}__resident_population").owners == [f"team:{ds.agency}"]
    assert _node(g, "gov", "intermediate", "int_resident_population").owners == ["team:data_bureau"]
    assert _node(g, "gov", "quality", "scores").owners == ["team:data_bureau"]
    assert _node(g, "ops", "desensitized", "desensitized_bus_card_swipes").owners == ["team:operator"]
    assert _node(g, "ops", "products", "ops_transit_ridership").owners == ["team:operator"]


def test_classification_tags_and_column_classification_come_from_the_registry(graph):
    _, g, _ = graph
    ods = _node(g, "gov", "ods", "ods_resident_population")
    assert {k: ods.tags[k] for k in ("agency", "gbt43697_level", "pi", "openness")} == {
        "agency": "psb", "gbt43697_level": "core", "pi": "sensitive", "openness": "not_open"}
    columns = {c.name: c for c in _schema(ods).columns}
    cid = next(f for f in registry().datasets["resident_population"].fields if f.name == "citizen_id")
    assert columns["citizen_id"].tags["pi"] == cid.class_.pi == "sensitive"
    ops = _node(g, "ops", "desensitized", "desensitized_bus_card_swipes")
    assert ops.tags["pi"] == "desensitized"
    ops_columns = {c.name: c for c in _schema(ops).columns}
    authorized = {n for s in registry().scenarios.values() for n in s.authorized_fields.get("bus_card_swipes", [])}
    assert set(ops_columns) - {"_lineage_id", "_partition_date"} == authorized  # only what may cross is listed
    assert all(ops_columns[n].tags.get("mask") for n in authorized)


def test_storage_names_say_which_database_holds_the_table(graph):
    _, g, _ = graph
    for key in g.get_all_asset_keys():
        name = g.get(key).metadata.get("dagster/table_name")
        table = (asset_keys.parse(key.path) or ("", key.path[-1]))[1]  # the label without its layer's prefix
        if key.path[0] == "ops" and key.path[1] in ("products", "desensitized"):
            assert name == f"ops_platform.{key.path[1]}.{table}", (key, name)
        elif key.path[0] == "gov" and key.path[1] in ("ods", "staging", "intermediate"):
            assert name == f"gov_platform.{key.path[1]}.{table}", (key, name)
    assert _node(g, "gov", "quality", "issues").metadata["dagster/table_name"].startswith("operational_db.")


def test_every_daily_check_is_partitioned_and_described(graph):
    location, g, caught = graph
    daily = {k for k in g.get_all_asset_keys() if g.get(k).partitions_def is not None
             and getattr(g.get(k).partitions_def, "cron_schedule", None) == "0 0 * * *"}
    checks = [g.get(ck) for ck in g.asset_check_keys]
    for check in checks:
        if check.key.asset_key in daily:
            assert check.partitions_def is not None, f"{check.key.to_user_string()} has no partition"
            assert check.description, f"{check.key.to_user_string()} has no description"
    dbt_rule = next(c for c in checks if c.key.asset_key.path[1] == "staging" and "required" in c.key.name)
    assert dbt_rule.description.startswith("必填字段为空") and "完整性 Completeness" in dbt_rule.description
    # a quiet front door: nothing of Dagster's preview/beta/deprecation warnings comes from the project's own code
    ours = [w for w in caught if issubclass(w.category, (dg.PreviewWarning, dg.BetaWarning, DeprecationWarning,
                                                         UserWarning)) and "site-packages/sqlglotrs" not in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def _upstream(g, key: dg.AssetKey) -> set[dg.AssetKey]:
    seen, todo = set(), [key]
    while todo:
        for parent in g.get(todo.pop()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def test_a_products_lineage_shows_its_own_inputs_only(graph):
    """Issue 14: the gate is drawn per dataset, so a product's upstream is its scenario's datasets (with their gate
    decisions, and the consent records where they have consent subjects), not every agency's data."""
    _, g, _ = graph
    reg = registry()
    for scenario in reg.scenarios.values():
        up = _upstream(g, dg.AssetKey(["ops", "products", scenario.product]))
        names = [(asset_keys.parse(k.path) or ("", k.path[-1]))[1] for k in up]
        datasets = {ds for ds in reg.datasets if any(n in (ds, f"int_{ds}", f"gate_{ds}") or n.endswith(f"__{ds}")
                                                      for n in names)}
        allowed = set(scenario.authorized_fields) | {"subject_consent", "enterprise_registry"}
        assert set(scenario.authorized_fields) <= datasets, (scenario.code, datasets)
        assert datasets <= allowed, (scenario.code, datasets - allowed)
        assert not any(k.path[-1] in ("findings", "scores") for k in up), scenario.code
    transit = _upstream(g, dg.AssetKey(["ops", "products", "ops_transit_ridership"]))
    assert len(transit) < 15, sorted(k.to_user_string() for k in transit)


def test_every_node_label_is_distinct_and_names_its_layer(graph):
    """The lineage graph labels a node with the last part of its key: a dataset's delivery, ODS table and desensitized
    copy (and a product and its published snapshot) must be told apart by that label alone."""
    _, g, _ = graph
    labels: dict[str, list[str]] = {}
    for key in g.get_all_asset_keys():
        labels.setdefault(key.path[-1], []).append(key.to_user_string())
    assert {label: keys for label, keys in labels.items() if len(keys) > 1} == {}
    assert _node(g, "landing", "delivery_resident_population") is not None
    assert _node(g, "ops", "published", "published_transit_ridership") is not None
    # the label parses back to what it names, and the old (bare) form still reaches the same asset
    assert asset_keys.parse("ops/desensitized/desensitized_bus_card_swipes") == ("desensitized", "bus_card_swipes")
    assert asset_keys.canonical("gov/ods/resident_population") == "gov/ods/ods_resident_population"
    assert asset_keys.parse(["ops", "published", "published_transit_ridership"]) == ("published", "ops_transit_ridership")


def test_every_description_opens_with_its_platform_in_chinese_and_english(graph):
    """Group names are ASCII only (Dagster): the platform's name, in Chinese and English, opens each description."""
    from zqdata.catalog import GROUP_LABELS

    _, g, _ = graph
    for key in g.get_all_asset_keys():
        node = g.get(key)
        label = GROUP_LABELS[node.group_name]
        assert (node.description or "").startswith(f"【{label}】"), key.to_user_string()
        assert node.description.count(label) == 1, key.to_user_string()
    assert GROUP_LABELS["gov_platform"].startswith("市政务大数据平台")
