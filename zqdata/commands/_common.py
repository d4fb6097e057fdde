"""What the `zq` subcommands of zqdata/commands/<area>.py share: their parsers, the operational DB, and how they print
errors, listings (or JSON) and state histories. Imports nothing heavy: every command module imports it at start-up."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def command(sub: argparse._SubParsersAction, name: str, summary: str, func: Callable[[argparse.Namespace], int],
            *positionals: str, with_json: bool = False) -> argparse.ArgumentParser:
    """The subcommand ``name`` running ``func``, with its positional arguments (and ``--json`` after them)."""
    p = sub.add_parser(name, help=summary)
    for arg in positionals:
        p.add_argument(arg)
    if with_json:
        p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def operational_db():
    """The operational DB (``ZQ_OPDB_URL`` or the embedded SQLite file): never a DuckDB file."""
    from zqdata import opdb

    return opdb.get_engine()


def fail(message: str) -> int:
    """Print the error to stderr; the exit code of a refused command (2)."""
    print(f"错误 error: {message}", file=sys.stderr)
    return 2


def governance_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command of a governance procedure (registration, demand): what the procedure refuses
    (zqdata.governance.procedure.ProcedureError) is printed as an error, exit code 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from zqdata.governance.procedure import ProcedureError

        try:
            return func(args)
        except ProcedureError as exc:
            return fail(str(exc))

    return run


def print_json(doc: Any) -> None:
    print(json.dumps(doc, ensure_ascii=False, indent=2, default=str))


def print_listing(rows: Sequence[Any], as_json: bool, unit: str, line: Callable[[Any], str] = lambda r: r.line(),
                  doc: Callable[[Any], Any] = lambda r: r.__dict__) -> int:
    """Rows as a JSON list (``doc`` of each), or one ``line`` each and then their count (``共 <n> <unit>``)."""
    if as_json:
        print_json([doc(r) for r in rows])
        return 0
    for r in rows:
        print(line(r))
    print(f"共 {len(rows)} {unit}")
    return 0


def print_history(events: Iterable[Mapping[str, Any]], state_cn: Mapping[str, str]) -> None:
    """A record's state changes, one line each: time, event (where the events have one), from → to, actor, note."""
    for e in events:
        frm = state_cn.get(e["from_state"], "-") if e["from_state"] else "-"
        event = f"{e['event']:<9} " if "event" in e else ""
        print(f"  {e['event_at']:%Y-%m-%d %H:%M:%S}  {event}{frm} → {state_cn[e['to_state']]}  {e['actor']}  "
              f"{e['note'] or ''}")
