"""Issue 14: the column lineage of the dbt models as one self-contained HTML page, a section per model (``#<model>``)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest

from zqdata import column_lineage as cl
from zqdata.lineage_page import (
    lineage_from_run,
    lineage_page_path,
    lineage_page_url,
    read_page_data,
    update_lineage_page,
    write_lineage_page,
)
from zqdata.settings import TZ

NOW = dt.datetime(2025, 5, 2, 3, 0, tzinfo=TZ)
PKG = "zhaoqing"
STG, INT, PRODUCT, BROKEN = "stg_psb__resident_population", "int_resident_population", "ops_population_stats", "int_broken"
COLUMNS: cl.RelationColumns = {
    "ods.resident_population": {"id_number": "VARCHAR", "full_name": "VARCHAR", "district_code": "VARCHAR",
                                "_partition_date": "DATE"},
    "ref.district": {"code": "VARCHAR", "name": "VARCHAR"},
    f"staging.{STG}": {"id_number": "VARCHAR", "full_name": "VARCHAR", "district_code": "VARCHAR",
                       "_partition_date": "DATE"},
    f"intermediate.{INT}": {"id_number": "VARCHAR", "district_name": "VARCHAR", "_partition_date": "DATE"},
    f"products.{PRODUCT}": {"district_name": "VARCHAR", "residents": "BIGINT", "source_system": "VARCHAR"},
}
SQL = {
    STG: """with source as (select * from "gov"."ods"."resident_population")
            select trim(id_number) as id_number, full_name, upper(district_code) as district_code, _partition_date
            from source""",
    INT: f"""with stg as (select * from "gov"."staging"."{STG}"), d as (select * from "gov"."ref"."district")
             select stg.id_number, d.name as district_name, stg._partition_date
             from stg left join d on d.code = stg.district_code""",
    PRODUCT: f"""select district_name, count(*) as residents, 'gov' as source_system
                 from "ops"."intermediate"."{INT}" group by district_name""",
}


def _model(name: str, schema: str, description: str, columns: dict[str, str], parents: list[str],
           db: str = "gov") -> dict:
    return {"name": name, "resource_type": "model", "package_name": PKG, "unique_id": f"model.{PKG}.{name}",
            "fqn": [PKG, db, schema, name], "relation_name": f'"{db}"."{schema}"."{name}"', "description": description,
            "columns": {c: {"name": c, "description": d} for c, d in columns.items()},
            "depends_on": {"nodes": parents}, "original_file_path": f"models/{db}/{schema}/{name}.sql",
            "compiled_code": SQL.get(name)}


def make_manifest() -> dict:
    src, ref = f"source.{PKG}.ods.resident_population", f"source.{PKG}.ref.district"
    return {
        "nodes": {
            f"model.{PKG}.{STG}": _model(STG, "staging", "常住人口 标准化 (staging)",
                                         {"id_number": "公民身份号码 <PII>", "district_code": "行政区划代码"}, [src]),
            f"model.{PKG}.{INT}": _model(INT, "intermediate", "常住人口 关联区划名称",
                                         {"district_name": "区县名称"}, [f"model.{PKG}.{STG}", ref]),
            f"model.{PKG}.{PRODUCT}": _model(PRODUCT, "products", "按区县的常住人口数 </script><b>not bold</b>",
                                             {"residents": "人数"}, [f"model.{PKG}.{INT}"], db="ops"),
            f"model.{PKG}.{BROKEN}": _model(BROKEN, "intermediate", "", {}, []),
            f"test.{PKG}.not_null_x": {"name": "not_null_x", "resource_type": "test", "unique_id": f"test.{PKG}.not_null_x"},
        },
        "sources": {
            src: {"name": "resident_population", "source_name": "ods", "resource_type": "source", "unique_id": src,
                  "fqn": [PKG, "gov", "ods", "resident_population"], "relation_name": '"gov"."ods"."resident_population"',
                  "description": "公安局交付的常住人口（ODS）", "source_description": "",
                  "columns": {"full_name": {"name": "full_name", "description": "姓名"}}},
            ref: {"name": "district", "source_name": "ref", "resource_type": "source", "unique_id": ref,
                  "fqn": [PKG, "gov", "ref", "district"], "relation_name": '"gov"."ref"."district"',
                  "description": "", "source_description": "登记目录的代码表 (registry code tables)", "columns": {}},
        },
    }


def make_lineage() -> dict[str, cl.ColumnLineage]:
    """What zqdata.column_lineage computes for the three models (the real function, on hand-written compiled SQL)."""
    return {f"model.{PKG}.{name}": cl.sql_column_lineage(sql, COLUMNS) for name, sql in SQL.items()}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.loaded: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href") is not None:
            self.hrefs.append(a["href"])
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            if a.get(name) and tag != "a":
                self.loaded.append(a[name])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture
def page_path(tmp_path) -> Path:
    errors = {f"model.{PKG}.{BROKEN}": "SQL 解析失败 (sqlglot): ParseError"}
    return write_lineage_page(tmp_path / "lineage" / "column_lineage.html", make_manifest(), make_lineage(), errors, NOW)


def test_the_lineage_computed_is_what_the_page_is_built_from():
    lineage = make_lineage()
    assert lineage[f"model.{PKG}.{INT}"]["district_name"] == [("ref.district", "name")]
    assert lineage[f"model.{PKG}.{PRODUCT}"]["residents"] == []  # count(*): no upstream column


def test_each_model_has_a_section_and_each_column_its_upstream_with_links(page_path):
    page = parse(page_path)
    html_text = page_path.read_text(encoding="utf-8")
    for name in (STG, INT, PRODUCT, BROKEN, "source.ods.resident_population"):
        assert name in page.ids
    for uid, columns in make_lineage().items():
        model = uid.rsplit(".", 1)[-1]
        for column, deps in columns.items():
            row = f"{model}.{column}"
            assert row in page.ids, row
            m = re.search(rf'<tr id="{re.escape(row)}">(.*?)</tr>', html_text, re.S)
            assert m, row
            for rel, col in deps:
                assert f"<code>{rel}</code></a>.<a" in m[1] and f"<code>{col}</code>" in m[1], (row, rel, col)
    # upstream links go to the upstream model's section and column, e.g. the int model's id_number → staging
    m = re.search(rf'<tr id="{INT}.id_number">(.*?)</tr>', html_text, re.S)
    assert f'href="#{STG}"' in m[1] and f'href="#{STG}.id_number"' in m[1]
    m = re.search(rf'<tr id="{STG}.full_name">(.*?)</tr>', html_text, re.S)
    assert 'href="#source.ods.resident_population.full_name"' in m[1]
    m = re.search(rf'<tr id="{INT}.district_name">(.*?)</tr>', html_text, re.S)
    assert 'href="#source.ref.district.name"' in m[1]


def test_a_relation_that_is_no_dbt_node_is_named_without_a_link(tmp_path):
    path = write_lineage_page(tmp_path / "p.html", make_manifest(), {STG: {"id_number": [("ext.lookup", "id")]}})
    m = re.search(rf'<tr id="{STG}.id_number">(.*?)</tr>', path.read_text(encoding="utf-8"), re.S)
    assert "<code>ext.lookup.id</code>" in m[1] and "<a" not in m[1].split("</td>")[2]


def test_every_anchor_link_resolves(page_path):
    page = parse(page_path)
    fragments = [urllib.parse.unquote(h[1:]) for h in page.hrefs if h.startswith("#")]
    assert len(fragments) > 20 and len(fragments) == len(page.hrefs)  # links are in-page only
    assert [f for f in fragments if f not in page.ids] == []


def test_downstream_readers_and_descriptions_are_shown(page_path):
    html_text = page_path.read_text(encoding="utf-8")
    m = re.search(rf'<tr id="{STG}.id_number">(.*?)</tr>', html_text, re.S)
    assert f'href="#{INT}.id_number"' in m[1]  # used by the intermediate model
    assert "公民身份号码 &lt;PII&gt;" in m[1]  # column description, escaped
    m = re.search(rf'<tr id="source.ods.resident_population.full_name">(.*?)</tr>', html_text, re.S)
    assert "姓名" in m[1] and f'href="#{STG}.full_name"' in m[1]
    assert "常住人口 关联区划名称" in html_text and "公安局交付的常住人口（ODS）" in html_text
    assert "SQL 解析失败 (sqlglot): ParseError" in html_text  # why a model has no lineage
    assert "<b>not bold</b>" not in html_text and "&lt;b&gt;not bold&lt;/b&gt;" in html_text
    assert "not_null_x" not in html_text  # tests are no sections


def test_page_is_self_contained(page_path):
    page = parse(page_path)
    text = page_path.read_text(encoding="utf-8")
    assert page.loaded == []  # no <script src>, <link href>, <img src>
    assert "://" not in text and not re.search(r"url\(|@import", text)
    assert "default-src 'none'" in text  # and the browser is told to fetch nothing


def test_url_points_at_the_models_section(page_path, tmp_path, monkeypatch):
    assert lineage_page_url(INT, page_path) == page_path.as_uri() + f"#{INT}"
    assert lineage_page_url("source.ods.resident_population", page_path).endswith("#source.ods.resident_population")
    assert lineage_page_url(INT, page_path, base_url="http://docs.gov.internal/published/") == \
        f"http://docs.gov.internal/published/lineage/column_lineage.html#{INT}"
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    assert lineage_page_path() == tmp_path.resolve() / "published" / "lineage" / "column_lineage.html"
    assert lineage_page_url(STG) == lineage_page_path().as_uri() + f"#{STG}"


def test_updates_merge_runs_and_write_atomically(tmp_path):
    """The gov step and the ops step each know their own models' lineage: the page keeps both."""
    path = tmp_path / "column_lineage.html"
    lineage = make_lineage()
    gov = {k: v for k, v in lineage.items() if PRODUCT not in k}
    ops = {k: v for k, v in lineage.items() if PRODUCT in k}
    update_lineage_page(path, make_manifest(), gov, now=NOW)
    assert read_page_data(path)["sections"][PRODUCT]["lineage"] is None
    assert "尚无列级血缘" in path.read_text(encoding="utf-8")
    manifest = make_manifest()
    del manifest["nodes"][f"model.{PKG}.{BROKEN}"]  # removed from the project
    update_lineage_page(path, manifest, ops, now=NOW + dt.timedelta(hours=1))
    data = read_page_data(path)
    assert data["sections"][STG]["lineage"]["id_number"] == [["ods.resident_population", "id_number"]]
    assert data["sections"][PRODUCT]["lineage"]["district_name"] == [[f"intermediate.{INT}", "district_name"]]
    assert BROKEN not in data["sections"] and BROKEN not in parse(path).ids
    assert sorted(p.name for p in tmp_path.iterdir()) == [".column_lineage.html.lock", "column_lineage.html"]
    # the JSON payload survives descriptions that contain </script>
    assert "</script><b>" in data["sections"][PRODUCT]["description"]


