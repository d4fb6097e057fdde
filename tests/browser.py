"""Headless Chromium for the tests that open pages as people do, without network: Debian's `chromium` package
(`make test-services` installs it) driven by Playwright — Playwright's own browser download is not used. Every request
that is not for a file:// URL is aborted and recorded, so a test can assert that a page attempted none.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> str | None:
    """Debian's chromium, else a `chromium` on PATH; None when there is none."""
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def skip_reason() -> str | None:
    """Why a browser test cannot run here (None: it can)."""
    if chromium_path() is None:
        return "Debian chromium 未安装 (/usr/bin/chromium missing: apt-get install -y chromium, or make test-services)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright 未安装 (pip install -c constraints.txt playwright)"
    return None


@contextmanager
def offline_browser() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def block_network(page: Any) -> list[str]:
    """Let ``page`` load file:// URLs only: every other request is aborted, and its URL appended to the list returned."""
    attempted: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.on("request", lambda req: None if req.url.startswith("file://") else attempted.append(req.url))
    return attempted
