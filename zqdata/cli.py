"""`zq`: the platform's command line. Each area registers its subcommands in zqdata/commands/<area>.py."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import zqdata.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zq", description="肇庆市公共数据资源授权运营平台 command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in sorted(pkgutil.iter_modules(zqdata.commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):  # shared helpers of the commands, not a subcommand
            continue
        importlib.import_module(f"zqdata.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zqdata.settings import restrict_permissions

    restrict_permissions()  # data folder 0700, files 0600
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
