"""Column lineage as one self-contained HTML page (issue 14): Dagster's open-source UI does not show
`dagster/column_lineage`, so every dbt model gets a section (anchor ``#<model>``) listing each output column, the
upstream ``relation.column`` pairs it is computed from (linked to the upstream section), the columns that read it, and
the column descriptions from the dbt manifest.

The lineage is `zqdata.column_lineage`'s (compiled SQL + the DuckDB schema, so only after a model ran); the gov and ops
dbt steps each know the lineage of the models they built, so `update_lineage_page` merges into the page already
written (its data travels inside the page as JSON). Inline CSS and JS only: the page opens without network.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import html
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zqdata.column_lineage import LINEAGE_RESOURCE_TYPES, ColumnLineage, relation_of
from zqdata.settings import TZ

PAGE_NAME = "column_lineage.html"
FORMAT = 1
SECTION_TYPES = (*LINEAGE_RESOURCE_TYPES, "seed", "source")
_DATA_RE = re.compile(r'<script type="application/json" id="zq-lineage-data">(?P<json>.*?)</script>', re.S)


def lineage_page_path(docs_dir: str | Path | None = None) -> Path:
    """Where the project's page is published: ``<docs_dir>/lineage/column_lineage.html`` (docs_dir: the settings')."""
    if docs_dir is None:
        from zqdata.settings import get_settings

        docs_dir = get_settings().docs_dir
    return Path(docs_dir) / "lineage" / PAGE_NAME


def anchor(node: Mapping[str, Any]) -> str:
    """Section id of a manifest node: the model's name (``#<model>``), ``source.<source>.<table>`` for a source."""
    if node["resource_type"] == "source":
        return f"source.{node['source_name']}.{node['name']}"
    return str(node["name"])


def lineage_page_url(model: str, path: str | Path | None = None, base_url: str | None = None) -> str:
    """URL of a model's section: ``file://…/column_lineage.html#<model>``, or under ``base_url`` where the docs folder
    is served over HTTP (browsers do not follow ``file://`` links from the Dagster UI's ``http://`` page)."""
    page = Path(os.path.abspath(path if path is not None else lineage_page_path()))
    fragment = "#" + urllib.parse.quote(model, safe="._-")
    if base_url:
        return base_url.rstrip("/") + "/lineage/" + page.name + fragment
    return page.as_uri() + fragment


# --- the page's data ---------------------------------------------------------------------------------------------

def _node_entry(node: Mapping[str, Any]) -> dict[str, Any]:
    fqn = list(node.get("fqn") or [])
    return {
        "anchor": anchor(node),
        "name": node["name"],
        "unique_id": node["unique_id"],
        "resource_type": node["resource_type"],
        "relation": relation_of(node["relation_name"]) if node.get("relation_name") else None,
        "group": "/".join(fqn[1:-1]) if node["resource_type"] != "source" else f"source/{node['source_name']}",
        "description": node.get("description") or (node.get("source_description") or ""),
        # {lowercase column: description}: lineage columns are lowercase (zqdata.column_lineage)
        "columns": {str(c).lower(): (props or {}).get("description") or ""
                    for c, props in (node.get("columns") or {}).items()},
        "lineage": None,  # {column: [[relation, column], ...]} once known
        "error": None,
        "lineage_at": None,
    }


