"""Issue 14: GX Data Docs work in a browser without network — every script, stylesheet and image is local, no tracking
image, the index lists the validations, and pages name the run and the data asset."""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from browser import block_network, offline_browser, skip_reason

from zqdata.quality.gx_runner import (
    EXPECTED_DROPS,
    GX_RESULT_FORMAT,
    DatasetValidation,
    ephemeral_context,
    _outcomes,
    data_docs_url,
    external_references,
    label_result,
    make_site_offline,
    render_data_docs,
    run_name,
)

DAY = dt.date(2025, 5, 1)
# (dataset, staging model, frame): one passes its suite, one fails it
BATCHES = [
    ("water_usage", "stg_water__water_usage",
     pd.DataFrame({"meter_id": ["K1", "K2", None], "district_code": ["441202", "441202", "999999"]})),
    ("enterprise_registry", "stg_amr__enterprise_registry",
     pd.DataFrame({"meter_id": ["E1", "E2", "E3"], "district_code": ["441202", "441203", "441202"]})),
]


def tiny_validations(label: bool = True) -> list[DatasetValidation]:
    """Validations made as gx_runner.validate_dataset makes them: an in-memory pandas batch in the ephemeral context."""
    import great_expectations as gx

    ctx = ephemeral_context()
    out = []
    for dataset, model, frame in BATCHES:
        suite = gx.ExpectationSuite(name=f"zq_{dataset}", expectations=[
            gx.expectations.ExpectColumnValuesToNotBeNull(column="meter_id", meta={"rule": f"gx.{dataset}.meter_id"}),
            gx.expectations.ExpectColumnValuesToBeInSet(column="district_code", value_set=["441202", "441203"],
                                                        meta={"rule": f"gx.{dataset}.district_code"}),
        ])
        asset = ctx.data_sources.add_or_update_pandas(f"gov_staging_{dataset}").add_dataframe_asset(name=model)
        batch = asset.add_batch_definition_whole_dataframe(f"{model}_{DAY}").get_batch(
            batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format=GX_RESULT_FORMAT)
        if label:
            label_result(result, dataset, model, DAY)
        out.append(DatasetValidation(dataset, "agency", model, suite, result, len(frame), len(frame), False,
                                     f"全量 {len(frame)} 行", _outcomes(result)))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A published site: one validation labelled as validate_dataset does, the other left for render_data_docs."""
    validations = tiny_validations(label=False)
    label_result(validations[0].result, validations[0].dataset, validations[0].model, DAY)
    docs = tmp_path_factory.mktemp("published")
    index = render_data_docs(validations, docs, DAY)
    return docs, index


class _Resources(HTMLParser):
    """Every (tag, attribute, value) of an HTML page that names a URL."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action") and value is not None:
                self.refs.append((tag, name, value.strip()))


def _refs(page: Path) -> list[tuple[str, str, str]]:
    parser = _Resources()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.refs


_REMOTE = re.compile(r"^(https?:)?//", re.I)
_CSS_REMOTE = re.compile(r"url\(\s*['\"]?\s*(https?:)?//|@import\s+(url\()?\s*['\"]?\s*(https?:)?//", re.I)


def test_no_file_of_the_site_loads_or_links_anything_outside_the_machine(site):
    docs, index = site
    root = index.parent
    pages = list(root.rglob("*.html"))
    assert len(pages) >= 5  # index, two suites, two validations
    for page in pages:
        remote = [r for r in _refs(page) if _REMOTE.match(r[2])]
        assert not remote, (page, remote)
    for path in [*pages, *root.rglob("*.css"), *root.rglob("*.js")]:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not _CSS_REMOTE.search(text), path
        if path.suffix == ".js":
            assert not re.search(r"""(src|href)\s*=\s*\\?['"](https?:)?//""", text, re.I), path
    assert external_references(root) == []


def test_no_tracking_image_and_the_logo_is_the_local_copy(site):
    _, index = site
    for page in index.parent.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "dataContextId" not in text and "great-expectations-web-assets" not in text, page
        logos = [v for tag, name, v in _refs(page) if tag == "img"]
        assert logos and all((page.parent / v).resolve().is_file() for v in logos), (page, logos)


def test_every_local_script_and_stylesheet_exists(site):
    _, index = site
    for page in index.parent.rglob("*.html"):
        loaded = [v for tag, name, v in _refs(page) if (tag, name) in (("script", "src"), ("link", "href"), ("img", "src"))]
        scripts = [v for v in loaded if v.endswith(".js")]
        # jQuery first: bootstrap, bootstrap-table and GX's inline table scripts need it
        assert scripts and scripts[0].endswith("static/vendor/jquery.min.js"), (page, scripts)
        for value in loaded:
            assert (page.parent / value.split("?")[0]).resolve().is_file(), (page, value)


