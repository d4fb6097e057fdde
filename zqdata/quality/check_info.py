"""What a quality check says of itself in the Dagster UI: its description, its Art. 20 dimension, the rule's severity,
the agency whose data it checks, and for each evaluation records checked / failed and the pass rate (issue 14).

One source for every tool's checks (dbt tests, GX suites, the gate): the rule's `meta` (dimension, severity, rule) as
the dbt project and the registry declare it. The UI's severity follows the rule's severity: a failed error rule shows
ERROR even where the check does not block the step (row-level rules hold back only their rows, via the gate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zqdata.quality.dimensions import DIMENSION_KEYS, dimension

SEVERITY_CN = {"error": "错误级", "warn": "警告级"}


def rule_meta(node: Mapping[str, Any]) -> dict[str, str]:
    """{dimension, severity, rule} of a dbt test node (config.meta overrides meta); empty when untagged."""
    meta = {**(node.get("meta") or {}), **((node.get("config") or {}).get("meta") or {})}
    if meta.get("dimension") not in DIMENSION_KEYS:
        return {}
    return {"dimension": str(meta["dimension"]), "severity": str(meta.get("severity", "error")),
            "rule": str(meta.get("rule") or node.get("name", ""))}


def rule_wording(rule: str) -> str:
    from zqdata.quality.dbt_findings import RULE_TEXT

    kind, _, target = rule.partition(":")
    text = RULE_TEXT.get(kind)
    return f"{text}（{target}）" if text and target else (text or rule)


def check_description(meta: Mapping[str, str], agency: str | None = None, extra: str | None = None) -> str:
    """'<rule in Chinese> — 准确性 Accuracy（Art. 20）；错误级 error；数源机构 psb' (+ the test's own description)."""
    if not meta:
        return extra or ""
    dim = dimension(meta["dimension"])
    parts = [f"{rule_wording(meta['rule'])} — {dim.cn_name} {dim.en_name}（第二十条 Art. 20）",
             f"{SEVERITY_CN.get(meta['severity'], meta['severity'])} {meta['severity']}"]
    if agency:
        parts.append(f"数源机构 agency {agency}")
    return "；".join(parts) + (f"。{extra}" if extra else "")


def check_spec_metadata(meta: Mapping[str, str], agency: str | None = None) -> dict[str, str]:
    """Static metadata of a check's definition: the rule, its dimension and severity, the agency."""
    if not meta:
        return {}
    out = {"rule": meta["rule"], "dimension": meta["dimension"], "dimension_cn": dimension(meta["dimension"]).cn_name,
           "rule_severity": meta["severity"]}
    if agency:
        out["agency"] = agency
    return out


def evaluation_metadata(meta: Mapping[str, str], agency: str | None, records_checked: int | None,
                        records_failed: int | None) -> dict[str, Any]:
    """Metadata entries of one evaluation: the static ones plus records checked / failed and the pass rate."""
    out: dict[str, Any] = dict(check_spec_metadata(meta, agency))
    if records_checked is not None:
        out["records_checked"] = int(records_checked)
    if records_failed is not None:
        out["records_failed"] = int(records_failed)
    if records_checked is not None and records_failed is not None:
        out["pass_rate"] = 1.0 if records_checked == 0 else max(0.0, 1 - records_failed / records_checked)
    return out
