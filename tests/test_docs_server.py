"""`make ui`'s documentation server (zqdata/docs_server.py): the UI's Data Docs and lineage links open over HTTP, and the
product snapshots and consumer deliveries of the same published folder do not (found in review: `make ui` served the
whole folder with `python -m http.server`, listings on — any snapshot, replaced or purged, without authorization or
an audit record)."""

from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from zqdata.docs_server import make_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(tmp_path):
    published = tmp_path / "published"
    (published / "gx" / "site-1").mkdir(parents=True)
    (published / "gx" / "site-1" / "index.html").write_text("<h1>Data Docs</h1>", encoding="utf-8")
    os.symlink("site-1", published / "gx" / "site")  # as gx_runner.publish_site leaves it
    (published / "lineage").mkdir()
    (published / "lineage" / "column_lineage.html").write_text("<h1>lineage</h1>", encoding="utf-8")
    snap = published / "snapshots" / "products" / "ops_sme_credit_profile" / "2025-06-01" / "abc"
    snap.mkdir(parents=True)
    (snap / "data.parquet").write_bytes(b"PAR1 rows of a product")
    (published / "deliveries").mkdir()
    (published / "deliveries" / "zq_rural_bank.csv").write_text("credit_code\n91440000X\n", encoding="utf-8")
    os.symlink("../snapshots", published / "gx" / "more")  # a link out of the documentation
    server = make_server(published, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_the_documentation_is_served_and_nothing_else_of_the_published_folder(served):
    assert _get(f"{served}/gx/site/index.html") == (200, b"<h1>Data Docs</h1>")
    assert _get(f"{served}/gx/site/") == (200, b"<h1>Data Docs</h1>")
    assert _get(f"{served}/lineage/column_lineage.html")[0] == 200
    for path in ("/snapshots/products/ops_sme_credit_profile/2025-06-01/abc/data.parquet",
                 "/deliveries/zq_rural_bank.csv", "/gx/../snapshots/products/", "/gx/%2e%2e/deliveries/zq_rural_bank.csv",
                 "/gx/more/products/ops_sme_credit_profile/2025-06-01/abc/data.parquet",
                 "/", "/snapshots/", "/gx/", "/lineage/"):
        status, body = _get(served + path)
        assert status == 404 and b"PAR1" not in body and b"credit_code" not in body, (path, status)


def test_make_ui_starts_this_server_not_a_plain_file_server():
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^ui:.*?\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "-m zqdata.docs_server" in recipe and "http.server" not in recipe
