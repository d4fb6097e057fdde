"""Desensitization rules (脱敏规则, Arts. 6, 24) as DuckDB SQL expressions, applied on the gov side of the boundary.

Each registry field has one mask rule: keep | pseudonymize (keyed HMAC-SHA256, GB/T 35273 §6.2) | mask (keep_first /
keep_last, ``*`` between) | age_band (age at the partition date, e.g. ``30-39``) | suppress (column not released).
HMAC runs inside DuckDB (built-in ``sha256`` over BLOBs with the RFC 2104 pads) so 10M rows/day stay vectorized;
``pseudonymize`` below is the Python reference it is proven equal to. The key comes only from ``ZQ_PSEUDONYM_KEY``
and is passed as a query parameter, never embedded in SQL text, a view, a table or a file.

Domain separation (issue 11, finding 6): a field is never pseudonymized with the master key but with a key derived
per (identifier role, scope): ``HMAC-SHA256(master, "zq-pseudonym/v1|" + role + "|" + scope)``. The scope is the ops
schema written (``desensitized`` or ``scenario_<code>``); the role is ``<dataset>.<field>`` unless the registry gives
the field a ``link_role``. So the same person has unrelated pseudonyms as a resident and as a legal representative,
and in each scenario, unless the registry declares the link (the same ``link_role``, and then only within one scope).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass

from zqdata.registry import Dataset, DatasetField, Registry, mask_rule_problems
from zqdata.settings import MIN_SECRET_BYTES, secret_bytes

KEY_ENV = "ZQ_PSEUDONYM_KEY"
_BLOCK = 64  # SHA-256 block size, RFC 2104


class DesensitizationError(ValueError):
    """A field cannot be released: no rule, an unknown method, or a rule its classification forbids."""


MIN_KEY_BYTES = MIN_SECRET_BYTES
DOMAIN_LABEL = "zq-pseudonym/v1"  # version of the derivation: a new scheme gets a new label, never a silent change
KEY_ID_LABEL = "zq-key-id"
DESENSITIZED_SCOPE = "desensitized"


def scenario_scope(code: str) -> str:
    """The pseudonym scope of a scenario's tables: their ops schema ``scenario_<code>``."""
    return f"scenario_{code}"


def domain_label(role: str, scope: str) -> bytes:
    """The HKDF-style info string of one pseudonym domain; ``role`` has no ``|`` so the split is unambiguous."""
    if not role or "|" in role or not scope:
        raise DesensitizationError(f"假名化域无效 (invalid pseudonym domain): role={role!r}, scope={scope!r}")
    return f"{DOMAIN_LABEL}|{role}|{scope}".encode("utf-8")


@dataclass(frozen=True)
class PseudonymKey:
    """The HMAC key as its two RFC 2104 pads (the key itself is not kept); repr never shows it."""

    ipad: bytes
    opad: bytes

    def __repr__(self) -> str:
        return "PseudonymKey(<redacted>)"

    @classmethod
    def from_secret(cls, secret: bytes | str) -> "PseudonymKey":
        raw = secret_bytes(secret, env=KEY_ENV, what_cn="假名化密钥", what_en="pseudonymization key",
                           error=DesensitizationError, why="（短密钥可由假名反推）")
        if len(raw) > _BLOCK:
            raw = hashlib.sha256(raw).digest()
        raw = raw.ljust(_BLOCK, b"\0")
        return cls(ipad=bytes(b ^ 0x36 for b in raw), opad=bytes(b ^ 0x5C for b in raw))

    def params(self, ipad: str = "zq_ipad", opad: str = "zq_opad") -> dict[str, bytes]:
        """Named query parameters used by the pseudonymize expression (default names ``$zq_ipad`` / ``$zq_opad``)."""
        return {ipad: self.ipad, opad: self.opad}

    def _hmac(self, message: bytes) -> bytes:
        """HMAC-SHA256(key, message) from the pads (RFC 2104), equal to ``hmac.new(key, message, sha256).digest()``."""
        return hashlib.sha256(self.opad + hashlib.sha256(self.ipad + message).digest()).digest()

    def for_domain(self, role: str, scope: str) -> "PseudonymKey":
        """The key of one pseudonym domain: HMAC-SHA256(this key, "zq-pseudonym/v1|<role>|<scope>") (32 bytes)."""
        return PseudonymKey.from_secret(self._hmac(domain_label(role, scope)))

    def key_id(self) -> str:
        """A public fingerprint of the master key (8 hex of HMAC(key, "zq-key-id")): tells which key made a partition's
        pseudonyms, e.g. across a rotation, without revealing the key."""
        return self._hmac(KEY_ID_LABEL.encode("utf-8")).hex()[:8]


