"""dbt's Jinja templates compiled once (zqdata/jinja_code.py, issue 15): a template is compiled the first time and
served from the cache afterwards, with the output of its own source under its own environment; anything else in the
process compiles as before."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jinja2
import pytest
from dbt_common.clients.jinja import get_template

from zqdata import jinja_code


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The cache installed in this process for one test; `generated` counts Jinja's code generation (a compile)."""
    generated: list[str] = []
    real = jinja2.Environment._generate

    def counting(self, source, name, filename, defer_init=False):
        generated.append(type(self).__name__)
        return real(self, source, name, filename, defer_init=defer_init)

    monkeypatch.setattr(jinja2.Environment, "_generate", counting)
    folder = tmp_path / "jinja_code"
    assert jinja_code.install(folder)
    try:
        yield folder, generated
    finally:
        jinja_code.uninstall()


def _render(source: str, native: bool = False, **ctx):
    return get_template(source, ctx, native=native).render(ctx)


def test_a_template_is_compiled_once_then_served_from_the_cache(cache) -> None:
    folder, generated = cache
    source = "{% for i in range(n) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %} {{ who | upper }}"
    assert _render(source, n=3, who="gov") == "0,1,2 GOV"
    assert len(generated) == 1 and len(list(folder.glob("*.code"))) == 1
    assert _render(source, n=2, who="ops") == "0,1 OPS"  # the same code, another context
    assert len(generated) == 1  # not compiled again
    assert jinja_code.stats()["hits"] >= 1


def test_another_source_or_environment_is_another_entry(cache) -> None:
    folder, generated = cache
    assert _render("{{ 1 + 1 }}") == "2"
    assert _render("{{ 1 + 2 }}") == "3"  # a changed source is never served the code of the old one
    assert _render("{{ 1 + 1 }}", native=True) == "2"  # dbt's native environment: its own code generator
    assert len(generated) == 3 and len(list(folder.glob("*.code"))) == 3
    assert _render("{{ 1 + 1 }}", native=True) == "2" and _render("{{ 1 + 1 }}") == "2"
    assert len(generated) == 3


def test_a_damaged_entry_is_compiled_again_and_rewritten(cache) -> None:
    folder, generated = cache
    assert _render("{{ 'a' ~ x }}", x=1) == "a1"
    (entry,) = folder.glob("*.code")
    entry.write_bytes(b"\x00 not marshal")
    assert _render("{{ 'a' ~ x }}", x=2) == "a2"
    assert len(generated) == 2
    assert _render("{{ 'a' ~ x }}", x=3) == "a3"
    assert len(generated) == 2  # the rewritten entry serves again


def test_only_dbts_environments_use_the_cache(cache) -> None:
    folder, generated = cache
    assert jinja2.Environment().from_string("{{ 40 + 2 }}").render() == "42"
    assert jinja2.Environment().from_string("{{ 40 + 2 }}").render() == "42"
    assert len(generated) == 2 and not list(folder.glob("*.code"))


def test_uninstall_compiles_everything_again(cache) -> None:
    folder, generated = cache
    jinja_code.uninstall()
    _render("{{ 7 }}")
    _render("{{ 7 }}")
    assert len(generated) == 2 and not list(folder.glob("*.code"))
    assert jinja_code.install(folder)  # the fixture uninstalls at the end


def test_prune_keeps_the_newest_and_a_served_entry_is_new_again(cache) -> None:
    folder, _ = cache
    old = time.time() - 3600
    entries = []
    for i in range(4):  # oldest first
        before = set(folder.glob("*.code"))
        _render("{{ %d }}" % i)
        (entry,) = set(folder.glob("*.code")) - before
        os.utime(entry, (old + i, old + i))
        entries.append(entry)
    _render("{{ 0 }}")  # the oldest entry is used again: touched
    assert entries[0].stat().st_mtime > old + 10
    removed = jinja_code.prune(folder, keep=2)
    assert sorted(removed) == sorted(entries[1:3])
    assert sorted(folder.glob("*.code")) == sorted([entries[0], entries[3]])
