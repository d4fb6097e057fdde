"""Ingestion: delivery → ODS + quarantine + meta.deliveries + findings, with row accounting and idempotent reruns."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zqdata import contracts, ingest, landing
from zqdata.ingest import LINEAGE_COLUMNS, ingest_delivery, row_accounting
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ

DAY = dt.date(2025, 5, 1)
NOW = dt.datetime(2025, 5, 2, 12, 0, tzinfo=TZ)
# Values in the standard spelling (another accepted spelling is normalized and counted: tests/test_ingest_messages.py)
SAMPLE = {"integer": "12", "decimal": "3.50", "date": "2025-05-01", "timestamp": "2025-05-01T08:00:00+08:00",
          "year_month": "2025-04", "mobile": "13800138000"}


def records(ds: Dataset, n: int, start: int = 0) -> list[dict[str, str]]:
    """n records whose values satisfy the contract (value-level rules are not the contract's business)."""
    return [{f.name: SAMPLE.get(contracts.field_kind(f), SAMPLE.get(f.format or "", f"{f.name}-{start + i}"))
             for f in ds.fields} for i in range(n)]


def encode(rows: list[dict[str, str]], fmt: str, encoding: str = "utf-8") -> bytes:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().encode(encoding)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def deliver(store, reg: Registry, code: str, files: list[tuple[str, bytes, int]], day: dt.date = DAY, fmt: str | None = None):
    ds = reg.datasets[code]
    fmt = fmt or ds.delivery.format
    return landing.write_delivery(
        store, ds.agency, code, day, [(name, data, fmt, ds.delivery.encoding, n) for name, data, n in files],
        dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), TZ),
        dt.datetime.combine(day + dt.timedelta(days=1), dt.time(2), TZ),
    )  # fmt: skip


def run(con, store, reg, code, day=DAY, now=NOW):
    return ingest_delivery(con, store, reg, code, day, now=now)


def deliveries(con, code, day=DAY) -> list[dict]:
    cur = con.execute("select * from meta.deliveries where dataset = ? and partition_date = ? order by delivery_file", [code, day])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def quarantine(con, code, day=DAY) -> list[dict]:
    cur = con.execute(
        "select _row_number, _delivery_file, reason, rule, dimension, field, raw_record from quarantine.rows "
        "where _dataset = ? and _partition_date = ? order by _delivery_file, _row_number", [code, day])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def findings(con, code, day=DAY) -> list[dict]:
    cur = con.execute("select * from quality.findings where dataset = ? and partition_date = ? order by rule, row_number",
                      [code, day])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def assert_accounting(con, code, day=DAY) -> dict[str, int]:
    """(c) rows delivered = rows in ODS + rows in quarantine, per file and in total."""
    for d in deliveries(con, code, day):
        assert d["rows_delivered"] == d["rows_accepted"] + d["rows_quarantined"], d
    acc = row_accounting(con, code, day)
    assert acc["rows_delivered"] == acc["rows_in_ods"] + acc["rows_in_quarantine"]
    assert acc["rows_accepted"] == acc["rows_in_ods"] and acc["rows_quarantined"] == acc["rows_in_quarantine"]
    return acc


# ------------------------------------------------------------------------------------------ good deliveries


@pytest.mark.parametrize("code", ["enterprise_registry", "social_insurance", "resident_population", "bus_card_swipes"])
def test_clean_delivery_lands_in_ods_with_lineage(gov_con, store, reg, code) -> None:
    ds = reg.datasets[code]
    rows = records(ds, 5)
    rows[1][ds.fields[0].name] = "值 with, comma and 中文"
    deliver(store, reg, code, [("part-0001." + ds.delivery.format, encode(rows, ds.delivery.format, ds.delivery.encoding), 5)])
    report = run(gov_con, store, reg, code)
    assert report.status == "ok", report.errors
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (5, 5, 0)
    # (a) every lineage column non-null on every row
    nulls = " or ".join(f"{c} is null" for c, _ in LINEAGE_COLUMNS)
    assert gov_con.execute(f"select count(*) from ods.{code} where {nulls}").fetchone()[0] == 0
    got = gov_con.execute(f"select {', '.join(ds.field_names)}, _lineage_id, _row_number, _delivery_file from ods.{code} "
                          "order by _row_number").fetchall()
    assert [dict(zip(ds.field_names, r[: len(ds.field_names)], strict=True)) for r in got] == rows  # values as delivered
    key = landing.delivery_prefix(ds.agency, code, DAY) + "part-0001." + ds.delivery.format
    assert [r[-3:] for r in got] == [(f"{code}/2025-05-01/part-0001.{ds.delivery.format}#{i}", i, key) for i in range(1, 6)]
    assert assert_accounting(gov_con, code)["rows_in_ods"] == 5
    d = deliveries(gov_con, code)[0]
    assert d["status"] == "ok" and d["error"] is None and d["actual_sha256"] == d["manifest_sha256"]
    assert d["delivered_at"] == dt.datetime(2025, 5, 2, 2, tzinfo=TZ)
    assert findings(gov_con, code) == []


