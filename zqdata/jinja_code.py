"""dbt's Jinja templates compiled once, not once per dbt call: a code cache for the dbt sessions of the fork server.

Every dbt call compiles, from their source, the Jinja templates it renders: each macro it calls (dbt's
materializations, the adapter's, this project's) and each node's SQL. A session of the fork server (zqdata/dbt_fork.py)
is a fresh process for that, so a 1,000-row night's gov build compiled ~1.5 s of templates and the ops parse and build
~0.7 s more, the same sources every night (bench/notes.md item 21). Jinja's own bytecode cache
(`jinja2.BytecodeCache`) only serves templates a loader loads; dbt builds every template with `from_string`, so this
module caches at `Environment.compile`, with the same store Jinja's cache uses (`marshal` of the code object).

- **Keyed by everything the code depends on**: the template's source, name and filename, the environment's class,
  code generator, extensions, lexer and compiler options, the filters and tests it knows (the code differs by a
  filter's kind), and the versions of Python, Jinja and dbt-common. A different source is a different entry; a
  changed source is never served the old code.
- **Only dbt's environments** (`MacroFuzzEnvironment` and its native subclass): nothing else in the process.
- **Atomic entries** (written to a temporary name, then renamed): a session reads a whole entry or none. An entry that
  cannot be read is compiled again and rewritten. The folder is pruned by the caller (`prune`).
- The entries are code the dbt session runs, as Python's own `__pycache__` is: the folder is the project's `target/`,
  written by the platform's own dbt calls only; the key is a SHA-256 of the source, so no template can be served the
  code of another.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import sys
import uuid
from pathlib import Path
from types import CodeType
from typing import Any

FOLDER = "jinja_code"  # under the dbt project's target/
KEPT = 4096  # entries kept by `prune` (~2 KB each): a night uses ~400
_SUFFIX = ".code"
_state: dict[str, Any] = {}


def environment_key(env: Any) -> str:
    """What an environment's compiled code depends on besides the source (see the module's docstring)."""
    import dbt_common
    import jinja2
    from jinja2.utils import _PassArg

    def kinds(functions: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((name, str(_PassArg.from_obj(f))) for name, f in functions.items())

    cls = type(env)
    return repr((
        sys.version, jinja2.__version__, getattr(dbt_common, "__version__", ""), marshal.version,
        f"{cls.__module__}.{cls.__qualname__}",
        f"{env.code_generator_class.__module__}.{env.code_generator_class.__qualname__}",
        sorted(env.extensions),
        (env.block_start_string, env.block_end_string, env.variable_start_string, env.variable_end_string,
         env.comment_start_string, env.comment_end_string, env.line_statement_prefix, env.line_comment_prefix,
         env.trim_blocks, env.lstrip_blocks, env.newline_sequence, env.keep_trailing_newline),
        env.optimized, env.is_async, env.autoescape if isinstance(env.autoescape, bool) else repr(env.autoescape),
        kinds(env.filters), kinds(env.tests),
    ))


def entry_name(env: Any, source: str, name: str | None, filename: str | None, defer_init: bool) -> str:
    digest = hashlib.sha256()
    for part in (environment_key(env), repr((name, filename, defer_init)), source):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest() + _SUFFIX


def _load(path: Path) -> CodeType | None:
    try:
        code = marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return code if isinstance(code, CodeType) else None


def _store(path: Path, code: CodeType) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(marshal.dumps(code))
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk: the template was compiled, only not kept
        tmp.unlink(missing_ok=True)


def install(folder: str | Path) -> bool:
    """Serve the compiled code of dbt's templates from `folder` in this process (a dbt session) and keep what it
    compiles there. Once per process; False when dbt-common's Jinja environment is not where this expects it (a dbt
    upgrade moved it: dbt then compiles everything itself, as before)."""
    if _state.get("folder") is not None:
        return True
    try:
        from dbt_common.clients.jinja import MacroFuzzEnvironment
    except ImportError:
        return False
    if "compile" in MacroFuzzEnvironment.__dict__:
        return False  # dbt-common defines its own compile: do not replace it
    cache = Path(folder)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    _state.update(folder=cache, hits=0, misses=0)
    compile_ = MacroFuzzEnvironment.compile  # jinja2.Environment.compile

    def cached_compile(self: Any, source: Any, name: str | None = None, filename: str | None = None,
                       raw: bool = False, defer_init: bool = False) -> Any:
        if raw or not isinstance(source, str):
            return compile_(self, source, name, filename, raw, defer_init)
        path = cache / entry_name(self, source, name, filename, defer_init)
        code = _load(path)
        if code is not None:
            _state["hits"] += 1
            with contextlib.suppress(OSError):
                os.utime(path)  # in use: `prune` keeps the newest
            return code
        code = compile_(self, source, name, filename, raw, defer_init)
        _state["misses"] += 1
        _store(path, code)
        return code

    MacroFuzzEnvironment.compile = cached_compile  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """dbt compiles every template itself again (tests)."""
    if _state.pop("folder", None) is not None:
        from dbt_common.clients.jinja import MacroFuzzEnvironment

        del MacroFuzzEnvironment.compile


def stats() -> dict[str, int]:
    """Templates served from the cache and compiled, in this process since `install`."""
    return {"hits": int(_state.get("hits", 0)), "misses": int(_state.get("misses", 0))}


def prune(folder: str | Path, keep: int = KEPT) -> list[Path]:
    """Remove the entries beyond the newest `keep` (by modification time: a session touches each entry it uses);
    returns them. An entry removed while a session reads it only costs that session a compile."""
    entries = sorted(Path(folder).glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)
    return entries[keep:]
