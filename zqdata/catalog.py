"""What the catalog says of each asset, derived from the registry: who owns it, how it is classified, where it is stored.

One rule for the whole code location (applied by orchestration/catalog.py to every asset spec), so the Dagster UI can
be filtered by agency and by classification and names the right database on each side of the boundary:

- **Owner** — the organisation responsible (Arts. 9–12): the source agency for its deliveries, ODS and staging models;
  the data management agency (市政务和数据局) for the integrated gov platform and governance; the operator for
  everything on the operations platform.
- **Tags** — `agency`, `dataset`, GB/T 43697 level (`gbt43697_level`: the highest of the asset's fields), the
  personal-information mark (`pi`: the strongest of its fields; `desensitized` once across the boundary) and
  openness (`openness`: the most restrictive). Tag values are ASCII (Dagster's rule); the Chinese level is in the
  column descriptions.
- **Storage** — `dagster/table_name` `<database>.<schema>.<table>`: `gov_platform.*` or `ops_platform.*` (the two
  DuckDB files' catalog names), so the UI never puts an ops table in the gov database.
- **Columns** — every registered field carries its classification as column tags in `dagster/column_schema`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from zqdata import asset_keys
from zqdata.registry import Dataset, Registry

DATA_BUREAU = "data_bureau"  # the data management agency (registry/agencies.yaml)
OPERATOR = "operator"  # the authorized operator of the operations platform
GOV_DB, OPS_DB = "gov_platform", "ops_platform"
#: What each asset group is, in Chinese and English. Dagster allows only ASCII in a group name, so the UI shows this
#: where it can: it opens the description of every asset of the group.
GROUP_LABELS = {
    "source_systems": "数源机构 · Source agencies",
    "gov_platform": "市政务大数据平台 · Government big-data platform",
    "governance": "数据治理（市政务大数据平台）· Governance on the gov platform",
    "ops_platform": "市公共数据资源运营服务平台 · Public data operations service platform",
    "governance_reports": "监督与报告（登记、公示、评价、季报、合规）· Oversight and reports",
}


def with_group_label(description: str | None, group: str | None) -> str | None:
    """``description`` opened by its group's label (once; unchanged for a group without one)."""
    label = GROUP_LABELS.get(group or "")
    if label is None:
        return description
    head = f"【{label}】"
    return description if (description or "").startswith(head) else f"{head}{description or ''}"
LEVEL_TAG = {"一般": "general", "重要": "important", "核心": "core"}  # GB/T 43697-2024
_LEVEL_RANK = {"一般": 0, "重要": 1, "核心": 2}
_PI_RANK = {"none": 0, "personal": 1, "sensitive": 2}
_OPEN_RANK = {"open": 0, "conditional": 1, "not_open": 2}
# governance assets kept in the operational database (SQLite / PostgreSQL, zqdata/opdb.py), not in a DuckDB file
OPERATIONAL_TABLES = {"issues": "operational_db.quality_issues", "notifications": "operational_db.notifications"}
LINEAGE_DESCRIPTIONS = {
    "_lineage_id": "行级溯源标识 row lineage id (agency → delivery file → row)",
    "_partition_date": "分区日期 partition date (Asia/Shanghai)",
}


@dataclass(frozen=True)
class CatalogEntry:
    owners: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    table_name: str | None = None  # <database>.<schema>.<table>
    dataset: Dataset | None = None
    crossing: list[str] | None = None  # ops tables: the fields any scenario may receive (None: a gov-side asset)


def team(code: str) -> str:
    return f"team:{code}"


def dataset_of_key(path: Sequence[str], registry: Registry) -> Dataset | None:
    """The registered dataset an asset key is about (landing/delivery_<ds>, gov/ods/ods_<ds>,
    gov/staging/stg_<agency>__<ds>, gov/intermediate/int_<ds>, ops/desensitized/desensitized_<ds>); None for products,
    reports and quality tables."""
    last = _name(path)
    for candidate in (last, last.split("__", 1)[-1], last.removeprefix("int_")):
        if candidate in registry.datasets:
            return registry.datasets[candidate]
    return None


def _name(path: Sequence[str]) -> str:
    """The table, dataset or product a key names (its last part without the layer's label prefix)."""
    parsed = asset_keys.parse(list(path))
    return parsed[1] if parsed else path[-1]


