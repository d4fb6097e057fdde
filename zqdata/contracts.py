"""Ingestion-boundary contracts: a pandera schema per dataset, built from the registry.

The contract checks only what decides whether a record can enter the ODS at all: the column set, required fields
non-empty, typed fields parseable. Value rules (check digits, code tables, ranges) are dbt/GX rules downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from zqdata.registry import Dataset, DatasetField

# Accepted spellings (standardizing them is dbt staging's job). ASCII digits only: full-width digits are not parseable.
_DATE = r"[0-9]{4}(?:-[0-9]{1,2}-[0-9]{1,2}|/[0-9]{1,2}/[0-9]{1,2}|[0-9]{2}[0-9]{2})"
_TIME = r"[0-9]{1,2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?"
_TZ = r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
PATTERNS: dict[str, str] = {
    "integer": r"\s*[+-]?[0-9]+\s*",
    "decimal": r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*",
    "date": rf"\s*{_DATE}\s*",
    "timestamp": rf"\s*(?:{_DATE}(?:T|\s+){_TIME}{_TZ}|[0-9]{{14}})\s*",
    "year_month": r"\s*[0-9]{4}(?:[-/][0-9]{1,2}|[0-9]{2})\s*",  # a string field of format year_month
}
# Loose component extraction, applied only to values that already match PATTERNS (so it cannot mis-split them).
_PARTS = (
    r"^\s*(?P<year>[0-9]{4})[-/]?(?P<month>[0-9]{1,2})[-/]?(?P<day>[0-9]{1,2})"
    r"(?:(?:T|\s*)(?P<hour>[0-9]{1,2}):?(?P<minute>[0-9]{2})(?::?(?P<second>[0-9]{2}))?)?"
)
TYPE_CN = {"integer": "整数", "decimal": "数值", "date": "日期", "timestamp": "日期时间", "year_month": "年月"}
# Formats whose validity the contract checks on an OPTIONAL field (an invalid value is nulled, the record kept: registry
# quality_policy invalid_optional); on a required field they are dbt's accuracy rules (zqdata.reference). year_month
# is checked on every field: it is the spelling of a typed value (standardization), like a date.
OPTIONAL_FORMAT_RULES: dict[str, tuple[str, str]] = {
    "mobile": ("accuracy", "不是有效的中国大陆手机号码（11 位，1[3-9] 开头）"),
    "citizen_id": ("accuracy", "不符合 GB 11643 公民身份号码（校验位或出生日期错误）"),
    "uscc": ("accuracy", "不符合 GB 32100 统一社会信用代码（校验位错误）"),
}
COLUMN_SET_RULE = "contract.column_set"


@dataclass(frozen=True)
class RuleInfo:
    """What a pandera check means for quarantine and findings."""

    rule: str
    dimension: str
    field: str
    reason: str  # Chinese, specific; the offending value is appended by the ingester
    nulls: bool = False  # an invalid value of an optional field: nulled, the record kept (quality_policy)


def field_kind(f: DatasetField) -> str:
    """The kind of value whose spelling the contract checks and ingestion normalizes: the field type, or year_month."""
    if f.type == "string" and f.format == "year_month":
        return "year_month"
    return f.type


# Python's ``\s`` on str (what the patterns mean) spelled for RE2, which pyarrow's regex functions use.
_PY_SPACE = r"[\t\n\x0b\f\r\x1c-\x1f\x85\p{Z}]"
_ARROW_PATTERNS = {k: "^(?:" + v.replace(r"\s", _PY_SPACE) + ")$" for k, v in PATTERNS.items()}


def _text(s: pd.Series) -> pa_arrow.Array:
    """The values as an Arrow string array (zero-copy for Arrow-backed text; missing values null)."""
    values = s if isinstance(s.dtype, pd.StringDtype) else s.astype("str")
    arr = pa_arrow.array(values, type=pa_arrow.string(), from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa_arrow.ChunkedArray) else arr


def _blank_arrow(arr: pa_arrow.Array) -> np.ndarray:
    """Missing or whitespace only (Unicode whitespace, like ``str.strip``)."""
    empty = pc.equal(pc.utf8_trim_whitespace(arr), "")
    return pc.or_kleene(pc.is_null(arr), empty).fill_null(True).to_numpy(zero_copy_only=False)


def _blank(s: pd.Series) -> pd.Series:
    return pd.Series(_blank_arrow(_text(s)), index=s.index)


def parseable(s: pd.Series, field_type: str) -> pd.Series:
    """True where the value is empty or parses as ``field_type`` (dates also checked for a real calendar day/time)."""
    if field_type == "string":
        return pd.Series(True, index=s.index)
    # Vectorized in Arrow (RE2, anchored like fullmatch): pandas' str.fullmatch fell back to Python per value.
    arr = _text(s)
    blank = _blank_arrow(arr)
    ok = blank | pc.match_substring_regex(arr, _ARROW_PATTERNS[field_type]).fill_null(False).to_numpy(zero_copy_only=False)
    if field_type == "year_month":
        cand = ok & ~blank
        if cand.any():
            month = pc.extract_regex(arr.filter(pa_arrow.array(cand)), r"^\s*[0-9]{4}[-/]?(?P<m>[0-9]{1,2})\s*$")
            m = pc.cast(pc.struct_field(month, "m"), pa_arrow.int64()).to_numpy(zero_copy_only=False)
            real = np.ones(len(ok), dtype=bool)
            real[cand] = (m >= 1) & (m <= 12)
            ok = ok & real
    if field_type in ("date", "timestamp"):
        cand = ok & ~blank
        if cand.any():
            real = np.ones(len(ok), dtype=bool)
            real[cand] = _real_calendar(arr.filter(pa_arrow.array(cand)))
            ok = ok & real
    return pd.Series(ok, index=s.index)


def _real_calendar(values: np.ndarray | pa_arrow.Array) -> np.ndarray:
    """Whether each (pattern-matching) date/time string names a real day and time of day; vectorized with pyarrow."""
    arr = values if isinstance(values, pa_arrow.Array) else pa_arrow.array(values, pa_arrow.string())
    parts = pc.extract_regex(arr, _PARTS)
    num = {}
    for name in ("year", "month", "day", "hour", "minute", "second"):
        col = pc.struct_field(parts, name)
        col = pc.if_else(pc.or_kleene(pc.is_null(col), pc.equal(col, "")), "0", col)
        num[name] = pc.cast(col, pa_arrow.int64()).to_numpy(zero_copy_only=False)
    y, m, d = num["year"], num["month"], num["day"]
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    days_in = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(m, 0, 12)] + ((m == 2) & leap)
    return (
        (m >= 1) & (m <= 12) & (d >= 1) & (d <= days_in)
        & (num["hour"] < 24) & (num["minute"] < 60) & (num["second"] < 60)
    )  # fmt: skip


def rule_for_required(f: DatasetField) -> RuleInfo:
    return RuleInfo("contract.required", "completeness", f.name, f"必填字段「{f.cn_name}」({f.name}) 为空")


_NULLED = "，已置空、记录保留"  # no parentheses: zqdata.display locates the value after "(field) …：'"


def rule_for_type(f: DatasetField) -> RuleInfo:
    kind = field_kind(f)
    if kind == "year_month":
        return RuleInfo("contract.format.year_month", "standardization", f.name,
                        f"字段「{f.cn_name}」({f.name}) 的值不是有效的年月 YYYY-MM，月份须为 01–12"
                        + ("" if f.required else _NULLED), nulls=not f.required)
    return RuleInfo(
        f"contract.type.{f.type}",
        "standardization",
        f.name,
        f"字段「{f.cn_name}」({f.name}) 的值无法解析为{TYPE_CN[f.type]}" + ("" if f.required else _NULLED),
        nulls=not f.required,
    )


def rule_for_format(f: DatasetField) -> RuleInfo | None:
    """The validity rule of an optional field's format (see OPTIONAL_FORMAT_RULES), or None."""
    if f.required or f.format not in OPTIONAL_FORMAT_RULES:
        return None
    dimension, text = OPTIONAL_FORMAT_RULES[f.format]
    return RuleInfo(f"contract.format.{f.format}", dimension, f.name,
                    f"可选字段「{f.cn_name}」({f.name}) 的值{text}{_NULLED}", nulls=True)


