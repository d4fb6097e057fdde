"""Masking for display (Arts. 6, 24): the one place that decides how a record value may be shown to people.

Wherever a record value or a finding detail is shown — asset-check metadata, 逐级溯源 traces, alert mails and webhooks,
`zq trace` / `zq issues` output — it goes through this module. A value is masked by its field's *classification* in the
registry, never by what the value looks like: a field marked personal (``class.pi`` ≠ ``none``) or confidential is
masked whatever it contains — a malformed phone (``11637533767``), a 10-digit number, a raw birth date, a name, garbage.

- pseudonymized / suppressed / confidential fields: hidden (``〔假名化，不显示〕`` / ``〔已屏蔽〕``);
- ``mask`` (keep_first / keep_last): the same characters the boundary keeps, ``*`` between, at any length or shape;
- ``age_band``: the age band at the partition date when the value is a real date, else ``〔已遮蔽〕``;
- ``keep`` on a personal field (一般-level attributes such as gender): fully masked (``*`` per character);
- ``keep`` on a non-personal field (route id, amount, district code): shown as is, so messages stay useful.

Finding details embed the offending value (dbt: ``<text>：<field> = <value>``; pandera: ``<reason>：'<value>'``); it is
located by that structure and masked by the finding's field. Row-level text on a personal field whose value cannot be
located is masked after its first ``：`` (or value-like tokens are starred), known raw values of the row's personal
fields are replaced wherever they appear, and free text that cannot be attributed to a field keeps the pattern scrub
(`scrub_text`) as a second line of defence.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from zqdata.registry import Dataset, DatasetField, Registry, mask_rule_problems

HIDDEN = {"pseudonymize": "〔假名化，不显示〕", "suppress": "〔已屏蔽〕"}
MASKED = "〔已遮蔽〕"  # a personal value that cannot be shown even masked (e.g. a birth date that is no date)

_ID_LIKE = re.compile(r"(?<![0-9A-Za-z])(\d{6})\d{8}(\d{3}[0-9Xx])(?![0-9A-Za-z])")
_MOBILE_LIKE = re.compile(r"(?<!\d)(1\d{2})\d{4}(\d{4})(?!\d)")  # any 11 digits starting with 1, well-formed or not
_BAND = re.compile(r"^\d{1,3}-\d{1,3}$")  # an age band already (idempotent re-masking)
_DATE = re.compile(r"^\s*(\d{4})([-/ ])(\d{1,2})\2(\d{1,2})(?:[T ][0-9:.+-]*)?\s*$")  # what DuckDB casts to a date
# dbt findings: "<rule text>：<field>[+<field>…] = <value>" (zqdata.quality.dbt_findings)
_DBT_TAIL = re.compile(r"：(?P<field>[a-z][a-z0-9_]*(?:\+[a-z][a-z0-9_]*)*) = (?P<value>.*)\Z", re.S)
# pandera findings / quarantine reasons: "…(<field>) …：'<value>'" (zqdata.ingest), several joined by "；"
_PANDERA_PART = re.compile(r"\((?P<field>[a-z][a-z0-9_]*)\)(?P<mid>[^：；()]*)：'(?P<value>.*?)'(?=；|\Z)", re.S)
_QUOTED_TAIL = re.compile(r"：'(?P<value>.*)'\Z", re.S)
_VALUE_TOKEN = re.compile(r"(?a)[\w\-/:.+@]*\d[\w\-/:.+@]*")


def scrub_text(text: str | None) -> str:
    """Mask citizen-ID-like and mobile-like numbers inside free text that cannot be attributed to a field (second line
    of defence; values of known fields are masked by classification with `mask_value`)."""
    text = _ID_LIKE.sub(lambda m: m[1] + "********" + m[2][-1:].rjust(4, "*"), text or "")
    return _MOBILE_LIKE.sub(lambda m: m[1] + "****" + m[2], text)


def is_personal(f: DatasetField) -> bool:
    """Personal (any ``pi`` but ``none``) or confidential: never shown as delivered."""
    return f.class_.pi != "none" or f.class_.confidential


def shown_as_is(f: DatasetField) -> bool:
    """Whether the field's values may be shown unmasked: a non-personal, non-confidential field kept by its rule."""
    return not is_personal(f) and f.mask.method == "keep"