def classification_tags(ds: Dataset, crossing: Sequence[str] | None = None) -> dict[str, str]:
    """The asset-level classification of a dataset: highest level, strongest PI mark, most restrictive openness — of
    all its fields, or on ops of the fields that may cross (``crossing``), personal information then pseudonymized."""
    desensitized = crossing is not None
    classes = [f.class_ for f in ds.fields if not desensitized or f.name in crossing] or [f.class_ for f in ds.fields]
    level = max((c.level for c in classes), key=_LEVEL_RANK.__getitem__)
    pi = max((c.pi for c in classes), key=_PI_RANK.__getitem__)
    openness = max((c.openness for c in classes), key=_OPEN_RANK.__getitem__)
    return {"agency": ds.agency, "dataset": ds.code, "gbt43697_level": LEVEL_TAG[level],
            "pi": "desensitized" if desensitized and pi != "none" else pi, "openness": openness}


def catalog_entry(path: Sequence[str], registry: Registry) -> CatalogEntry | None:
    """Owner, tags and storage of the asset at ``path``; None for keys outside the platform's layout."""
    path = list(path)
    ds = dataset_of_key(path, registry)
    if path[0] == "landing" and ds is not None:
        return CatalogEntry([team(ds.agency)], classification_tags(ds), None, ds)
    if path[0] == "gov" and len(path) == 3:
        layer, table = path[1], _name(path)
        owner = ds.agency if ds is not None and layer in ("ods", "staging") else DATA_BUREAU
        tags = classification_tags(ds) if ds is not None else {}
        storage = OPERATIONAL_TABLES.get(table, f"{GOV_DB}.{layer}.{table}") if layer == "quality" else \
            f"{GOV_DB}.{layer}.{table}"
        gated = registry.datasets.get(table.removeprefix("gate_")) if layer == "quality" and table.startswith("gate_") \
            else None
        if gated is not None:  # one dataset's gate decision: a row of quality.gate_decisions, no personal data
            return CatalogEntry([team(DATA_BUREAU)], {"agency": gated.agency, "dataset": gated.code},
                                f"{GOV_DB}.quality.gate_decisions")
        return CatalogEntry([team(owner)], tags, storage, ds)
    if path[0] == "ops" and len(path) == 3:
        layer, table = path[1], _name(path)
        if layer == "desensitized" and ds is not None:
            crossing = sorted({n for s in registry.scenarios.values() for n in s.authorized_fields.get(ds.code, [])})
            return CatalogEntry([team(OPERATOR)], classification_tags(ds, crossing),
                                f"{OPS_DB}.desensitized.{table}", ds, crossing=crossing)
        tags: dict[str, str] = {}
        scenario = next((s for s in registry.scenarios.values() if s.product == table), None)
        if scenario is not None:
            tags = {"scenario": scenario.code, "pi": "desensitized"}
        return CatalogEntry([team(OPERATOR)], tags, f"{OPS_DB}.products.{table}" if layer == "products" else None)
    if path[0] == "governance":
        return CatalogEntry([team(DATA_BUREAU)])
    return None


def column_tags(ds: Dataset, name: str, desensitized: bool = False) -> dict[str, str]:
    """Column classification tags of a registered field (empty for other columns)."""
    f = next((f for f in ds.fields if f.name == name), None)
    if f is None:
        return {}
    c = f.class_
    tags = {"gbt43697_level": LEVEL_TAG[c.level], "pi": c.pi, "openness": c.openness,
            "confidential": str(c.confidential).lower()}
    if desensitized:
        tags["mask"] = f.mask.method
    return tags


def column_description(ds: Dataset, name: str) -> str | None:
    f = next((f for f in ds.fields if f.name == name), None)
    if f is None:
        return LINEAGE_DESCRIPTIONS.get(name)
    c = f.class_
    return (f"{f.cn_name}：{f.description}（{c.level}数据，个人信息 {c.pi}，开放 {c.openness}"
            f"{'，涉密' if c.confidential else ''}）")


def registry_columns(ds: Dataset) -> list[tuple[str, str]]:
    """(name, type) of a dataset's registered fields and the lineage columns, for assets without a dbt schema."""
    return [(f.name, f.type) for f in ds.fields] + [("_lineage_id", "string"), ("_partition_date", "date")]


def merge_columns(existing: Sequence[tuple[str, str, str | None]] | None, ds: Dataset,
                  crossing: Sequence[str] | None = None) -> list[tuple[str, str, str | None, Mapping[str, str]]]:
    """(name, type, description, tags) per column: the asset's own columns when it declares them (dbt models), else
    the registered fields — only those in ``crossing`` for an ops table (what any scenario may receive; data
    minimisation) —; every registered field gets its classification (and, on ops, its masking method)."""
    desensitized = crossing is not None
    base = list(existing) if existing else [(n, t, None) for n, t in registry_columns(ds)
                                            if not desensitized or n in crossing or n.startswith("_")]
    return [(n, t, d or column_description(ds, n), column_tags(ds, n, desensitized)) for n, t, d in base]