def valid_format(s: pd.Series, fmt: str) -> pd.Series:
    """True where the value is blank or (trimmed) valid in ``fmt`` (mobile vectorized; check digits per value)."""
    from zqdata import standards

    arr = pc.utf8_trim_whitespace(_text(s))
    blank = _blank_arrow(arr)
    if fmt == "mobile":
        ok = pc.match_substring_regex(arr, r"^1[3-9][0-9]{9}$").fill_null(False).to_numpy(zero_copy_only=False)
    else:
        check = standards.is_valid_citizen_id if fmt == "citizen_id" else standards.is_valid_uscc
        ok = np.array([v is not None and check(v) for v in arr.to_pylist()], dtype=bool)
    return pd.Series(blank | ok, index=s.index)


def build_contract(dataset: Dataset, strict: bool = True) -> pa.DataFrameSchema:
    """The pandera schema of a dataset's delivered records (all values text). ``strict``: the column set must equal the registry."""
    columns: dict[str, pa.Column] = {}
    for f in dataset.fields:
        checks: list[pa.Check] = []
        if f.required:
            req = rule_for_required(f)
            checks.append(pa.Check(lambda s: ~_blank(s), name=req.rule, description=req.reason, ignore_na=False))
        if field_kind(f) != "string":
            typ = rule_for_type(f)
            checks.append(
                pa.Check(lambda s, t=field_kind(f): parseable(s, t), name=typ.rule, description=typ.reason,
                         ignore_na=True)
            )
        fmt = rule_for_format(f)
        if fmt is not None:
            checks.append(pa.Check(lambda s, x=f.format: valid_format(s, x), name=fmt.rule, description=fmt.reason,
                                   ignore_na=True))
        # Nulls are judged by the required check (one reason per problem), so pandera's own not-null check stays off.
        columns[f.name] = pa.Column(nullable=True, required=True, checks=checks, title=f.cn_name)
    return pa.DataFrameSchema(columns, strict=strict, name=dataset.code, ordered=False)