def _field(ds: Dataset | None, name: str | None) -> DatasetField | None:
    if ds is None or not name:
        return None
    return next((f for f in ds.fields if f.name == name), None)


def _already_masked(v: str) -> bool:
    """One of this module's own placeholders (shown as it is). Any other value, bracketed or not, is masked: 〔…〕 is
    text an agency can deliver."""
    return v == MASKED or v in HIDDEN.values()


def _age_band(v: str, band: int, as_of: dt.date | None) -> str:
    if _BAND.match(v):
        return v
    m = _DATE.match(v)
    if not m or as_of is None or band <= 0:
        return MASKED
    try:
        b = dt.date(int(m[1]), int(m[3]), int(m[4]))
    except ValueError:
        return MASKED
    if b > as_of:
        return MASKED
    age = as_of.year - b.year - (1 if (as_of.month, as_of.day) < (b.month, b.day) else 0)
    lo = age // band * band
    return f"{lo}-{lo + band - 1}"


def mask_value(ds: Dataset | None, field: str | DatasetField | None, value: Any, as_of: dt.date | None = None) -> str:
    """A record value of ``ds.field`` as it may be shown, by the field's classification and mask rule — whatever the
    value looks like. A value of no known field (nothing to classify it by) gets the pattern scrub only."""
    if value is None:
        return ""
    v = str(value)
    f = field if isinstance(field, DatasetField) else _field(ds, field)
    if f is None:
        return scrub_text(v)
    method = f.mask.method
    if f.class_.confidential or method == "suppress":
        return HIDDEN["suppress"]
    if method == "pseudonymize":
        return HIDDEN["pseudonymize"]
    if ds is not None and mask_rule_problems(ds, f):
        return HIDDEN["suppress"]  # a rule the boundary would refuse: never shown
    if v == "" or (_already_masked(v) and not shown_as_is(f)):
        return v
    if method == "mask":
        a, b = int(f.mask.keep_first or 0), int(f.mask.keep_last or 0)
        if len(v) > a + b:
            return v[:a] + "*" * (len(v) - a - b) + (v[len(v) - b:] if b else "")
        return "*" * len(v)  # no longer than what would be kept: masked whole, never shown in full
    if method == "age_band":
        return _age_band(v, int(f.mask.band_years or 0), as_of)
    if method == "keep" and not is_personal(f):
        return v
    return "*" * len(v)  # keep on a personal field (一般-level attributes): masked for display all the same


def mask_row(ds: Dataset, row: Mapping[str, Any], as_of: dt.date | None) -> dict[str, str]:
    """The registered fields present in ``row``, each masked with `mask_value` (nulls as empty)."""
    return {f.name: mask_value(ds, f, row.get(f.name), as_of) for f in ds.fields if f.name in row}


def _composite(ds: Dataset, names: str, value: str, as_of: dt.date | None) -> str:
    """A dbt value of a composite field ``a+b`` (``v1|v2``): each part by its field; all masked if it cannot be split."""
    fields = names.split("+")
    if len(fields) == 1:
        return mask_value(ds, fields[0], value, as_of)
    parts = value.split("|")
    if len(parts) == len(fields):
        return "|".join(mask_value(ds, n, p, as_of) for n, p in zip(fields, parts))
    known = [_field(ds, n) for n in fields]
    return value if all(k is not None and shown_as_is(k) for k in known) else MASKED


def _as_date(v: Any) -> dt.date | None:
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    try:
        return dt.date.fromisoformat(str(v)[:10]) if v else None
    except ValueError:
        return None