def test_index_lists_each_validation_with_its_run_and_data_asset(site):
    _, index = site
    text = index.read_text(encoding="utf-8")
    for dataset, model, _ in BATCHES:
        assert f"'run_name': '{run_name(dataset, DAY)}'" in text
        assert f"'asset_name': '{model}'" in text
        assert f"zq_{dataset}" in text
    assert "'Failed'" in text and "'Success'" in text


@pytest.mark.parametrize("dataset,model", [(d, m) for d, m, _ in BATCHES])
def test_validation_page_names_the_run_and_the_data_asset(site, dataset, model):
    _, index = site
    pages = list(index.parent.glob(f"validations/zq_{dataset}/{run_name(dataset, DAY)}/*/*.html"))
    assert len(pages) == 1
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", pages[0].read_text(encoding="utf-8")))
    assert f"Run Name {run_name(dataset, DAY)}" in text
    assert f"Data asset: {model}" in text
    assert "__none__" not in text and "Data asset: None" not in text


def test_analytics_and_how_to_links_are_off_in_the_gx_project(site):
    docs, _ = site
    config = (docs / "gx" / "project" / "gx" / "great_expectations.yml").read_text(encoding="utf-8")
    assert re.search(r"^analytics_enabled: false$", config, re.M)
    assert "show_how_to_buttons: true" not in config


def test_data_docs_url_opens_the_published_index_or_a_validation(site):
    docs, index = site
    assert data_docs_url(docs) == (docs / "gx" / "site" / "index.html").as_uri() == index.as_uri()
    assert data_docs_url(docs).startswith("file:///")
    page = data_docs_url(docs, dataset="water_usage", day=DAY)
    assert page.startswith((docs / "gx" / "site" / "validations").as_uri()) and page.endswith(".html")
    assert Path(page.removeprefix("file://")).is_file()
    # not validated that day: the index
    assert data_docs_url(docs, dataset="water_usage", day=DAY + dt.timedelta(days=1)) == index.as_uri()
    assert data_docs_url(docs, base_url="http://docs.gov.internal/published/") == \
        "http://docs.gov.internal/published/gx/site/index.html"


def test_data_docs_url_defaults_to_the_settings_docs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    assert data_docs_url() == (tmp_path.resolve() / "published" / "gx" / "site" / "index.html").as_uri()


def test_only_the_known_unbundled_resources_are_dropped_and_rewriting_is_idempotent(tmp_path, caplog):
    """A GX upgrade that requests a new CDN file is noticed (warning, and this test fails) instead of silently leaving
    the pages without a library."""
    with caplog.at_level(logging.WARNING, logger="zqdata.quality.gx_runner"):
        index = render_data_docs(tiny_validations(), tmp_path, DAY)
    assert not [r for r in caplog.records if "unknown external" in r.getMessage()]
    built = tmp_path / "gx" / "project" / "gx" / "uncommitted" / "data_docs" / "local_site"
    shutil.rmtree(built / "static" / "vendor")
    before = {p: p.read_bytes() for p in built.rglob("*.html")}
    assert make_site_offline(built) == []  # already offline: nothing more to drop, pages unchanged
    assert {p: p.read_bytes() for p in built.rglob("*.html")} == before
    assert (built / "static" / "vendor" / "jquery.min.js").is_file()
    assert EXPECTED_DROPS and index.is_file()


def _validations_of(day: dt.date) -> list[DatasetValidation]:
    out = tiny_validations(label=False)
    for v in out:
        v.day = day
    return out


def _page(site: Path, dataset: str, day: dt.date) -> Path:
    return next(site.glob(f"validations/zq_{dataset}/{run_name(dataset, day)}/*/*.html"))