def test_date_and_number_variants_accepted_and_normalized(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 4)
    for r, d, t in zip(rows, ["2025/05/01", "20250501", "2025-5-1", "2025-05-01"],
                       ["2025/05/01 08:00", "2025-05-01T08:00:00+08:00", "20250501080000", "2025-05-01 08:00:00"], strict=True):
        r["established_date"], r["updated_at"] = d, t
    rows[0]["reg_capital_wan"] = "1e3"
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 4)])
    run(gov_con, store, reg, "enterprise_registry")
    got = gov_con.execute("select established_date, updated_at, reg_capital_wan from ods.enterprise_registry "
                          "order by _row_number").fetchall()
    # every accepted spelling is stored in the standard one (registry quality_policy: accepted_form), no finding
    assert got == [("2025-05-01", "2025-05-01T08:00:00+08:00", "1000")] + [("2025-05-01", "2025-05-01T08:00:00+08:00",
                                                                         "3.50")] * 3
    assert findings(gov_con, "enterprise_registry") == []


def test_bom_and_gbk_csv_are_detected(gov_con, store, reg) -> None:
    ds = reg.datasets["social_insurance"]  # registered as GBK
    rows = records(ds, 3)
    rows[0][ds.fields[0].name] = "肇庆市端州区"
    gbk = encode(rows, "csv", "gbk")
    bom = b"\xef\xbb\xbf" + encode(rows[1:], "csv", "utf-8")
    deliver(store, reg, "social_insurance", [("part-0001.csv", gbk, 3), ("part-0002.csv", bom, 2)])
    report = run(gov_con, store, reg, "social_insurance")
    assert report.rows_accepted == 5
    assert gov_con.execute(f"select {ds.fields[0].name} from ods.social_insurance where _row_number = 1 "
                           "order by _delivery_file").fetchone()[0] == "肇庆市端州区"
    enc = {d["file_name"]: d["encoding"] for d in deliveries(gov_con, "social_insurance")}
    assert enc == {"part-0001.csv": "gbk", "part-0002.csv": "utf-8-sig"}
    # BOM-UTF-8 where GBK is declared: accepted, with a warning about the encoding
    assert [f["rule"] for f in findings(gov_con, "social_insurance")] == ["delivery.encoding_mismatch"]


def test_rerun_is_identical_and_has_no_duplicate_lineage(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 6)
    rows[2]["established_date"] = "not a date"
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 6)])

    def snapshot() -> tuple:
        ods = gov_con.execute("select * exclude (_ingested_at) from ods.enterprise_registry order by _lineage_id").fetchall()
        q = gov_con.execute("select * exclude (_ingested_at) from quarantine.rows order by _lineage_id").fetchall()
        m = gov_con.execute("select * exclude (ingested_at) from meta.deliveries order by delivery_file").fetchall()
        f = gov_con.execute("select * from quality.findings order by rule, row_number").fetchall()
        return ods, q, m, f

    run(gov_con, store, reg, "enterprise_registry")
    first = snapshot()
    run(gov_con, store, reg, "enterprise_registry")
    assert snapshot() == first  # (d)
    assert len(first[0]) == 5 and len(first[1]) == 1
    dup = gov_con.execute("select count(*) - count(distinct _lineage_id) from (select _lineage_id from ods.enterprise_registry "
                          "union all select _lineage_id from quarantine.rows)").fetchone()[0]
    assert dup == 0