def page_data(manifest: Mapping[str, Any], lineage: Mapping[str, ColumnLineage],
              errors: Mapping[str, str] | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """The page's data from one dbt manifest: a section per model, snapshot, seed and source, with the lineage of the
    models in ``lineage`` (keyed by unique_id, as `ManifestLineage.by_model`; a model name works too) and the reasons
    of ``errors``."""
    now = now or dt.datetime.now(TZ)
    sections: dict[str, dict[str, Any]] = {}
    by_name: dict[str, str] = {}
    for section in ("nodes", "sources"):
        for node in manifest.get(section, {}).values():
            if node.get("resource_type") in SECTION_TYPES:
                entry = _node_entry(node)
                sections[entry["unique_id"]] = entry
                if node["resource_type"] != "source":
                    by_name[node["name"]] = entry["unique_id"]
    for key, columns in lineage.items():
        entry = sections.get(key) or sections.get(by_name.get(key, ""))
        if entry is None:
            continue
        entry["lineage"] = {c: [[rel, col] for rel, col in deps] for c, deps in columns.items()}
        entry["error"], entry["lineage_at"] = None, now.isoformat(timespec="seconds")
    for key, reason in (errors or {}).items():
        entry = sections.get(key) or sections.get(by_name.get(key, ""))
        if entry is not None and entry["lineage"] is None:
            entry["error"], entry["lineage_at"] = reason, now.isoformat(timespec="seconds")
    return {"format": FORMAT, "generated_at": now.isoformat(timespec="seconds"),
            "sections": {e["anchor"]: e for e in sections.values()}}


def merge_page_data(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: the sections and descriptions of the newer manifest (every dbt target parses the whole
    project, so a section it lacks was removed), each keeping its latest lineage (one the new run did not compute
    keeps the one it had)."""
    if not old or old.get("format") != FORMAT:
        return dict(new)
    before_all = old.get("sections", {})
    sections = {}
    for key, entry in new["sections"].items():
        before = before_all.get(key)
        merged = dict(entry)
        if before is not None and entry["lineage"] is None and entry["error"] is None:
            merged.update(lineage=before.get("lineage"), error=before.get("error"), lineage_at=before.get("lineage_at"))
        sections[key] = merged
    return {**new, "sections": sections}


def read_page_data(path: str | Path) -> dict[str, Any] | None:
    """The data embedded in a page written by this module (None: no page, or not one of ours)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    m = _DATA_RE.search(text)
    if m is None:
        return None
    try:
        return json.loads(m["json"].replace("<\\/", "</"))
    except json.JSONDecodeError:
        return None


# --- rendering ---------------------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --link: #0969da; --hl: #fff8c5; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif;
       color: var(--fg); }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: .6rem 1rem;
         display: flex; gap: 1rem; align-items: center; z-index: 2; }
header h1 { font-size: 1.1rem; margin: 0; }
header input { flex: 0 1 22rem; padding: .3rem .5rem; border: 1px solid var(--line); border-radius: 4px; }
header .meta { color: var(--muted); font-size: .85rem; margin-left: auto; }
.layout { display: grid; grid-template-columns: 17rem 1fr; }
nav { border-right: 1px solid var(--line); padding: .5rem 1rem; height: calc(100vh - 3rem); overflow: auto;
      position: sticky; top: 3rem; font-size: .85rem; }
