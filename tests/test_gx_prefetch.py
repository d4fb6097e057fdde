"""Issue 15, a night's fixed cost: Great Expectations is imported in the background while the gov dbt step waits for
dbt (a run of the embedded default is a new process every night, and GX's import is ~2.7-4 s of it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

from zqdata.settings import repo_root

FIRST_IMPORTER = textwrap.dedent("""
    import importlib.abc, sys, threading

    first = {}

    class Watch(importlib.abc.MetaPathFinder):  # records which thread imports GX first; finds nothing itself
        def find_spec(self, name, path, target=None):
            first.setdefault(name, threading.current_thread().name)
            return None

    sys.meta_path.insert(0, Watch())
    from zqdata.quality import gx_runner

    assert "great_expectations" not in sys.modules, "imported before the prefetch"
    thread = gx_runner.prefetch_gx()
    again = gx_runner.prefetch_gx()
    thread.join(600)
    missing = [m for m in gx_runner.PREFETCH_MODULES if m not in sys.modules]
    ctx = gx_runner.ephemeral_context()  # what the findings step then does: no import of its own left
    print(thread.name, first["great_expectations"], first["expectations.suites"], again, missing,
          gx_runner.prefetch_gx(), type(ctx).__name__)
""")


def test_the_prefetch_imports_gx_in_its_own_thread_once_and_the_quality_steps_then_find_it_imported():
    out = subprocess.run([sys.executable, "-c", FIRST_IMPORTER], cwd=repo_root(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    thread, gx_by, suites_by, again, missing, later, ctx = out.stdout.split()[-7:]
    assert thread == "zq-prefetch-gx"
    assert (gx_by, suites_by) == (thread, thread)  # not the main thread: it went on while GX was imported
    assert again == "None" and later == "None"  # one thread per process, none once everything is imported
    assert missing == "[]"
    assert ctx == "EphemeralDataContext"


def _context(nodes: set[str], steps: list[str] | None) -> SimpleNamespace:
    return SimpleNamespace(run=SimpleNamespace(step_keys_to_execute=steps),
                           job_def=SimpleNamespace(has_node_named=lambda name: name in nodes))


def test_the_gov_dbt_step_prefetches_gx_only_for_a_run_that_validates_after_it(monkeypatch):
    from assets.governance import quality

    started = []
    monkeypatch.setattr("zqdata.quality.gx_runner.prefetch_gx", lambda: started.append(1) or "thread")
    whole = {"gov_dbt_models", "quality_findings", "gx_dataset_expectations", "boundary_crossing"}
    assert quality.prefetch_gx_for_run(_context(whole, None)) == "thread"  # the nightly job
    assert quality.prefetch_gx_for_run(_context(whole, ["gov_dbt_models", "gx_dataset_expectations"])) == "thread"
    assert quality.prefetch_gx_for_run(_context(whole, ["gov_dbt_models", "boundary_crossing"])) is None
    assert quality.prefetch_gx_for_run(_context({"gov_dbt_models"}, None)) is None  # a job of the dbt models only
    assert len(started) == 2
