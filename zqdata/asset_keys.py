"""The asset keys of the data path: one place that names them, and parses them back.

The Dagster UI labels a node of the lineage graph with the last part of its key only, so a dataset's three assets —
its delivery in the landing zone, its ODS table on the gov platform and its desensitized copy on the operations
platform — must not share that last part (issue 14): each layer puts its own prefix on the name, as dbt's models do
(`stg_`, `int_`). The tables keep their names (`ods.<dataset>`, `desensitized.<dataset>`); only the labels differ.

Keys are returned as lists of strings (``dg.AssetKey(path)`` in the Dagster wiring) and as ``a/b/c`` strings (the form
`zq trace` and the reports take).
"""

from __future__ import annotations

#: layer -> (key prefix, prefix of the last part)
LAYERS: dict[str, tuple[tuple[str, ...], str]] = {
    "delivery": (("landing",), "delivery_"),
    "ods": (("gov", "ods"), "ods_"),
    "staging": (("gov", "staging"), ""),  # dbt model names already say the layer (stg_<agency>__<dataset>)
    "intermediate": (("gov", "intermediate"), ""),  # int_<dataset>
    "desensitized": (("ops", "desensitized"), "desensitized_"),
    "product": (("ops", "products"), ""),  # registered product names start with ops_
    "published": (("ops", "published"), "published_"),
}


def path(layer: str, name: str) -> list[str]:
    """The key of `name` (a dataset, a dbt model or a product as the registry names it) in `layer`."""
    prefix, label = LAYERS[layer]
    if layer == "published":
        name = name.removeprefix("ops_")
    return [*prefix, f"{label}{name}"]


def key_string(layer: str, name: str) -> str:
    return "/".join(path(layer, name))


def delivery(dataset: str) -> list[str]:
    return path("delivery", dataset)


def ods(dataset: str) -> list[str]:
    return path("ods", dataset)


def desensitized(dataset: str) -> list[str]:
    return path("desensitized", dataset)


def product(name: str) -> list[str]:
    return path("product", name)


def published(name: str) -> list[str]:
    return path("published", name)


def parse(key: str | list[str] | tuple[str, ...]) -> tuple[str, str] | None:
    """(layer, name) of a data-path key — the inverse of `path` — or None for any other key (quality, reference, ...).

    The bare name is accepted too (``gov/ods/resident_population``): what the keys were before the labels had prefixes,
    and what a user types from a table name."""
    parts = key.strip("/").split("/") if isinstance(key, str) else list(key)
    for layer, (prefix, label) in LAYERS.items():
        if tuple(parts[:-1]) == prefix and parts[-1:]:
            name = parts[-1].removeprefix(label)
            return layer, ("ops_" + name if layer == "published" and not name.startswith("ops_") else name)
    return None


def canonical(key: str) -> str:
    """`key` in the form the UI shows (the layer's prefix on its last part); other keys unchanged."""
    parsed = parse(key)
    return key_string(*parsed) if parsed else key.strip("/")