def test_a_nights_data_docs_render_its_own_pages_link_the_others_and_list_the_latest_days(tmp_path, monkeypatch):
    """Issue 15: a night's Data Docs cost does not grow with history. Earlier nights' pages are neither rendered nor
    published again (their published file stays the same file: no copy of the site per night), the index lists the
    latest days only, and an old partition run again still gets its page rendered and replaced."""
    from zqdata.quality import gx_runner

    monkeypatch.setattr(gx_runner, "DATA_DOCS_INDEX_DAYS", 2)
    days = [DAY + dt.timedelta(days=i) for i in range(3)]
    built = tmp_path / "gx" / "project" / "gx" / "uncommitted" / "data_docs" / "local_site"
    index = render_data_docs(_validations_of(days[0]), tmp_path)
    first_built = _page(built, "water_usage", days[0])
    written = first_built.stat().st_mtime_ns
    published = _page(index.parent, "water_usage", days[0]).resolve()
    content, inode = published.read_bytes(), published.stat().st_ino
    walked: list[Path] = []  # the folders whose whole tree is searched (Path.rglob)
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, *a, **k: walked.append(self) or rglob(self, *a, **k))
    for day in days[1:]:
        index = render_data_docs(_validations_of(day), tmp_path)
    monkeypatch.setattr(Path, "rglob", rglob)
    # the night's own pages are made offline without searching the site's tree (a year: ~2,600 pages)
    assert not [p for p in walked if p == built or built in p.parents]
    assert first_built.stat().st_mtime_ns == written  # not rendered again
    again = _page(index.parent, "water_usage", days[0]).resolve()
    assert again == published and again.read_bytes() == content
    assert again.stat().st_ino == inode  # the same file: neither copied nor linked into a new copy
    assert len(list((tmp_path / "gx" / "sites").iterdir())) == 1  # one live copy, not a copy a night
    html = index.read_text(encoding="utf-8")
    assert run_name("water_usage", days[2]) in html and run_name("water_usage", days[1]) in html
    assert run_name("water_usage", days[0]) not in html  # beyond the index's days; its page stays published
    assert external_references(index.parent) == []

    render_data_docs(_validations_of(days[0]), tmp_path)  # the oldest day run again
    assert first_built.stat().st_mtime_ns > written
    rerun = _page(index.parent, "water_usage", days[0]).resolve()
    assert rerun.stat().st_ino != inode and external_references(index.parent) == []  # replaced whole (renamed in)
    assert not [p for p in index.parent.rglob(".*") if p.is_file()]  # no file left half-published



def test_a_later_nights_data_docs_compile_no_template_and_a_changed_template_is_compiled_again(tmp_path,
                                                                                                monkeypatch):
    """bench/notes.md 19: GX made a Jinja environment per view and compiled its templates again in each (a third of a
    night's Data Docs). Rendered once in the process, a later night's build compiles none and still renders its own
    pages; the shared bytecode serves a template only while its source is unchanged."""
    import jinja2

    from zqdata.quality.gx_runner import share_template_bytecode

    compiled: list[str | None] = []
    compile_ = jinja2.Environment.compile

    def counting(self, source, name=None, filename=None, raw=False, defer_init=False):
        compiled.append(name)
        return compile_(self, source, name, filename, raw, defer_init)

    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    share_template_bytecode().codes.clear()  # as in a new process
    render_data_docs(_validations_of(DAY), tmp_path)
    assert len(compiled) == len(set(compiled)) > 10  # the first build compiles each template it uses, once
    compiled.clear()
    later = DAY + dt.timedelta(days=1)
    index = render_data_docs(_validations_of(later), tmp_path)
    assert compiled == []
    assert run_name("water_usage", later) in _page(index.parent, "water_usage", later).read_text(encoding="utf-8")

    templates = {"page.j2": "v1 {{ x }}"}
    env = lambda: jinja2.Environment(loader=jinja2.DictLoader(templates), bytecode_cache=share_template_bytecode())
    assert env().get_template("page.j2").render(x=1) == "v1 1"
    templates["page.j2"] = "v2 {{ x }}"
    assert env().get_template("page.j2").render(x=1) == "v2 1"


def test_the_result_store_keeps_the_index_days_and_the_older_results_are_archived_not_lost(tmp_path, monkeypatch):
    """Issue 15: GX lists (and parses the run time of) every key of its validation-result store on each build: after a
    year that was ~1 s of a night's Data Docs (7,700 keys). Results older than the index's days are moved out of the
    store into an archive beside it after each build: the store holds what the index can list, nothing is deleted, the
    old pages stay published, and the index is the same."""
    import great_expectations as gx

    from zqdata.quality import gx_runner

    monkeypatch.setattr(gx_runner, "DATA_DOCS_INDEX_DAYS", 2)
    days = [DAY + dt.timedelta(days=i) for i in range(4)]
    for day in days:
        index = render_data_docs(_validations_of(day), tmp_path)
    project = tmp_path / "gx" / "project"
    store = gx.get_context(mode="file", project_root_dir=str(project)).validation_results_store
    kept = sorted(str(k.run_id.run_name) for k in store.list_keys())
    assert kept == sorted(run_name(ds, day) for ds, _, _ in BATCHES for day in days[2:])
    archive = project / "gx" / "uncommitted" / gx_runner.RESULT_ARCHIVE
    archived = sorted(p.relative_to(archive).parts[1] for p in archive.rglob("*.json"))
    assert archived == sorted(run_name(ds, day) for ds, _, _ in BATCHES for day in days[:2])  # nothing lost
    html = index.read_text(encoding="utf-8")
    assert all(run_name(ds, day) in html for ds, _, _ in BATCHES for day in days[2:])
    assert _page(index.parent, "water_usage", days[0]).is_file()  # the old pages stay published
    # GX drops the archived results' pages from the site it builds: their folders go too (a year left ~5,100 empty
    # folders that each build walked)
    pages = project / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations"
    assert [p for p in pages.rglob("*") if p.is_dir() and not any(p.iterdir())] == []
    assert _page(pages.parent, "water_usage", days[3]).is_file()

    render_data_docs(_validations_of(days[0]), tmp_path)  # an old day run again: rendered, then archived anew
    assert sorted(str(k.run_id.run_name) for k in store.list_keys()) == kept
    assert len([p for p in archive.rglob("*.json") if run_name("water_usage", days[0]) in p.parts]) == 1

