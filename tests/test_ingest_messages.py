"""Issue 12, findings 8 and 9: ingestion messages say what happened, and the severity policy (registry/quality_policy.yaml)
decides what is normalized and counted, nulled with a finding, or quarantined."""

from __future__ import annotations

import json

import pytest

from tests.test_ingest import deliver, deliveries, encode, findings, quarantine, records, run
from zqdata import ingest

PSB = "resident_population"  # JSON Lines, optional mobile `phone`
SI = "social_insurance"  # GBK CSV, required year_month `period`
ER = "enterprise_registry"  # CSV with date, timestamp and decimal fields


def _ods(con, code: str, cols: str) -> list[tuple]:
    return con.execute(f"select {cols} from ods.{code} order by _row_number").fetchall()


def _normalizations(con, code: str) -> list[tuple]:
    return con.execute("select field, policy_case, values_normalized, first_row_number from quality.normalizations "
                       "where dataset = ? order by field, policy_case", [code]).fetchall()


def test_invalid_year_month_is_a_standardization_finding_not_required_empty(gov_con, store, reg) -> None:
    ds = reg.datasets[SI]
    rows = records(ds, 2)
    rows[1]["period"] = "2025-13"
    deliver(store, reg, SI, [("part-0001.csv", encode(rows, "csv", "gbk"), 2)])
    run(gov_con, store, reg, SI)
    f = [x for x in findings(gov_con, SI) if x["row_number"] == 2]
    assert [(x["rule"], x["dimension"], x["severity"]) for x in f] == [
        ("contract.format.year_month", "standardization", "error")]
    assert "不是有效的年月" in f[0]["detail"] and "2025-13" in f[0]["detail"]
    assert "必填" not in f[0]["detail"] and "规范化" not in f[0]["detail"]
    q = quarantine(gov_con, SI)
    assert [(r["_row_number"], r["rule"]) for r in q] == [(2, "contract.format.year_month")]
    assert _normalizations(gov_con, SI) == []


def test_checksum_mismatch_message_shows_both_full_digests(gov_con, store, reg) -> None:
    ds = reg.datasets[ER]
    rows = records(ds, 3)
    deliver(store, reg, ER, [("part-0001.csv", encode(rows, "csv"), 3)])
    rows[0]["ent_name"] = "被篡改"
    store.put_bytes("samr/enterprise_registry/2025-05-01/part-0001.csv", encode(rows, "csv"))
    run(gov_con, store, reg, ER)
    d = deliveries(gov_con, ER)[0]
    (f,) = findings(gov_con, ER)
    for text in (f["detail"], d["error"]):
        assert d["manifest_sha256"] in text and d["actual_sha256"] in text and "…" not in text


def test_json_array_line_is_not_an_object_not_truncation(gov_con, store, reg) -> None:
    ds = reg.datasets[PSB]
    rows = records(ds, 2)
    data = encode(rows, "jsonl") + (json.dumps(list(rows[0].values()), ensure_ascii=False) + "\n").encode()
    deliver(store, reg, PSB, [("part-0001.jsonl", data, 3)])
    run(gov_con, store, reg, PSB)
    q = quarantine(gov_con, PSB)
    assert [(r["_row_number"], r["rule"]) for r in q] == [(3, "delivery.malformed_record")]
    assert "不是对象" in q[0]["reason"] and "截断" not in q[0]["reason"]
    rules = [x["rule"] for x in findings(gov_con, PSB)]
    assert "delivery.truncated_file" not in rules
    assert "截断" not in (deliveries(gov_con, PSB)[0]["error"] or "")


def test_file_level_findings_do_not_count_records(gov_con, store, reg) -> None:
    """A whole-file finding says what happened to the file; it never claims '1 条记录'."""
    ds = reg.datasets[ER]
    deliver(store, reg, ER, [("part-0001.csv", encode(records(ds, 3), "csv"), 5)])
    run(gov_con, store, reg, ER)
    (f,) = findings(gov_con, ER)
    assert f["row_number"] is None and "1 条记录" not in f["detail"]
    assert "清单记录数 5 与实际记录数 3 不一致" in f["detail"]


