"""Children die with their parent (issue 17, finding 1): a dbt process started by a step is killed when the step's
process is killed (kill -9), instead of writing a warehouse file on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARENT = textwrap.dedent("""
    import sys, time
    import assets.dbt_common  # installs the launcher dagster-dbt uses for dbt
    import dagster_dbt.core.dbt_cli_invocation as invocation
    child = invocation.subprocess.Popen(["sleep", "3600"])
    print(child.pid, flush=True)
    time.sleep(3600)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waiting for init to reap it is dead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_the_dbt_child_dies_when_its_step_process_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=120)
        deadline = time.monotonic() + 120
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "dbt outlived the killed step process"
    finally:
        if parent.poll() is None:
            parent.kill()