def mask_text(
    ds: Dataset | None,
    field: str | None,
    text: Any,
    as_of: dt.date | None = None,
    *,
    row_level: bool = True,
    raw_row: Mapping[str, Any] | None = None,
) -> str:
    """A finding detail or quarantine reason as it may be shown: the values it embeds masked by their fields'
    classification (see the module doc), then the pattern scrub."""
    s = "" if text is None else str(text)
    if not s or ds is None:
        return scrub_text(s)
    located = False

    def pandera(m: re.Match) -> str:
        nonlocal located
        f = _field(ds, m["field"])
        if f is None:
            return m[0]
        located = True
        return f"({m['field']}){m['mid']}：'{mask_value(ds, f, m['value'], as_of)}'"

    s = _PANDERA_PART.sub(pandera, s)
    m = _DBT_TAIL.search(s)
    if m and all(_field(ds, n) is not None for n in m["field"].split("+")):
        located = True
        s = s[: m.start()] + f"：{m['field']} = {_composite(ds, m['field'], m['value'], as_of)}"
    f = _field(ds, field)
    if not located and f is not None and row_level and not shown_as_is(f):
        q = _QUOTED_TAIL.search(s)
        if q:
            s = s[: q.start()] + f"：'{mask_value(ds, f, q['value'], as_of)}'"
        elif "：" in s:
            head = s.split("：", 1)[0]
            s = f"{head}：{MASKED}"
        else:
            s = _VALUE_TOKEN.sub(lambda t: t[0] if len(t[0]) < 4 else "*" * len(t[0]), s)
    if raw_row:
        for rf in ds.fields:
            raw = raw_row.get(rf.name)
            if raw is None or shown_as_is(rf):
                continue
            v = str(raw).strip()
            if not v:
                continue
            shown = mask_value(ds, rf, v, as_of)
            s = s.replace(f"'{v}'", f"'{shown}'")
            if len(v) >= 2 and not (v.isdigit() and len(v) < 4):
                s = s.replace(v, shown)
    return scrub_text(s)


def _process_registry() -> Registry | None:
    """The process-wide registry when a caller has none at hand (None if it cannot be loaded: scrub only)."""
    from zqdata.registry import RegistryError, registry

    try:
        return registry()
    except RegistryError:
        return None


def finding(registry: Registry | None, f: Mapping[str, Any], raw_row: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A `quality.findings` row with its ``detail`` masked for display by the finding's dataset and field."""
    d = dict(f)
    if d.get("detail"):
        registry = registry if registry is not None else _process_registry()
        ds = registry.datasets.get(d.get("dataset") or "") if registry is not None else None
        row_level = d.get("row_number") is not None or bool(d.get("lineage_id"))
        d["detail"] = mask_text(ds, d.get("field"), d["detail"], _as_date(d.get("partition_date")),
                                row_level=row_level, raw_row=raw_row)
    return d


def trace_dict(registry: Registry | None, trace: Mapping[str, Any]) -> dict[str, Any]:
    """A stored trace (JSON of `zqdata.lineage.Trace`, e.g. in the issue register) masked again before it is shown or
    sent: traces stored before masking went by classification are made safe too (masking is idempotent)."""
    out = dict(trace)
    registry = registry if registry is not None else _process_registry()
    if "findings" in out:
        out["findings"] = [finding(registry, f) for f in out.get("findings") or []]
    if "rows" in out:
        rows = []
        for r in out.get("rows") or []:
            r = dict(r)
            ds = registry.datasets.get(r.get("dataset") or "") if registry is not None else None
            day = _as_date(r.get("partition_date"))
            if ds is not None:
                r["values"] = {k: (mask_value(ds, k, v, day) if _field(ds, k) else scrub_text(str(v)))
                               for k, v in (r.get("values") or {}).items()}
            if r.get("quarantine_reason"):
                r["quarantine_reason"] = mask_text(ds, None, r["quarantine_reason"], day)
            rows.append(r)
        out["rows"] = rows
    return out
