"""The documentation server of `make ui` (127.0.0.1:3001): the Dagster UI's `data_docs` and `column_lineage_page`
links open over HTTP (a browser does not follow file:// links from an http:// page).

It serves the documentation folders of the published folder (``DOCS``: GX Data Docs, the column-lineage page) and
nothing else. The same folder holds the product snapshots (``snapshots/``, zqdata.publish) and the files delivered to
consumers (``deliveries/``): those are read through `zq deliver` only, which checks the consumer's authorization and
writes the audit log. No directory listings; a path that resolves outside a documentation folder (a symlink) is refused.
"""

from __future__ import annotations

import argparse
import functools
import os
import posixpath
from collections.abc import Sequence
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

DOCS = ("gx", "lineage")  # the folders of the published folder that are documentation


class DocsHandler(SimpleHTTPRequestHandler):
    """`SimpleHTTPRequestHandler` limited to the documentation folders of ``directory``."""

    def send_head(self):  # noqa: ANN201 - http.server's signature
        parts = [p for p in posixpath.normpath(unquote(urlsplit(self.path).path)).split("/") if p not in ("", ".")]
        if not parts or parts[0] not in DOCS or not self._inside_docs(Path(self.translate_path(self.path))):
            self.send_error(HTTPStatus.NOT_FOUND, "not documentation")
            return None
        return super().send_head()

    def _inside_docs(self, path: Path) -> bool:
        real = os.path.realpath(path)
        for name in DOCS:
            root = os.path.realpath(Path(self.directory) / name)
            if real == root or real.startswith(root + os.sep):
                return True
        return False

    def list_directory(self, path):  # noqa: ANN001, ANN201 - a folder without index.html is not shown
        self.send_error(HTTPStatus.NOT_FOUND, "no listing")
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet, as `make ui` ran http.server
        pass


def make_server(directory: Path | str, port: int, bind: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = functools.partial(DocsHandler, directory=str(directory))
    return ThreadingHTTPServer((bind, port), handler)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zqdata.docs_server", description=__doc__.splitlines()[0])
    p.add_argument("--directory", required=True, help="the published folder (settings.docs_dir)")
    p.add_argument("--port", type=int, default=3001)
    p.add_argument("--bind", default="127.0.0.1")
    args = p.parse_args(argv)
    Path(args.directory).mkdir(parents=True, exist_ok=True)
    with make_server(args.directory, args.port, args.bind) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
