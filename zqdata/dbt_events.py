"""dbt's log events built by protobuf's own constructor, not by `json_format.ParseDict`: for the dbt sessions.

dbt-common builds every event it fires as a protobuf message from a dict of keyword arguments, twice (the event's
data, then the message with its info), through `google.protobuf.json_format.ParseDict`, a walk over the dict in
Python. A 1,000-row night's gov build fires ~2,700 events: ~1.0 s of CPU in ParseDict on the bench machine, an eighth
of the build (bench/notes.md item 21). The generated message class takes the same dict as keyword arguments (nested
dicts for message fields, lists for repeated ones, dicts for maps, enum names) and builds it in C (upb).

- **Only where the two agree**: the constructor is strict, and whatever it refuses (a JSON-style camelCase name, a
  number spelled as a string, a base64 bytes value, a value of the wrong type) is built by ParseDict as before. The
  one JSON spelling dbt-common uses, a `google.protobuf.Timestamp` given as its RFC 3339 string (every event's
  `info.ts`, a result's timings), is converted first with the method ParseDict uses (`Timestamp.FromJsonString`).
  The tests compare both on every event of real dbt builds and on such values. One value ParseDict refuses and the
  constructor takes: a bool for an integer field (`True` as 1). dbt-common never passes one; had it, ParseDict would
  have left the event without its data and logged a warning instead.
- **Only dbt-common's events** (`dbt_common.events.base_types`, which calls ParseDict on a fresh message and keeps
  what it returns); nothing else in the process.
"""

from __future__ import annotations

from typing import Any

_state: dict[str, Any] = {}
_TIMESTAMP = "google.protobuf.Timestamp"
_paths: dict[str, dict[str, Any]] = {}  # per message type: where its Timestamps are (`timestamp_paths`)


def timestamp_paths(descriptor: Any) -> dict[str, Any]:
    """The fields of a message type that are, or lead through messages to, a `google.protobuf.Timestamp`:
    {field: True} for a Timestamp, {field: {...}} for a message holding one; maps are left out (dbt-common has none
    of Timestamps). Cached per type."""
    name = descriptor.full_name
    if name not in _paths:
        _paths[name] = {}  # a recursive type meets itself empty, then is filled below
        found: dict[str, Any] = {}
        for field in descriptor.fields:
            sub = field.message_type
            if sub is None or sub.GetOptions().map_entry:
                continue
            if sub.full_name == _TIMESTAMP:
                found[field.name] = True
            else:
                inner = timestamp_paths(sub)
                if inner:
                    found[field.name] = inner
        _paths[name] = found
    return _paths[name]


def _with_timestamps(value: Any, paths: dict[str, Any]) -> Any:
    """`value` (a dict of one message) with the strings at `paths` made Timestamps; the input is not changed."""
    from google.protobuf.timestamp_pb2 import Timestamp

    if not paths or type(value) is not dict:
        return value
    out = value
    for key, sub in paths.items():
        item = value.get(key)
        if item is None:
            continue
        if sub is True:
            def convert(v: Any) -> Any:
                if not isinstance(v, str):  # ParseDict takes a Timestamp as its RFC 3339 text only
                    raise TypeError(f"Timestamp JSON value not a string: {v!r}")
                ts = Timestamp()
                ts.FromJsonString(v)
                return ts
        else:
            def convert(v: Any, sub: dict[str, Any] = sub) -> Any:
                return _with_timestamps(v, sub)
        new = [convert(v) for v in item] if isinstance(item, list) else convert(item)
        if new is not item:
            out = dict(out) if out is value else out
            out[key] = new
    return out


def build_message(js_dict: Any, message: Any, ignore_unknown_fields: bool = False, descriptor_pool: Any = None,
                  max_recursion_depth: int = 100) -> Any:
    """`json_format.ParseDict(js_dict, message)` for a fresh `message`, by its class's constructor when that accepts
    the dict, else by ParseDict. Returns the message built (the caller keeps the return value, as dbt-common does)."""
    from google.protobuf import json_format

    if (type(js_dict) is dict and not ignore_unknown_fields and descriptor_pool is None
            and not message.ListFields()):
        try:
            return type(message)(**_with_timestamps(js_dict, timestamp_paths(message.DESCRIPTOR)))
        except Exception:  # noqa: BLE001 - whatever the constructor refuses, ParseDict decides as before
            pass
    return json_format.ParseDict(js_dict, message, ignore_unknown_fields=ignore_unknown_fields,
                                 descriptor_pool=descriptor_pool, max_recursion_depth=max_recursion_depth)


def install() -> bool:
    """Build dbt-common's events with `build_message` in this process (a dbt session or the fork server before its
    first fork). False when dbt-common does not call ParseDict where this expects (an upgrade moved it): dbt then
    builds its events as before."""
    if _state.get("installed"):
        return True
    try:
        from dbt_common.events import base_types
        from google.protobuf import json_format
    except ImportError:
        return False
    if getattr(base_types, "ParseDict", None) is not json_format.ParseDict:
        return False
    base_types.ParseDict = build_message
    _state["installed"] = True
    return True


def uninstall() -> None:
    """Back to ParseDict (tests)."""
    if _state.pop("installed", None):
        from dbt_common.events import base_types
        from google.protobuf import json_format

        base_types.ParseDict = json_format.ParseDict