def test_failure_midway_rolls_back_everything(gov_con, store, reg, monkeypatch) -> None:
    ds = reg.datasets["enterprise_registry"]
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(records(ds, 3), "csv"), 3)])
    run(gov_con, store, reg, "enterprise_registry")
    before = gov_con.execute("select count(*) from ods.enterprise_registry").fetchone()[0]
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(records(ds, 7), "csv"), 7)])

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ingest, "_register_rules", boom)  # fails after every insert of the run
    with pytest.raises(RuntimeError):
        run(gov_con, store, reg, "enterprise_registry")
    assert gov_con.execute("select count(*) from ods.enterprise_registry").fetchone()[0] == before == 3
    assert deliveries(gov_con, "enterprise_registry")[0]["rows_delivered"] == 3


def test_s3_backend_gives_the_same_tables_as_local(gov_con, store, s3_store, reg, tmp_path) -> None:
    """(e) the S3 backend (moto) passes the same ingestion as the local backend."""
    outputs = []
    for st, name in ((store, "local"), (s3_store, "s3")):
        for code in ("enterprise_registry", "resident_population", "bus_card_swipes"):
            ds = reg.datasets[code]
            rows = records(ds, 4)
            rows[3][ds.fields[-1].name] = ""  # a required field empty → quarantined
            deliver(st, reg, code, [("part-0001." + ds.delivery.format, encode(rows, ds.delivery.format), 4)])
        con = duckdb.connect(str(tmp_path / f"{name}.duckdb"))
        for code in ("enterprise_registry", "resident_population", "bus_card_swipes"):
            report = run(con, st, reg, code)
            assert (report.rows_accepted, report.rows_quarantined) == (3, 1)
            assert_accounting(con, code)
        outputs.append((
            con.execute("select * exclude (_ingested_at) from ods.bus_card_swipes order by _lineage_id").fetchall(),
            con.execute("select * exclude (_ingested_at) from quarantine.rows order by _lineage_id").fetchall(),
            con.execute("select * exclude (ingested_at, delivered_at, arrived_at) from meta.deliveries order by delivery_file").fetchall(),
        ))  # fmt: skip
        con.close()
    assert outputs[0] == outputs[1]


# ------------------------------------------------------------------------------------------ bad deliveries


def test_undecodable_encoding_quarantines_whole_file(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 3)
    for r in rows:
        r["ent_name"] = "@@"
    # most lines neither UTF-8 nor GBK (one such line only quarantines its record: test_ingest_encoding.py)
    data = encode(rows, "csv").replace(b"@@", b"\xff\xfe\xfa") + b"\xff\xfe\xfa,\x80\x81\n"
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", data, 4)])
    run(gov_con, store, reg, "enterprise_registry")
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["status"] == "quarantined" and "既不是有效的 UTF-8 也不是 GBK" in d["error"]
    q = quarantine(gov_con, "enterprise_registry")
    assert len(q) == 4 and all("文件编码无法识别" in r["reason"] for r in q)
    assert all(r["rule"] in ("delivery.encoding_undecodable",) for r in q[:3])
    assert json.loads(q[0]["raw_record"])["ent_name"] == "\\xff\\xfe\\xfa"  # escaped: nothing undecodable in DuckDB
    assert assert_accounting(gov_con, "enterprise_registry") == {**row_accounting(gov_con, "enterprise_registry", DAY),
                                                                 "rows_in_ods": 0}
    assert "delivery.encoding_undecodable" in {f["rule"] for f in findings(gov_con, "enterprise_registry")}


