"""dbt's log events built by protobuf's constructor (zqdata/dbt_events.py, issue 15): the same messages ParseDict
builds, for every event of a real dbt build and for the values the constructor refuses."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dbt.events import core_types_pb2
from dbt_common.events import types_pb2
from google.protobuf import json_format

from tests.test_dbt_fork import _project
from zqdata import dbt_events

ROOT = Path(__file__).resolve().parents[1]


def _cls(name: str):
    """An event's message class: dbt-common's own events, or dbt-core's."""
    return getattr(types_pb2, name, None) or getattr(core_types_pb2, name)


def _same(a, b) -> bool:
    return a == b and a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def _node_info(**extra):
    return {"node_path": "m.sql", "node_name": "m", "unique_id": "model.p.m", "resource_type": "model",
            "materialized": "table", "node_status": "success", "node_started_at": "2026-12-07T03:19:45.300744",
            "node_finished_at": "", "meta": {"owner": "数据局", "tier": 1, "tags": ["a", "b"], "none": None},
            "node_relation": {"database": "gov", "schema": "stg", "alias": "m", "relation_name": '"gov"."stg"."m"'},
            **extra}


@pytest.mark.parametrize("cls, data", [
    # the shapes dbt-common builds: a message with its info (a Timestamp as RFC 3339 text, a map) and an event's data
    ("NoteMsg", {"info": {"name": "Note", "code": "Z050", "msg": "注意 note", "level": "debug",
                          "invocation_id": "x", "pid": 7, "thread": "MainThread",
                          "ts": "2026-12-07T03:19:45.300744Z", "extra": {"k": "v"}}}),
    ("NodeStart", {"node_info": _node_info()}),
    ("LogTestResult", {"node_info": _node_info(), "name": "t", "status": "fail", "index": 3, "num_models": 9,
                       "execution_time": 0.25, "num_failures": 2}),
    ("EndRunResult", {"results": [{"status": "success", "message": "ok",
                                   "timing_info": [{"name": "compile", "started_at": "2026-12-07T03:19:45Z",
                                                    "completed_at": "2026-12-07T03:19:46.5Z"}],
                                   "thread": "Thread-1", "execution_time": 1.5, "num_failures": 0,
                                   "adapter_response": {"rows_affected": 3}}],
                      "elapsed_time": 2.0, "generated_at": "2026-12-07T03:19:47Z"}),
    ("Note", {"msg": None}),  # None: the field is left unset by both
    # what the constructor refuses, built by ParseDict as before
    ("LogTestResult", {"nodeInfo": _node_info(), "numModels": "9", "index": "3"}),  # JSON names, numbers as text
    ("NoteMsg", {"info": {"name": "Note", "pid": 3.0, "extra": {}}}),  # an integral float for an int
])
def test_a_message_is_the_one_parsedict_builds(cls: str, data: dict) -> None:
    msg_cls = _cls(cls)
    assert _same(dbt_events.build_message(json.loads(json.dumps(data)), msg_cls()),
                 json_format.ParseDict(json.loads(json.dumps(data)), msg_cls()))


def test_what_parsedict_refuses_is_refused_the_same_way() -> None:
    for bad in ({"no_such_field": 1}, {"info": {"ts": "not a time"}}, {"info": {"pid": "seven"}},
                {"info": {"ts": {"seconds": 5}}}):
        with pytest.raises(json_format.ParseError):
            json_format.ParseDict(bad, types_pb2.NoteMsg())
        with pytest.raises(json_format.ParseError):
            dbt_events.build_message(bad, types_pb2.NoteMsg())


def test_the_input_is_left_as_it_was() -> None:
    data = {"info": {"name": "Note", "ts": "2026-12-07T03:19:45Z"}}
    dbt_events.build_message(data, types_pb2.NoteMsg())
    assert data == {"info": {"name": "Note", "ts": "2026-12-07T03:19:45Z"}}


def test_install_replaces_parsedict_in_dbt_common_only_and_uninstall_restores_it() -> None:
    from dbt_common.events import base_types

    try:
        assert dbt_events.install()
        assert base_types.ParseDict is dbt_events.build_message
        assert json_format.ParseDict is not dbt_events.build_message
    finally:
        dbt_events.uninstall()
    assert base_types.ParseDict is json_format.ParseDict


PROBE = """
import copy, json, pickle, sys
import dbt.cli.main
from dbt_common.events import base_types
from google.protobuf import json_format
from zqdata import dbt_events

calls, built, fallbacks = [], [], []
assert dbt_events.install()
parse_dict = json_format.ParseDict
def counted(*a, **kw):
    fallbacks.append(1)
    return parse_dict(*a, **kw)
json_format.ParseDict = counted  # build_message's fallback
fast = base_types.ParseDict
def recording(js, message, **kw):
    calls.append((type(message).__module__, type(message).__name__, copy.deepcopy(js)))
    out = fast(js, message, **kw)
    built.append(out.SerializeToString(deterministic=True))  # as built: dbt-common adds the event's data after
    return out
base_types.ParseDict = recording
project = sys.argv[1]
res = dbt.cli.main.dbtRunner().invoke(["build", "--project-dir", project, "--profiles-dir", project,
                                       "--target-path", project + "/target", "--log-path", project + "/logs"])
pickle.dump({"calls": calls, "built": built, "fallbacks": len(fallbacks),
             "success": res.success}, open(sys.argv[2], "wb"))
"""


def test_every_event_of_a_dbt_build_is_the_message_parsedict_builds(tmp_path: Path) -> None:
    """A dbt build with a model, a passing and a failing test, in a process where dbt-common builds its events with
    `build_message`: every event built is byte for byte the message ParseDict builds from the same dict, and the
    constructor built them (a fallback for each would keep the cost)."""
    import pickle

    project = _project(tmp_path, "{{ config(materialized='table', meta={'owner': '数据局'}) }}\n"
                                 "select 1 as id, null as name union all select 2, 'b'")
    (project / "models" / "schema.yml").write_text(yaml.safe_dump({"version": 2, "models": [{
        "name": "probe_model", "columns": [
            {"name": "id", "data_tests": ["not_null", "unique"]},
            {"name": "name", "data_tests": [{"not_null": {"config": {"severity": "warn"}}}]}]}]}))
    out = tmp_path / "events.pickle"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DBT_")}, "PROBE_DB": str(project / "p.duckdb")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(project), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = pickle.loads(out.read_bytes())
    assert record["success"] is True  # the failing test is a warning
    calls = record["calls"]
    assert len(calls) > 100
    assert {"LogTestResult", "NodeFinished", "LogModelResult", "AdapterRegistered"} <= {c for _, c, _ in calls}
    for (module, name, data), got in zip(calls, record["built"], strict=True):
        expected = json_format.ParseDict(data, getattr(importlib.import_module(module), name)())
        assert got == expected.SerializeToString(deterministic=True), name
    assert record["fallbacks"] == 0  # every one built by the constructor: a fallback each would keep the cost