nav h2 { font-size: .8rem; text-transform: uppercase; color: var(--muted); margin: .8rem 0 .2rem; }
nav ul { list-style: none; padding: 0; margin: 0; }
main { padding: 0 1.5rem 4rem; min-width: 0; }
a { color: var(--link); text-decoration: none; } a:hover { text-decoration: underline; }
section { border-bottom: 1px solid var(--line); padding: 1rem 0; scroll-margin-top: 3.5rem; }
section:target, tr:target { background: var(--hl); }
section h2 { margin: 0 0 .2rem; font-size: 1.15rem; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.kind { font-size: .75rem; color: var(--muted); border: 1px solid var(--line); border-radius: 3px; padding: 0 .3rem;
        margin-left: .4rem; font-family: system-ui, sans-serif; vertical-align: middle; }
.desc { color: var(--muted); margin: .2rem 0 .6rem; white-space: pre-wrap; }
.note { background: var(--bg2); border-left: 3px solid #bf8700; padding: .3rem .6rem; margin: .4rem 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; border-top: 1px solid var(--line); padding: .3rem .5rem;
         overflow-wrap: anywhere; }
th { background: var(--bg2); font-weight: 600; }
td.col, code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; }
td ul { list-style: none; margin: 0; padding: 0; }
.none { color: var(--muted); font-style: italic; }
.hidden { display: none; }
"""

# Filter by model or column name; the page works without it.
_JS = """
(function () {
  var box = document.getElementById('filter');
  if (!box) return;
  box.addEventListener('input', function () {
    var q = box.value.trim().toLowerCase();
    document.querySelectorAll('main section').forEach(function (s) {
      var hit = !q || s.id.toLowerCase().indexOf(q) >= 0 || (s.getAttribute('data-columns') || '').indexOf(q) >= 0;
      s.classList.toggle('hidden', !hit);
      var link = document.querySelector('nav a[href="#' + CSS.escape(s.id) + '"]');
      if (link) link.parentElement.classList.toggle('hidden', !hit);
    });
  });
})();
"""

_KIND = {"model": "模型 model", "snapshot": "快照 snapshot", "seed": "种子 seed", "source": "源表 source"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(section_anchor: str, column: str | None = None) -> str:
    target = section_anchor if column is None else f"{section_anchor}.{column}"
    return "#" + urllib.parse.quote(target, safe="._-")


def _column_cell(rel: str, col: str, by_relation: Mapping[str, Mapping[str, Any]]) -> str:
    target = by_relation.get(rel)
    if target is None:
        return f"<code>{_e(rel)}.{_e(col)}</code>"
    return (f'<a href="{_href(target["anchor"])}"><code>{_e(rel)}</code></a>.'
            f'<a href="{_href(target["anchor"], col)}"><code>{_e(col)}</code></a>')


_LAYERS = ("source", "seed", "snapshot", "staging", "intermediate")  # then the rest (marts, products)


def _layer_rank(section: Mapping[str, Any]) -> int:
    """Sections in pipeline order: sources, staging, intermediate, then products."""
    parts = [section["resource_type"], *section["group"].split("/")]
    return min((_LAYERS.index(p) for p in parts if p in _LAYERS), default=len(_LAYERS))


def render_page(data: Mapping[str, Any], title: str = "列级血缘 Column lineage") -> str:
    """The self-contained HTML page of the data (`page_data` / `merge_page_data`)."""
    sections = sorted(data["sections"].values(), key=lambda s: (_layer_rank(s), s["group"], s["name"]))
    by_relation = {s["relation"]: s for s in sections if s["relation"]}
    used_by: dict[tuple[str, str], list[tuple[dict, str]]] = {}  # (relation, column) -> [(section, its column)]
    for s in sections:
        for column, deps in (s["lineage"] or {}).items():
            for rel, col in deps:
                used_by.setdefault((rel, col), []).append((s, column))

    nav: list[str] = []
    group = None
    for s in sections:
        if s["group"] != group:
            if group is not None:
                nav.append("</ul>")
            group = s["group"]
            nav.append(f"<h2>{_e(group or '-')}</h2><ul>")
        nav.append(f'<li><a href="{_href(s["anchor"])}">{_e(s["name"])}</a></li>')
    if group is not None:
        nav.append("</ul>")

    body: list[str] = []
    for s in sections:
        lineage = s["lineage"] or {}
        read = sorted({col for rel, col in used_by if rel == s["relation"]}) if s["relation"] else []
        # a row for every column: computed, documented, or read by a downstream model (so every link lands)
        columns = list(dict.fromkeys([*lineage, *s["columns"], *read]))
        searchable = " ".join(columns).lower()
        body.append(f'<section id="{_e(s["anchor"])}" data-columns="{_e(searchable)}">')
        body.append(f'<h2>{_e(s["name"])}<span class="kind">{_e(_KIND.get(s["resource_type"], s["resource_type"]))}'
                    f'</span></h2>')
        if s["relation"]:
            body.append(f'<div>关系 relation: <code>{_e(s["relation"])}</code> · <code>{_e(s["unique_id"])}</code></div>')
        if s["description"]:
            body.append(f'<p class="desc">{_e(s["description"])}</p>')
        if s["resource_type"] in LINEAGE_RESOURCE_TYPES:
            if s["error"]:
                body.append(f'<p class="note">列级血缘未能计算 (no column lineage): {_e(s["error"])}</p>')
            elif s["lineage"] is None:
                body.append('<p class="note">尚无列级血缘：模型运行后才能计算 (no lineage yet: computed when the model '
                            'runs)</p>')
            else:
                body.append(f'<p class="desc">血缘计算于 lineage computed at {_e(s["lineage_at"])}</p>')
        if columns:
            body.append("<table><thead><tr><th>列 column</th><th>说明 description</th><th>上游 upstream</th>"
                        "<th>下游 used by</th></tr></thead><tbody>")
            for column in columns:
                deps = lineage.get(column)
                if deps is None:
                    upstream = '<span class="none">—</span>'
                elif not deps:
                    upstream = '<span class="none">无上游列 (constant or computed)</span>'
                else:
                    upstream = "<ul>" + "".join(f"<li>{_column_cell(r, c, by_relation)}</li>" for r, c in deps) + "</ul>"
                readers = used_by.get((s["relation"], column), []) if s["relation"] else []
                downstream = ("<ul>" + "".join(
                    f'<li><a href="{_href(t["anchor"], c)}"><code>{_e(t["name"])}.{_e(c)}</code></a></li>'
                    for t, c in sorted(readers, key=lambda r: (r[0]["name"], r[1]))) + "</ul>") if readers else ""
                body.append(f'<tr id="{_e(s["anchor"])}.{_e(column)}"><td class="col">{_e(column)}</td>'
                            f'<td>{_e(s["columns"].get(column, ""))}</td><td>{upstream}</td><td>{downstream}</td></tr>')
            body.append("</tbody></table>")
        body.append("</section>")

    payload = json.dumps(data, ensure_ascii=False, sort_keys=True).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="zh-CN"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        # nothing may be fetched: inline styles and scripts only
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">",
        f"<style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><input id="filter" type="search" placeholder="筛选模型或列 filter model / column">'
        f'<span class="meta">更新于 updated {_e(data.get("generated_at", ""))}</span></header>',
        '<div class="layout"><nav>', *nav, "</nav><main>", *body, "</main></div>",
        f'<script type="application/json" id="zq-lineage-data">{payload}</script>',
        f"<script>{_JS}</script>",
        "</body></html>",
    ])


# --- writing -----------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # readers see the old page or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path):
    """One writer at a time (the gov and ops dbt steps may finish together): an flock on a sidecar file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_lineage_page(path: str | Path, manifest: Mapping[str, Any], lineage: Mapping[str, ColumnLineage],
                       errors: Mapping[str, str] | None = None, now: dt.datetime | None = None) -> Path:
    """Write the page for this manifest and lineage alone, atomically; returns the path."""
    path = Path(path)
    with _locked(path):
        _write_atomic(path, render_page(page_data(manifest, lineage, errors, now)))
    return path