def test_truncated_csv_keeps_good_rows_and_quarantines_the_cut_record(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    full = encode(records(ds, 4), "csv")
    cut = full[: full.rfind(b",", 0, len(full) - 1)]  # cut mid-row: last record loses its last field(s)
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", full, 4)])
    store.put_bytes(landing.delivery_prefix("samr", "enterprise_registry", DAY) + "part-0001.csv", cut)
    run(gov_con, store, reg, "enterprise_registry")
    q = quarantine(gov_con, "enterprise_registry")
    assert [(r["_row_number"], r["rule"]) for r in q] == [(4, "delivery.malformed_record")]
    assert "表头为" in q[0]["reason"] and "_raw_text" in json.loads(q[0]["raw_record"])
    rules = {f["rule"] for f in findings(gov_con, "enterprise_registry")}
    assert {"delivery.truncated_file", "delivery.checksum_mismatch", "delivery.malformed_record"} <= rules
    assert assert_accounting(gov_con, "enterprise_registry")["rows_in_ods"] == 3


def test_invalid_parquet_is_an_error_with_zero_rows(gov_con, store, reg) -> None:
    ds = reg.datasets["bus_card_swipes"]
    full = encode(records(ds, 5), "parquet")
    deliver(store, reg, "bus_card_swipes", [("part-0001.parquet", full[: len(full) // 2], 5)])
    run(gov_con, store, reg, "bus_card_swipes")
    d = deliveries(gov_con, "bus_card_swipes")[0]
    assert d["status"] == "error" and "Parquet 文件无法读取" in d["error"] and "清单记录数 5 与实际记录数 0 不一致" in d["error"]
    assert d["rows_delivered"] == 0
    assert assert_accounting(gov_con, "bus_card_swipes")["rows_delivered"] == 0


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ("missing", "缺少登记字段 updated_at"),
        ("extra", "含未登记字段 remark"),
        ("renamed", "疑似字段改名"),
    ],
)
def test_column_set_problems_quarantine_whole_file(gov_con, store, reg, change, expect) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 3)
    for r in rows:
        if change == "missing":
            del r["updated_at"]
        elif change == "extra":
            r["remark"] = "备注"
        else:
            r["update_time"] = r.pop("updated_at")
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 3)])
    run(gov_con, store, reg, "enterprise_registry")
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["status"] == "quarantined" and expect in d["error"]
    q = quarantine(gov_con, "enterprise_registry")
    assert len(q) == 3 and all(expect in r["reason"] and r["rule"] == "contract.column_set" for r in q)
    if change == "extra":
        assert json.loads(q[0]["raw_record"])["remark"] == "备注"  # nothing silently dropped
    f = [f for f in findings(gov_con, "enterprise_registry") if f["rule"] == "contract.column_set"]
    assert len(f) == 1 and f[0]["tool"] == "pandera" and f[0]["dimension"] == "understandability"
    assert assert_accounting(gov_con, "enterprise_registry")["rows_in_ods"] == 0


def test_jsonl_unregistered_key_quarantines_file(gov_con, store, reg) -> None:
    ds = reg.datasets["resident_population"]
    rows = records(ds, 3)
    rows[2]["nickname"] = "x"
    deliver(store, reg, "resident_population", [("part-0001.jsonl", encode(rows, "jsonl"), 3)])
    run(gov_con, store, reg, "resident_population")
    assert deliveries(gov_con, "resident_population")[0]["status"] == "quarantined"
    assert assert_accounting(gov_con, "resident_population")["rows_in_quarantine"] == 3


def test_wrong_types_and_empty_required_go_to_quarantine_with_specific_reasons(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 6)
    rows[1]["reg_capital_wan"] = "一百万"
    rows[2]["established_date"] = "2025-02-30"
    rows[3]["updated_at"] = "2025-05-01 25:00"
    rows[4]["ent_name"] = "  "
    rows[5]["reg_capital_wan"], rows[5]["established_date"] = "１２", "05/01/2025"
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 6)])
    report = run(gov_con, store, reg, "enterprise_registry")
    assert (report.rows_accepted, report.rows_quarantined) == (1, 5)
    q = {r["_row_number"]: r for r in quarantine(gov_con, "enterprise_registry")}
    assert q[2]["reason"] == "字段「注册资本（万元）」(reg_capital_wan) 的值无法解析为数值：'一百万'"
    assert (q[2]["rule"], q[2]["dimension"], q[2]["field"]) == ("contract.type.decimal", "standardization", "reg_capital_wan")
    assert q[3]["rule"] == "contract.type.date" and "'2025-02-30'" in q[3]["reason"]
    assert q[4]["rule"] == "contract.type.timestamp"
    assert (q[5]["rule"], q[5]["dimension"], q[5]["reason"]) == (
        "contract.required", "completeness", "必填字段「企业名称」(ent_name) 为空")
    assert "reg_capital_wan" in q[6]["reason"] and "established_date" in q[6]["reason"]
    assert json.loads(q[2]["raw_record"])["reg_capital_wan"] == "一百万"
    f = [(x["row_number"], x["rule"], x["tool"], x["lineage_id"]) for x in findings(gov_con, "enterprise_registry")]
    assert (6, "contract.type.decimal", "pandera", "enterprise_registry/2025-05-01/part-0001.csv#6") in f
    assert len(f) == 6  # one finding per (rule, record): row 6 fails two rules
    assert assert_accounting(gov_con, "enterprise_registry")["rows_in_ods"] == 1