def test_rewriting_maps_cdn_libraries_and_drops_everything_else(tmp_path):
    (tmp_path / "static" / "images").mkdir(parents=True)
    (tmp_path / "static" / "images" / "logo-long.png").write_bytes(b"png")
    (tmp_path / "a").mkdir()
    page = tmp_path / "a" / "p.html"
    page.write_text(
        '<html><head><script src="https://code.jquery.com/jquery-3.7.1.min.js" crossorigin="anonymous"></script>'
        '<link rel="stylesheet" href="//cdn.example.org/unknown.css">'
        '<script src="https://cdn.example.org/tracker.js"></script>'
        "<style>.x { background: url('https://cdn.example.org/bg.png') } @import url(https://cdn.example.org/i.css);</style>"
        '</head><body><img class="NO-CACHE" src="https://assets.example.org/logo-long.png?d=1&dataContextId=abc"/>'
        '<img src="https://assets.example.org/pixel.gif"><a href="https://greatexpectations.io">GX</a>'
        '<div style="background-image: url(https://cdn.example.org/s.png)">x</div></body></html>', encoding="utf-8")
    other = tmp_path / "a" / "other.html"  # a page an earlier build wrote (and made offline)
    other.write_text('<html><body><img src="https://cdn.example.org/kept.gif"></body></html>', encoding="utf-8")
    before = other.read_text(encoding="utf-8")
    dropped = make_site_offline(tmp_path, only={page})  # only the pages this build wrote
    assert other.read_text(encoding="utf-8") == before
    text = page.read_text(encoding="utf-8")
    assert '<script src="../static/vendor/jquery.min.js"></script>' in text and "crossorigin" not in text
    assert 'src="../static/images/logo-long.png"' in text and "dataContextId" not in text
    assert ">GX</a>" in text and "greatexpectations.io" not in text
    assert set(dropped) == {"//cdn.example.org/unknown.css", "https://cdn.example.org/tracker.js",
                            "https://cdn.example.org/bg.png", "https://cdn.example.org/i.css",
                            "https://assets.example.org/pixel.gif", "https://cdn.example.org/s.png"}
    assert make_site_offline(tmp_path) == ["https://cdn.example.org/kept.gif"]  # no `only`: every page
    assert external_references(tmp_path) == []


# --- in a real browser without network ------------------------------------------------------------------------

@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_pages_render_in_headless_chromium_without_any_network_request(site):
    _, index = site
    page_of = {d: next(index.parent.glob(f"validations/zq_{d}/{run_name(d, DAY)}/*/*.html")) for d, _, _ in BATCHES}
    with offline_browser() as browser:
        page = browser.new_page()
        outside = block_network(page)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.as_uri(), wait_until="load")
        # bootstrap-table (bundled) renders the validation list from the data GX writes into the page
        table = page.locator("#section-1-content-block-2-1-body-table")  # the Validation Results tab
        rows = table.locator("tbody tr")
        assert rows.count() == len(BATCHES), table.inner_text()
        listed = table.locator("tbody").inner_text()
        for dataset, model, _ in BATCHES:
            assert run_name(dataset, DAY) in listed and model in listed
        for dataset, model, _ in BATCHES:
            page.goto(page_of[dataset].as_uri(), wait_until="load")
            body = page.locator("body").inner_text()
            assert f"Data asset: {model}" in body
            page.get_by_text("Show more info...").click()
            assert run_name(dataset, DAY) in page.locator("body").inner_text()
        assert outside == [] and errors == []