def key_from_env() -> PseudonymKey:
    """The pseudonymization key from ``ZQ_PSEUDONYM_KEY``; a clear error when it is absent."""
    secret = os.environ.get(KEY_ENV, "")
    if not secret:
        raise DesensitizationError(
            f"未设置假名化密钥环境变量 {KEY_ENV} (the pseudonymization key {KEY_ENV} is required; "
            "it is kept apart from the data, GB/T 35273 §6.2)"
        )
    return PseudonymKey.from_secret(secret)


def domain_secret(secret: bytes | str, role: str, scope: str) -> bytes:
    """Python reference of a domain key: ``hmac.new(master, "zq-pseudonym/v1|<role>|<scope>", sha256).digest()``."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(raw, domain_label(role, scope), hashlib.sha256).digest()


def pseudonymize(value: str, secret: bytes | str, *, role: str | None = None, scope: str | None = None) -> str:
    """Python reference: ``hmac.new(key, value, sha256).hexdigest()`` (the SQL expression must agree).

    With ``role`` and ``scope`` the key is that domain's key derived from ``secret`` (what the boundary releases);
    without them, ``secret`` itself (the bare HMAC primitive)."""
    if (role is None) != (scope is None):
        raise DesensitizationError("pseudonymize: give both role and scope, or neither")
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if role is not None:
        raw = domain_secret(raw, role, scope)
    return hmac.new(raw, value.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonym_role(dataset: Dataset, f: DatasetField) -> str:
    """The identifier role of a pseudonymized field: its registry ``link_role``, else ``<dataset>.<field>``."""
    return getattr(f, "link_role", None) or f"{dataset.code}.{f.name}"


def quote_ident(name: str) -> str:
    """A DuckDB identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def mask_expression(dataset: Dataset, f: DatasetField, partition_date: dt.date, column_sql: str | None = None,
                    pads: tuple[str, str] = ("zq_ipad", "zq_opad")) -> str | None:
    """The SQL expression releasing field ``f`` (aliased to its name), or None when it is suppressed.

    A pseudonymize rule reads the key's pads from the named parameters ``pads`` (ipad, opad); ``release_select``
    binds there the field's domain key."""
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
        ipad, opad = pads
        expr = f"sha256(${opad} || unhex(sha256(${ipad} || encode(CAST({col} AS VARCHAR)))))"
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


def release_select(dataset: Dataset, fields: list[str], partition_date: dt.date, key: PseudonymKey, scope: str,
                   table_alias: str = "src") -> tuple[list[str], dict[str, bytes]]:
    """SELECT items masking ``fields`` of ``dataset`` for the ops schema ``scope``, and the query parameters they use.

    Each pseudonymized field gets its own domain key (``key.for_domain(pseudonym_role(...), scope)``) bound as
    ``$zq_ipad_<i>`` / ``$zq_opad_<i>``; a suppressed field asked for by name is an error."""
    items: list[str] = []
    params: dict[str, bytes] = {}
    for i, name in enumerate(fields):
        f = dataset.field(name)
        pads = (f"zq_ipad_{i}", f"zq_opad_{i}")
        expr = mask_expression(dataset, f, partition_date, f"{table_alias}.{quote_ident(name)}", pads)
        if expr is None:
            raise DesensitizationError(f"{dataset.code}.{name}: 该字段规则为 suppress，不得出域 (suppressed field cannot be released)")
        if f.mask.method == "pseudonymize":
            params.update(key.for_domain(pseudonym_role(dataset, f), scope).params(*pads))
        items.append(expr)
    return items, params


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