def test_empty_file(gov_con, store, reg) -> None:
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", b"", 0)])
    run(gov_con, store, reg, "enterprise_registry")
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["status"] == "error" and "空文件" in d["error"] and d["rows_delivered"] == 0
    assert [f["rule"] for f in findings(gov_con, "enterprise_registry")] == ["delivery.empty_file"]
    assert_accounting(gov_con, "enterprise_registry")


def test_same_file_twice_in_partition_keeps_the_first(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    data = encode(records(ds, 3), "csv")
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", data, 3), ("part-0002.csv", data, 3)])
    run(gov_con, store, reg, "enterprise_registry")
    by_file = {d["file_name"]: d for d in deliveries(gov_con, "enterprise_registry")}
    assert by_file["part-0001.csv"]["rows_accepted"] == 3
    assert by_file["part-0002.csv"]["status"] == "duplicate" and by_file["part-0002.csv"]["rows_quarantined"] == 3
    q = quarantine(gov_con, "enterprise_registry")
    assert len(q) == 3 and all(r["reason"].startswith("重复交付") and r["_delivery_file"].endswith("part-0002.csv") for r in q)
    assert assert_accounting(gov_con, "enterprise_registry")["rows_in_ods"] == 3


def test_same_file_as_an_earlier_partition_is_a_duplicate(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    data = encode(records(ds, 2), "csv")
    day2 = DAY + dt.timedelta(days=1)
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", data, 2)])
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", data, 2)], day=day2)
    run(gov_con, store, reg, "enterprise_registry", now=NOW + dt.timedelta(days=1))
    run(gov_con, store, reg, "enterprise_registry", day=day2, now=NOW + dt.timedelta(days=1))
    assert deliveries(gov_con, "enterprise_registry")[0]["status"] == "ok"
    d2 = deliveries(gov_con, "enterprise_registry", day2)[0]
    assert d2["status"] == "duplicate" and "samr/enterprise_registry/2025-05-01/part-0001.csv" in d2["error"]
    assert all(r["reason"].startswith("重复交付") for r in quarantine(gov_con, "enterprise_registry", day2))
    assert assert_accounting(gov_con, "enterprise_registry", day2)["rows_in_quarantine"] == 2


def test_manifest_count_mismatch(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(records(ds, 3), "csv"), 5)])
    run(gov_con, store, reg, "enterprise_registry")
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["status"] == "error" and (d["manifest_record_count"], d["actual_record_count"]) == (5, 3)
    assert "清单记录数 5 与实际记录数 3 不一致" in d["error"]
    f = findings(gov_con, "enterprise_registry")
    assert [(x["rule"], x["severity"], x["dimension"]) for x in f] == [("delivery.record_count_mismatch", "error", "completeness")]
    assert assert_accounting(gov_con, "enterprise_registry")["rows_in_ods"] == 3


def test_manifest_checksum_mismatch(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    rows = records(ds, 3)
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 3)])
    rows[0]["ent_name"] = "被篡改"
    store.put_bytes("samr/enterprise_registry/2025-05-01/part-0001.csv", encode(rows, "csv"))
    run(gov_con, store, reg, "enterprise_registry")
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["status"] == "error" and "清单 sha256 与文件实际摘要不一致" in d["error"]
    assert d["manifest_sha256"] != d["actual_sha256"]
    assert [x["rule"] for x in findings(gov_con, "enterprise_registry")] == ["delivery.checksum_mismatch"]
    assert_accounting(gov_con, "enterprise_registry")


def test_manifest_missing(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(records(ds, 2), "csv"), 2)])
    store.delete_prefix("samr/enterprise_registry/2025-05-01/_manifest.json")
    report = run(gov_con, store, reg, "enterprise_registry")
    assert report.status == "warn" and report.rows_accepted == 2
    d = deliveries(gov_con, "enterprise_registry")[0]
    assert d["manifest_present"] is False and "缺少清单" in d["error"]
    assert [x["rule"] for x in findings(gov_con, "enterprise_registry")] == ["delivery.manifest_missing"]


def test_future_partition_is_rejected(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    future = NOW.date() + dt.timedelta(days=1)
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(records(ds, 2), "csv"), 2)], day=future)
    report = run(gov_con, store, reg, "enterprise_registry", day=future)
    assert report.status == "rejected" and report.rows_delivered == 0
    d = deliveries(gov_con, "enterprise_registry", future)[0]
    assert d["status"] == "rejected" and "晚于当前日期" in d["error"]
    assert [x["rule"] for x in findings(gov_con, "enterprise_registry", future)] == ["delivery.future_partition"]
    assert_accounting(gov_con, "enterprise_registry", future)
    assert gov_con.execute("select count(*) from ods.enterprise_registry").fetchone()[0] == 0


