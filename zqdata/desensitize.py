"""Desensitization rules (脱敏规则, Arts. 6, 24) as DuckDB SQL expressions, applied on the gov side of the boundary.

Each registry field has one mask rule: keep | pseudonymize (keyed HMAC-SHA256, GB/T 35273 §6.2) | mask (keep_first /
keep_last, ``*`` between) | age_band (age at the partition date, e.g. ``30-39``) | suppress (column not released).
HMAC runs inside DuckDB (built-in ``sha256`` over BLOBs with the RFC 2104 pads) so 10M rows/day stay vectorized;
``pseudonymize`` below is the Python reference it is proven equal to. The key comes only from ``ZQ_PSEUDONYM_KEY``
and is passed as a query parameter, never embedded in SQL text, a view, a table or a file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass

from zqdata.registry import Dataset, DatasetField, Registry, mask_rule_problems

KEY_ENV = "ZQ_PSEUDONYM_KEY"
_BLOCK = 64  # SHA-256 block size, RFC 2104


class DesensitizationError(ValueError):
    """A field cannot be released: no rule, an unknown method, or a rule its classification forbids."""


MIN_KEY_BYTES = 32  # HMAC-SHA256: a key shorter than the hash's output weakens it; a 1-byte key was brute-forced


@dataclass(frozen=True)
class PseudonymKey:
    """The HMAC key as its two RFC 2104 pads (the key itself is not kept); repr never shows it."""

    ipad: bytes
    opad: bytes

    def __repr__(self) -> str:
        return "PseudonymKey(<redacted>)"

    @classmethod
    def from_secret(cls, secret: bytes | str) -> "PseudonymKey":
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        if not raw:
            raise DesensitizationError(f"假名化密钥为空 (empty pseudonymization key): set {KEY_ENV}")
        if len(raw) < MIN_KEY_BYTES:
            raise DesensitizationError(
                f"假名化密钥 {KEY_ENV} 太短：{len(raw)} 字节，至少需要 {MIN_KEY_BYTES} 字节（短密钥可由假名反推）；"
                f"可用 `python -c \"import secrets; print(secrets.token_hex(32))\"` 生成 "
                f"(the pseudonymization key must be at least {MIN_KEY_BYTES} bytes)")
        if len(raw) > _BLOCK:
            raw = hashlib.sha256(raw).digest()
        raw = raw.ljust(_BLOCK, b"\0")
        return cls(ipad=bytes(b ^ 0x36 for b in raw), opad=bytes(b ^ 0x5C for b in raw))

    def params(self) -> dict[str, bytes]:
        """Named query parameters used by the pseudonymize expression."""
        return {"zq_ipad": self.ipad, "zq_opad": self.opad}


def key_from_env() -> PseudonymKey:
    """The pseudonymization key from ``ZQ_PSEUDONYM_KEY``; a clear error when it is absent."""
    secret = os.environ.get(KEY_ENV, "")
    if not secret:
        raise DesensitizationError(
            f"未设置假名化密钥环境变量 {KEY_ENV} (the pseudonymization key {KEY_ENV} is required; "
            "it is kept apart from the data, GB/T 35273 §6.2)"
        )
    return PseudonymKey.from_secret(secret)


def pseudonymize(value: str, secret: bytes | str) -> str:
    """Python reference: ``hmac.new(key, value, sha256).hexdigest()`` (the SQL expression must agree)."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(raw, value.encode("utf-8"), hashlib.sha256).hexdigest()