def rules_of(dataset: Dataset) -> dict[tuple[str, str], RuleInfo]:
    """(field, pandera check name) → rule info, to translate ``failure_cases`` into quarantine reasons."""
    out: dict[tuple[str, str], RuleInfo] = {}
    for f in dataset.fields:
        if f.required:
            r = rule_for_required(f)
            out[(f.name, r.rule)] = r
        if field_kind(f) != "string":
            r = rule_for_type(f)
            out[(f.name, r.rule)] = r
        fmt = rule_for_format(f)
        if fmt is not None:
            out[(f.name, fmt.rule)] = fmt
    return out


def column_problems(schema: pa.DataFrameSchema, columns: list[str]) -> tuple[list[str], list[str]]:
    """(missing, extra) columns of a delivered file against the contract, found by validating an empty frame."""
    frame = pd.DataFrame({c: pd.Series([], dtype="str") for c in columns})
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases
        missing = sorted(fc.loc[fc["check"] == "column_in_dataframe", "failure_case"].astype(str))
        extra = sorted(fc.loc[fc["check"] == "column_in_schema", "failure_case"].astype(str))
        return missing, extra
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    return [], dupes


def column_problem_reason(missing: list[str], extra: list[str], odd: Sequence[str] = ()) -> str:
    """A Chinese reason naming the missing and unregistered columns (one of each suggests a renamed column), and the
    names the warehouse cannot tell apart (``odd``: empty, repeated, equal to another but for case)."""
    parts = []
    if missing:
        parts.append("缺少登记字段 " + "、".join(missing))
    if extra:
        parts.append("含未登记字段 " + "、".join(extra))
    if odd:
        parts.append("列名为空、重复或仅大小写不同 (empty, repeated or case-only different names) " + "、".join(odd))
    hint = "（疑似字段改名）" if missing and extra else ""
    return "文件列与登记的数据集结构不一致：" + "；".join(parts) + hint + "，整个文件隔离"


def failing_rows(schema: pa.DataFrameSchema, frame: pd.DataFrame) -> pd.DataFrame:
    """Row-level contract failures of a batch: columns ``index, field, check, value`` (``frame`` has a RangeIndex)."""
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases
        fc = fc[fc["index"].notna() & (fc["schema_context"] == "Column")]
        return pd.DataFrame(
            {
                "index": fc["index"].astype("int64").to_numpy(),
                "field": fc["column"].astype(str).to_numpy(),
                "check": fc["check"].astype(str).to_numpy(),
                "value": fc["failure_case"].astype(str).to_numpy(),
            }
        )
    return pd.DataFrame({"index": pd.Series([], dtype="int64"), "field": [], "check": [], "value": []})