def test_lineage_from_a_run_folder_needs_compiled_sql(tmp_path):
    """A run's manifest path: compiled SQL from the manifest (or the run folder's compiled/), columns from DuckDB."""
    db = tmp_path / "gov.duckdb"
    with duckdb.connect(str(db)) as con:
        for rel, cols in COLUMNS.items():
            schema, table = rel.split(".")
            con.execute(f"create schema if not exists {schema}")
            con.execute(f"create table {schema}.{table} ({', '.join(f'{c} {t}' for c, t in cols.items())})")
    run = tmp_path / "target" / "gov_dbt_models-x"
    run.mkdir(parents=True)
    manifest = make_manifest()
    manifest["nodes"][f"model.{PKG}.{INT}"]["compiled_code"] = None  # only in compiled/, as dbt writes it
    compiled = run / "compiled" / PKG / f"models/gov/intermediate/{INT}.sql"
    compiled.parent.mkdir(parents=True)
    compiled.write_text(SQL[INT], encoding="utf-8")
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = lineage_from_run(run / "manifest.json", db)
    assert set(result.by_model) == {f"model.{PKG}.{n}" for n in (STG, INT, PRODUCT)}
    assert result.by_model[f"model.{PKG}.{INT}"] == make_lineage()[f"model.{PKG}.{INT}"]
    parsed_only = {**manifest, "nodes": {k: {**v, "compiled_code": None} for k, v in manifest["nodes"].items()}}
    assert lineage_from_run(parsed_only, db).by_model == {}  # `dbt parse` alone: nothing to analyse


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists() or importlib.util.find_spec("playwright") is None,
                    reason="需要 Debian chromium 与 Playwright (needs /usr/bin/chromium and playwright)")
def test_page_opens_at_the_models_section_offline_and_filters(page_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        try:
            page = browser.new_page()
            outside: list[str] = []
            errors: list[str] = []
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file://")
                       else (outside.append(r.request.url), r.abort()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(lineage_page_url(INT, page_path), wait_until="load")
            assert page.evaluate("document.querySelector(':target').id") == INT
            page.fill("#filter", "residents")
            visible = page.evaluate("[...document.querySelectorAll('main section:not(.hidden)')].map(s => s.id)")
            assert visible == [PRODUCT]
            page.click(f'tr[id="{PRODUCT}.district_name"] a[href="#{INT}.district_name"]')
            assert page.evaluate("location.hash") == f"#{INT}.district_name"
            assert outside == [] and errors == []
        finally:
            browser.close()