@pytest.mark.parametrize("case", ["checksum", "count", "manifest_missing", "unlisted"])
def test_delivery_status_is_the_worst_finding_severity(gov_con, store, reg, case) -> None:
    ds = reg.datasets[ER]
    rows = records(ds, 2)
    deliver(store, reg, ER, [("part-0001.csv", encode(rows, "csv"), 2 if case != "count" else 4)])
    if case == "checksum":
        store.put_bytes("samr/enterprise_registry/2025-05-01/part-0001.csv", encode(rows[:1] * 2, "csv"))
    elif case == "manifest_missing":
        store.delete_prefix("samr/enterprise_registry/2025-05-01/_manifest.json")
    elif case == "unlisted":
        store.put_bytes("samr/enterprise_registry/2025-05-01/part-0002.csv", encode(records(ds, 1, 9), "csv"))
    run(gov_con, store, reg, ER)
    worst = {"error": 2, "warn": 1}
    severities = [x["severity"] for x in findings(gov_con, ER) if x["row_number"] is None]
    expected = max(severities, key=worst.__getitem__)
    statuses = {d["file_name"]: d["status"] for d in deliveries(gov_con, ER)}
    if case == "unlisted":
        assert (expected, statuses) == ("warn", {"part-0001.csv": "ok", "part-0002.csv": "warn"})
    else:
        assert expected == "error" and statuses == {"part-0001.csv": "error"}


def test_accepted_forms_are_normalized_counted_and_file_nothing(gov_con, store, reg) -> None:
    ds = reg.datasets[ER]
    rows = records(ds, 3)
    rows[0]["reg_capital_wan"] = "1e3"
    rows[1]["established_date"] = "2025/06/10"
    rows[2]["established_date"] = "20250610"
    rows[2]["updated_at"] = "2025-05-01 08:00:00"
    deliver(store, reg, ER, [("part-0001.csv", encode(rows, "csv"), 3)])
    report = run(gov_con, store, reg, ER)
    assert report.status == "ok" and report.rows_accepted == 3
    assert _ods(gov_con, ER, "reg_capital_wan, established_date, updated_at") == [
        ("1000", "2025-05-01", "2025-05-01T08:00:00+08:00"),
        ("3.50", "2025-06-10", "2025-05-01T08:00:00+08:00"),
        ("3.50", "2025-06-10", "2025-05-01T08:00:00+08:00"),
    ]
    assert findings(gov_con, ER) == []  # quality.findings is what zqdata.issues files: nothing to file
    assert _normalizations(gov_con, ER) == [
        ("established_date", "accepted_form", 2, 2), ("reg_capital_wan", "accepted_form", 1, 1),
        ("updated_at", "accepted_form", 1, 3)]


def test_invalid_optional_phone_is_nulled_and_the_record_kept(gov_con, store, reg) -> None:
    ds = reg.datasets[PSB]
    rows = records(ds, 2)
    rows[1]["phone"] = "1234"
    deliver(store, reg, PSB, [("part-0001.jsonl", encode(rows, "jsonl"), 2)])
    report = run(gov_con, store, reg, PSB)
    assert (report.rows_accepted, report.rows_quarantined) == (2, 0) and quarantine(gov_con, PSB) == []
    assert _ods(gov_con, PSB, "phone, name") == [("13800138000", rows[0]["name"]), (None, rows[1]["name"])]
    (f,) = findings(gov_con, PSB)
    assert (f["rule"], f["dimension"], f["severity"], f["field"], f["row_number"]) == (
        "contract.format.mobile", "accuracy", reg.quality_policy.case("invalid_optional").severity, "phone", 2)
    assert "已置空、记录保留" in f["detail"]
    catalog = gov_con.execute("select severity from quality.rule_catalog where dataset = ? and rule = ?",
                              [PSB, "contract.format.mobile"]).fetchall()
    assert catalog == [("warn",)]


def test_whitespace_padded_text_is_trimmed_and_recorded(gov_con, store, reg) -> None:
    ds = reg.datasets[PSB]
    rows = records(ds, 2)
    rows[0]["name"] = "  张三  "
    deliver(store, reg, PSB, [("part-0001.jsonl", encode(rows, "jsonl"), 2)])
    run(gov_con, store, reg, PSB)
    assert _ods(gov_con, PSB, "name")[0] == ("张三",)
    assert findings(gov_con, PSB) == []
    assert _normalizations(gov_con, PSB) == [("name", "whitespace", 1, 1)]
    detail = gov_con.execute("select detail from quality.normalizations where dataset = ?", [PSB]).fetchone()[0]
    assert "张三" not in detail  # counted, no value kept


def test_policy_is_in_the_registry_and_rendered(reg) -> None:
    from zqdata.landing import render_landing_docs

    policy = reg.quality_policy
    assert {c.case: (c.action, c.severity) for c in policy.cases} == {
        "accepted_form": ("normalize", "none"), "whitespace": ("trim", "none"),
        "invalid_optional": ("null_value", "warn"), "invalid_required": ("quarantine_record", "error")}
    doc = render_landing_docs(reg)
    assert "## 处置策略 Severity policy" in doc and "`1e3`" in doc and "`20250501`" in doc
    assert ingest.NORMALIZATION_COLUMNS[0][0] == "partition_date"
