"""A check of the manifest a dbt build runs, made inside that build after dbt has parsed and before any node runs.

The ops step must not build a model the registry does not allow (dbt_guard.ops_manifest_problems: unregistered or
misplaced products, hooks, queries while compiling). It used to run `dbt parse` first, check that manifest, then start
`dbt build`, which parsed again (partially) from the state the first parse left: a second dbt start, state load and
manifest write, ~1.4 s of a 1,000-row night (bench/notes.md item 22). Here the build checks itself:

- The step puts a gate request in the build's sealed environment (`request`: the name of a check in `CHECKS` and its
  data, e.g. the registered products). The process that runs dbt (a fork server session, or the `zq-dbt` client
  itself when there is no server: zqdata/dbt_fork.py) takes the request out of its environment before dbt starts
  (`install`) and wraps dbt's `setup_manifest`, the one place every node-running command gets its manifest.
- Once dbt has its manifest, the check runs on that very object (as manifest.json would hold it): what is checked is
  what runs, with no window between a parse and a build. The verdict is written to the build's target folder
  (`REPORT`, also when it passes). A refusal raises inside dbt: nothing runs and dbt exits with an error.
- Fails closed: an unknown check, a request that cannot be read or a dbt whose `setup_manifest` moved stops the call
  before dbt parses; the step accepts a build only with a passing verdict in its folder (`verdict`), so a dbt that ran
  without the gate (the real `dbt` started instead of `zq-dbt`) fails the step.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

GATE_ENV = "ZQ_DBT_GATE"  # the request (JSON); read and removed before dbt starts: dbt never sees it
REPORT = "gate_verdict.json"  # in the build's target folder: {"check": ..., "problems": [...]}


def _ops_products(manifest: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    from zqdata.dbt_guard import ops_manifest_problems

    return ops_manifest_problems(manifest, spec["products"])


CHECKS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]] = {
    "ops_products": _ops_products,  # only registered products, in products.<name>, no hooks, no compile-time queries
}


class GateRefused(Exception):
    """The manifest did not pass the gate; dbt ran nothing."""


def request(check: str, **data: Any) -> dict[str, str]:
    """The environment entry that makes a dbt call check its manifest with `CHECKS[check]` before any node runs."""
    if check not in CHECKS:
        raise ValueError(f"unknown dbt gate check: {check}")
    return {GATE_ENV: json.dumps({"check": check, **data}, ensure_ascii=False, sort_keys=True)}


def requested(environ: Mapping[str, str]) -> bool:
    return GATE_ENV in environ


def install(environ: MutableMapping[str, str]) -> bool:
    """In the process about to run dbt: take the gate request out of `environ` and wrap dbt's `setup_manifest` with
    its check. False when no gate was requested. Raises (dbt must then not start) when the request cannot be read,
    names no known check, or dbt has no `setup_manifest` to wrap."""
    raw = environ.pop(GATE_ENV, None)
    if raw is None:
        return False
    spec = json.loads(raw)
    check = CHECKS[spec["check"]]
    import dbt.cli.requires as requires

    original = requires.setup_manifest
    if not callable(original) or getattr(original, "zq_gate", None) is not None:
        raise RuntimeError("dbt.cli.requires.setup_manifest cannot be gated")

    def gated_setup_manifest(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(ctx, *args, **kwargs)
        manifest = ctx.obj["manifest"].writable_manifest().to_dict(omit_none=False, context={"artifact": True})
        problems = check(manifest, spec)
        write_verdict(Path(ctx.obj["runtime_config"].project_target_path), spec["check"], problems)
        if problems:
            raise GateRefused("dbt 构建前检查未通过，未运行任何节点 (refused before any node ran):\n"
                              + "\n".join(problems))
        return out

    gated_setup_manifest.zq_gate = spec["check"]  # type: ignore[attr-defined]
    requires.setup_manifest = gated_setup_manifest
    return True


def write_verdict(folder: Path, check: str, problems: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT
    tmp = folder / f".{REPORT}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"check": check, "problems": problems}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def verdict(folder: Path, check: str) -> list[str] | None:
    """The problems the gate found in the build that used `folder` as its target (empty: it passed); None when no
    verdict of `check` is there (the gate did not run)."""
    try:
        found = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("check") != check or not isinstance(found.get("problems"), list):
        return None
    return [str(p) for p in found["problems"]]