def test_absent_delivery_is_recorded_missing(gov_con, store, reg) -> None:
    report = run(gov_con, store, reg, "water_usage")
    assert report.status == "missing"
    d = deliveries(gov_con, "water_usage")
    assert len(d) == 1 and d[0]["status"] == "missing" and d[0]["delivery_file"] is None and d[0]["rows_delivered"] == 0


def test_jsonl_missing_key_vs_null_value(gov_con, store, reg) -> None:
    ds = reg.datasets["resident_population"]
    optional = next(f.name for f in ds.fields if not f.required)
    with_null = [{**r, optional: None} for r in records(ds, 2)]
    without = [{k: v for k, v in r.items() if k != optional} for r in records(ds, 2)]
    deliver(store, reg, "resident_population", [("part-0001.jsonl", encode(with_null, "jsonl"), 2),
                                                ("part-0002.jsonl", encode(without, "jsonl"), 2)])
    run(gov_con, store, reg, "resident_population")
    status = {d["file_name"]: d["status"] for d in deliveries(gov_con, "resident_population")}
    assert status == {"part-0001.jsonl": "ok", "part-0002.jsonl": "quarantined"}
    assert assert_accounting(gov_con, "resident_population")["rows_in_ods"] == 2


def test_jsonl_numbers_and_broken_line(gov_con, store, reg) -> None:
    ds = reg.datasets["resident_population"]
    rows = records(ds, 3)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[0] = lines[0].replace(f'"{ds.fields[0].name}": "{rows[0][ds.fields[0].name]}"', f'"{ds.fields[0].name}": 42')
    data = ("\n".join(lines) + "\n" + lines[2][:20]).encode()  # last line cut
    deliver(store, reg, "resident_population", [("part-0001.jsonl", data, 4)])
    run(gov_con, store, reg, "resident_population")
    assert gov_con.execute(f"select {ds.fields[0].name} from ods.resident_population where _row_number = 1").fetchone()[0] == "42"
    q = quarantine(gov_con, "resident_population")
    assert [(r["_row_number"], r["rule"]) for r in q] == [(4, "delivery.malformed_record")] and "JSON 行无法解析" in q[0]["reason"]
    assert "delivery.truncated_file" in {f["rule"] for f in findings(gov_con, "resident_population")}
    assert assert_accounting(gov_con, "resident_population")["rows_in_ods"] == 3


def _ods_materialize(data_dir, store, selection: list[str], day: dt.date = DAY, last: dt.date | None = None):
    import dagster as dg

    from assets.gov_platform.ods import ods_defs, ods_key
    from orchestration.ranges import range_tags
    from orchestration.resources import ObjectStoreResource, WarehouseResource

    gov_db = data_dir / "warehouse" / "gov.duckdb"
    when = {"tags": range_tags(day, last)} if last else {"partition_key": day.isoformat()}
    return dg.materialize(
        list(ods_defs().assets), selection=[ods_key(c) for c in selection], raise_on_error=False,
        resources={"store": ObjectStoreResource(local_root=str(store.root)), "warehouse": WarehouseResource(gov_db=str(gov_db))},
        **when)


def _materialized(result) -> dict[str, list[str | None]]:
    out: dict[str, list] = {}
    for e in result.get_asset_materialization_events():
        m = e.event_specific_data.materialization
        out.setdefault(m.asset_key.path[-1], []).append(m.partition)
    return {k: sorted(v) for k, v in out.items()}