def quote_ident(name: str) -> str:
    """A DuckDB identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def mask_expression(dataset: Dataset, f: DatasetField, partition_date: dt.date, column_sql: str | None = None) -> str | None:
    """The SQL expression releasing field ``f`` (aliased to its name), or None when it is suppressed."""
    col = column_sql or quote_ident(f.name)
    rule = getattr(f, "mask", None)
    method = getattr(rule, "method", None)
    if method is None:
        raise DesensitizationError(f"{dataset.code}.{f.name}: 无脱敏规则，拒绝出域 (no mask rule: refused at the boundary)")
    problems = mask_rule_problems(dataset, f)
    if problems:
        raise DesensitizationError("; ".join(problems))
    if method == "suppress":
        return None
    if method == "keep":
        expr = col
    elif method == "pseudonymize":
        # HMAC-SHA256(K, m) = H((K ^ opad) || H((K ^ ipad) || m)); pads are bound parameters.
        expr = f"sha256($zq_opad || unhex(sha256($zq_ipad || encode(CAST({col} AS VARCHAR)))))"
    elif method == "mask":
        a, b = int(rule.keep_first or 0), int(rule.keep_last or 0)
        v = f"CAST({col} AS VARCHAR)"
        # A value no longer than what would be kept is masked whole, so nothing is ever shown in full.
        expr = (
            f"CASE WHEN {v} IS NULL THEN NULL WHEN length({v}) > {a + b} "
            f"THEN left({v}, {a}) || repeat('*', length({v}) - {a + b}) || right({v}, {b}) "
            f"ELSE repeat('*', length({v})) END"
        )
    elif method == "age_band":
        band = int(rule.band_years or 0)
        if band <= 0:
            raise DesensitizationError(f"{dataset.code}.{f.name}: age_band 需要 band_years (needs band_years > 0)")
        d = f"DATE '{partition_date.isoformat()}'"
        b = f"TRY_CAST({col} AS DATE)"
        age = (
            f"(year({d}) - year({b}) - CASE WHEN strftime({d}, '%m%d') < strftime({b}, '%m%d') THEN 1 ELSE 0 END)"
        )
        lo = f"(floor({age} / {band}) * {band})::INTEGER"
        expr = f"CASE WHEN {b} IS NULL OR {b} > {d} THEN NULL ELSE {lo}::VARCHAR || '-' || ({lo} + {band - 1})::VARCHAR END"
    else:
        raise DesensitizationError(
            f"{dataset.code}.{f.name}: 未知脱敏方法 {method!r}，拒绝出域 (unknown mask method: refused at the boundary)"
        )
    return f"{expr} AS {quote_ident(f.name)}"


def released_fields(dataset: Dataset) -> list[str]:
    """Names of the fields of ``dataset`` that leave the gov platform (every rule but suppress)."""
    return [f.name for f in dataset.fields if f.mask.method != "suppress"]


def release_select(dataset: Dataset, fields: list[str], partition_date: dt.date, table_alias: str = "src") -> list[str]:
    """SELECT items masking ``fields`` of ``dataset``; a suppressed field asked for by name is an error."""
    items = []
    for name in fields:
        f = dataset.field(name)
        expr = mask_expression(dataset, f, partition_date, f"{table_alias}.{quote_ident(name)}")
        if expr is None:
            raise DesensitizationError(f"{dataset.code}.{name}: 该字段规则为 suppress，不得出域 (suppressed field cannot be released)")
        items.append(expr)
    return items


# -- the classification table published in docs/security.md -------------------------------------------------------

DOC_BEGIN = "<!-- classification-table:begin (generated by zqdata.desensitize.classification_table) -->"
DOC_END = "<!-- classification-table:end -->"


def _rule_text(f: DatasetField) -> str:
    m = f.mask
    if m.method == "mask":
        return f"mask (keep_first={m.keep_first}, keep_last={m.keep_last})"
    if m.method == "age_band":
        return f"age_band ({m.band_years} 岁一档)"
    return m.method


def classification_table(registry: Registry) -> str:
    """Markdown table of every field's classification and mask rule, straight from the registry."""
    lines = ["| 数据集 dataset | 字段 field | 中文名 | 级别 level | 个人信息 pi | 开放 openness | 涉密 | 脱敏规则 rule | 出域 released |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ds in sorted(registry.datasets.values(), key=lambda d: d.code):
        for f in ds.fields:
            c = f.class_
            out = "否 (release: false)" if not ds.release else ("否 no" if f.mask.method == "suppress" else "是 yes")
            lines.append(f"| {ds.code} | {f.name} | {f.cn_name} | {c.level} | {c.pi} | {c.openness} | "
                         f"{'是' if c.confidential else '否'} | {_rule_text(f)} | {out} |")
    return "\n".join(lines)


def render_security_doc(text: str, registry: Registry) -> str:
    """``text`` with the block between the classification markers replaced by the current table."""
    start, end = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    return text[:start] + "\n" + classification_table(registry) + "\n" + text[end:]