def update_lineage_page(path: str | Path, manifest: Mapping[str, Any], lineage: Mapping[str, ColumnLineage],
                        errors: Mapping[str, str] | None = None, now: dt.datetime | None = None) -> Path:
    """Merge this run's lineage into the page at ``path`` (models it did not build keep theirs), atomically."""
    path = Path(path)
    with _locked(path):
        data = merge_page_data(read_page_data(path), page_data(manifest, lineage, errors, now))
        _write_atomic(path, render_page(data))
    return path


def lineage_from_run(manifest: Mapping[str, Any] | str | Path, db_path: str | Path,
                     unique_ids: Iterable[str] | None = None, target_path: str | Path | None = None):
    """`zqdata.column_lineage.ManifestLineage` of a finished dbt run, for pages built outside a Dagster step.

    ``manifest``: the run's manifest (or its path: ``dbt_project/target/<run>/manifest.json``, whose folder then also
    serves as ``target_path`` for ``compiled/``); a manifest from `dbt parse` alone has no compiled SQL, so its models
    come back in ``errors``. ``db_path``: the DuckDB file the run wrote (read after dbt has finished).
    """
    from zqdata import column_lineage as cl

    if isinstance(manifest, (str, Path)):
        target_path = target_path if target_path is not None else Path(manifest).parent
        manifest = json.loads(Path(manifest).read_text(encoding="utf-8"))
    nodes = manifest.get("nodes", {})
    ids = list(unique_ids) if unique_ids is not None else [
        uid for uid, n in nodes.items() if n.get("resource_type") in LINEAGE_RESOURCE_TYPES
        and cl.compiled_sql(n, target_path) is not None]
    columns = cl.read_relation_columns_file(db_path, cl.relations_to_read(manifest, ids))
    return cl.manifest_column_lineage(manifest, columns, ids, target_path)