def test_the_ods_step_ingests_the_selected_datasets_with_their_row_accounting(data_dir, store, reg) -> None:
    """Embedded, ONE step ingests every dataset (bench/notes.md 19): each selected dataset gets its materialization
    with its own metadata and its own row-accounting check; a dataset not selected is not touched."""
    from assets.gov_platform.ods import ODS_STEP, ROW_ACCOUNTING_CHECK, ods_defs

    assert [a.node_def.name for a in ods_defs().assets] == [ODS_STEP]
    assert {k.path[-1] for a in ods_defs().assets for k in a.keys} == {f"ods_{c}" for c in reg.datasets}
    rows = records(reg.datasets["enterprise_registry"], 4)
    rows[0]["reg_capital_wan"] = "abc"
    deliver(store, reg, "enterprise_registry", [("part-0001.csv", encode(rows, "csv"), 4)])
    deliver(store, reg, "water_usage", [("part-0001.csv", encode(records(reg.datasets["water_usage"], 2), "csv"), 2)])
    result = _ods_materialize(data_dir, store, ["enterprise_registry", "water_usage"])
    assert result.success
    mats = {e.event_specific_data.materialization.asset_key.path[-1]: e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert {k: (m["rows_accepted"].value, m["rows_quarantined"].value) for k, m in mats.items()} == {
        "ods_enterprise_registry": (3, 1), "ods_water_usage": (2, 0)}
    checks = result.get_asset_check_evaluations()
    assert sorted((c.asset_key.path[-1], c.check_name, c.passed) for c in checks) == [
        ("ods_enterprise_registry", ROW_ACCOUNTING_CHECK, True), ("ods_water_usage", ROW_ACCOUNTING_CHECK, True)]
    with duckdb.connect(str(data_dir / "warehouse" / "gov.duckdb"), read_only=True) as con:
        assert {d for (d,) in con.execute("select distinct dataset from meta.deliveries").fetchall()} == {
            "enterprise_registry", "water_usage"}


def test_a_refused_delivery_stops_its_own_dataset_and_the_step_fails_naming_it(data_dir, store, reg,
                                                                               monkeypatch) -> None:
    """One agency's refused delivery (`rejected`) stops its own dataset, from that day: the other datasets of the step
    are ingested and recorded on every day, the refused one has no materialization (in a range run, not even for the
    days before it was refused: the output would record the whole range), and the step fails naming it and its day."""
    import assets.gov_platform.ods as ods

    refused_on = DAY + dt.timedelta(days=1)
    real = ods.ingest_delivery

    def refusing(con, store_, reg_, code, day, **kw):
        report = real(con, store_, reg_, code, day, **kw)
        if code == "water_usage" and day >= refused_on:
            report.status, report.files = "rejected", [ingest.FileReport(None, None, None, "rejected", ["拒绝交付"])]
        return report

    monkeypatch.setattr(ods, "ingest_delivery", refusing)
    for day in (DAY, refused_on, refused_on + dt.timedelta(days=1)):
        for code in ("enterprise_registry", "water_usage"):
            deliver(store, reg, code, [("part-0001.csv", encode(records(reg.datasets[code], 2), "csv"), 2)], day=day)
    single = _ods_materialize(data_dir, store, ["enterprise_registry", "water_usage"], day=refused_on)
    assert not single.success
    assert _materialized(single) == {"ods_enterprise_registry": [refused_on.isoformat()]}
    [failure] = single.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == "water_usage: -: 拒绝交付"

    ranged = _ods_materialize(data_dir, store, ["enterprise_registry", "water_usage"], DAY,
                              refused_on + dt.timedelta(days=1))
    assert not ranged.success
    days = [(DAY + dt.timedelta(days=i)).isoformat() for i in range(3)]
    assert _materialized(ranged) == {"ods_enterprise_registry": days}
    [failure] = ranged.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == f"water_usage: {refused_on}: -: 拒绝交付"
    evaluated = {(c.asset_key.path[-1], c.partition) for c in ranged.get_asset_check_evaluations()}
    assert evaluated == {("ods_enterprise_registry", d) for d in days} | {("ods_water_usage", DAY.isoformat())}


def test_on_the_lakes_each_dataset_is_ingested_by_its_own_step(reg, monkeypatch) -> None:
    """Embedded, one step ingests every dataset (one writer per file anyway); on the lakes (several writers) each
    dataset keeps its own step, so the workers ingest the datasets side by side (issue 16)."""
    from assets.gov_platform.ods import ODS_STEP, ods_defs, ods_key
    from zqdata.lakes import MODE_ENV

    monkeypatch.setenv(MODE_ENV, "ducklake")
    steps = {a.node_def.name: set(a.keys) for a in ods_defs().assets}
    assert ODS_STEP not in steps and len(steps) == len(reg.datasets)
    assert sorted(steps.values(), key=str) == sorted(({ods_key(c)} for c in reg.datasets), key=str)
    monkeypatch.setenv(MODE_ENV, "duckdb")
    assert {a.node_def.name for a in ods_defs().assets} == {ODS_STEP}
