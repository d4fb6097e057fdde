"""Encoding at the ingestion boundary, for every format (issue 12, findings 1 and 2).

A BOM is allowed by the landing contract and never decides the encoding by itself; an undecodable byte sequence
quarantines the one record holding it (reason: field and byte offset), never the whole file when the rest decodes;
nothing undecodable reaches a DuckDB table. The files are built here byte by byte (not by the simulator).
"""

from __future__ import annotations

import datetime as dt
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import DAY, assert_accounting, deliveries, encode, findings, quarantine, records, run

from zqdata import landing
from zqdata.registry import Registry
from zqdata.settings import TZ

BOM = b"\xef\xbb\xbf"


def deliver_as(store, reg: Registry, code: str, name: str, data: bytes, n: int, encoding: str | None = None) -> None:
    """One file delivered with the manifest declaring ``encoding`` (default: the registered one)."""
    ds = reg.datasets[code]
    landing.write_delivery(
        store, ds.agency, code, DAY, [(name, data, ds.delivery.format, encoding or ds.delivery.encoding, n)],
        dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(1), TZ),
        dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(2), TZ),
    )  # fmt: skip


def ods_values(con, code: str, fields: list[str]) -> list[dict]:
    got = con.execute(f"select {', '.join(fields)} from ods.{code} order by _row_number").fetchall()
    return [dict(zip(fields, r, strict=True)) for r in got]


def assert_duckdb_text_is_valid(con, code: str, fields: list[str]) -> None:
    """String functions over every ODS and quarantine value: raises (or invalidates the DB) on invalid UTF-8."""
    exprs = ", ".join(f"max(upper({f}))" for f in fields)
    con.execute(f"select {exprs} from ods.{code}").fetchall()
    con.execute("select max(upper(raw_record)), max(upper(reason)) from quarantine.rows").fetchall()
    con.execute("select max(upper(detail)) from quality.findings").fetchall()


def no_error_level_findings(con, code: str) -> bool:
    """No error-severity dataset-level finding: what would hold the dataset back at the quality gate."""
    return not [f for f in findings(con, code) if f["severity"] == "error" and f["row_number"] is None]


# ------------------------------------------------------------------------------------------ BOM (finding 1)


@pytest.mark.parametrize("declared", ["gbk", "utf-8"])
def test_gbk_with_bom_is_accepted_as_gbk(gov_con, store, reg, declared) -> None:
    ds = reg.datasets["social_insurance"]  # registered GBK
    rows = records(ds, 3)
    for i, r in enumerate(rows):
        r["record_id"] = f"肇庆市端州区缴费{i}"
    data = BOM + encode(rows, "csv", "gbk")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8-sig")  # the content after the BOM really is GBK
    deliver_as(store, reg, "social_insurance", "part-0001.csv", data, 3, declared)
    report = run(gov_con, store, reg, "social_insurance")
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (3, 3, 0), report.errors
    assert ods_values(gov_con, "social_insurance", ds.field_names) == rows  # the BOM is not part of the first value
    d = deliveries(gov_con, "social_insurance")[0]
    assert d["encoding"] == "gbk" and d["declared_encoding"] == declared and d["status"] == "warn"
    # The UTF-8 signature on GBK content is said in one warning (with the declaration when that differs too), the
    # content decoded as GBK; nothing holds the gate.
    f = findings(gov_con, "social_insurance")
    assert [(x["rule"], x["severity"]) for x in f] == [("delivery.encoding_mismatch", "warn")]
    assert "BOM" in f[0]["detail"] and "GBK" in f[0]["detail"]
    assert ("不一致" in f[0]["detail"]) == (declared != "gbk")
    assert no_error_level_findings(gov_con, "social_insurance")
    assert assert_accounting(gov_con, "social_insurance")["rows_in_ods"] == 3


def test_ascii_content_with_a_bom_declared_gbk_is_not_called_utf8(gov_con, store, reg) -> None:
    """ASCII after a BOM is the same bytes in GBK: the warning is the BOM's, not a claimed utf-8-sig encoding."""
    ds = reg.datasets["social_insurance"]  # registered GBK
    rows = records(ds, 3)
    data = BOM + encode(rows, "csv", "gbk")
    data[3:].decode("ascii")  # the content is pure ASCII
    deliver_as(store, reg, "social_insurance", "part-0001.csv", data, 3, "gbk")
    report = run(gov_con, store, reg, "social_insurance")
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (3, 3, 0), report.errors
    f = findings(gov_con, "social_insurance")
    assert [(x["rule"], x["severity"]) for x in f] == [("delivery.encoding_mismatch", "warn")]
    assert "BOM" in f[0]["detail"] and "与声明一致" in f[0]["detail"] and "utf-8-sig" not in f[0]["detail"]


@pytest.mark.parametrize("declared", ["utf-8", "UTF-8"])
def test_utf8_with_bom_declared_utf8_is_ok(gov_con, store, reg, declared) -> None:
    ds = reg.datasets["enterprise_registry"]  # registered UTF-8
    rows = records(ds, 3)
    rows[0][ds.field_names[0]] = "肇庆市星湖"  # the first field of the first record follows the BOM directly
    deliver_as(store, reg, "enterprise_registry", "part-0001.csv", BOM + encode(rows, "csv"), 3, declared)
    report = run(gov_con, store, reg, "enterprise_registry")
    assert report.status == "ok" and report.rows_accepted == 3, report.errors
    assert ods_values(gov_con, "enterprise_registry", ds.field_names) == rows
    assert deliveries(gov_con, "enterprise_registry")[0]["encoding"] == "utf-8-sig"
    assert findings(gov_con, "enterprise_registry") == []


# ------------------------------------------------------------------------------------------ CSV: one bad record


@pytest.mark.parametrize(
    ("code", "encoding", "field", "prefix", "bad"),
    [
        ("enterprise_registry", "utf-8", "ent_name", "肇庆星湖", b"\xff"),  # invalid UTF-8 start byte
        ("enterprise_registry", "utf-8", "legal_rep_name", "张三", b"\xe4\xb8"),  # truncated 3-byte sequence
        ("social_insurance", "gbk", "record_id", "缴费记录", b"\xff"),  # not a GBK byte
        ("social_insurance", "gbk", "record_id", "缴费", b"\x80"),  # not a GBK lead byte
    ],
)
def test_csv_record_with_undecodable_bytes_quarantines_only_that_record(
    gov_con, store, reg, code, encoding, field, prefix, bad
) -> None:
    ds = reg.datasets[code]
    rows = records(ds, 4)
    for r in rows:
        r[field] = "中文" + r[field]  # non-ASCII everywhere: the encoding is evident from the other records
    rows[2][field] = prefix + "@@BAD@@尾"
    data = encode(rows, "csv", encoding).replace(b"@@BAD@@", bad)
    deliver_as(store, reg, code, "part-0001.csv", data, 4)
    report = run(gov_con, store, reg, code)
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (4, 3, 1), report.errors
    q = quarantine(gov_con, code)
    assert len(q) == 1 and q[0]["_row_number"] == 3
    assert (q[0]["rule"], q[0]["field"], q[0]["dimension"]) == ("delivery.encoding_undecodable", field, "standardization")
    offset = len(prefix.encode(encoding))
    assert f"({field})" in q[0]["reason"] and f"字节偏移 {offset}" in q[0]["reason"], q[0]["reason"]
    assert f"0x{bad.hex().upper()}" in q[0]["reason"]
    raw = json.loads(q[0]["raw_record"])  # the record as delivered, the bad bytes escaped
    assert raw[field] == prefix + "".join(f"\\x{b:02x}" for b in bad) + "尾"
    assert [r[field] for r in ods_values(gov_con, code, [field])] == [rows[i][field] for i in (0, 1, 3)]
    d = deliveries(gov_con, code)[0]
    assert d["status"] != "quarantined" and d["encoding"] == encoding
    f = [x for x in findings(gov_con, code) if x["rule"] == "delivery.encoding_undecodable"]
    assert [(x["row_number"], x["field"], x["severity"]) for x in f] == [(3, field, "error")]  # record-level
    assert no_error_level_findings(gov_con, code)
    assert_accounting(gov_con, code)
    assert_duckdb_text_is_valid(gov_con, code, ds.field_names)


def test_csv_malformed_and_undecodable_line_is_one_quarantined_record(gov_con, store, reg) -> None:
    ds = reg.datasets["enterprise_registry"]
    data = encode(records(ds, 3), "csv") + b"\xff\xfe\xfa,\x80\x81\n"  # wrong field count and neither UTF-8 nor GBK
    deliver_as(store, reg, "enterprise_registry", "part-0001.csv", data, 4)
    report = run(gov_con, store, reg, "enterprise_registry")
    assert (report.rows_accepted, report.rows_quarantined) == (3, 1)
    q = quarantine(gov_con, "enterprise_registry")
    assert [(r["_row_number"], r["rule"]) for r in q] == [(4, "delivery.malformed_record")]
    assert "表头为" in q[0]["reason"] and "0xFF" in q[0]["reason"]
    assert json.loads(q[0]["raw_record"])["_raw_text"] == "\\xff\\xfe\\xfa,\\x80\\x81"
    assert_accounting(gov_con, "enterprise_registry")
    assert_duckdb_text_is_valid(gov_con, "enterprise_registry", ds.field_names)


# ------------------------------------------------------------------------------------------ JSONL (finding 2)


def test_jsonl_line_with_invalid_utf8_is_quarantined_and_duckdb_stays_usable(gov_con, store, reg) -> None:
    ds = reg.datasets["resident_population"]
    rows = records(ds, 4)
    rows[1]["name"] = "李@@BAD@@四"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    offset = lines[1].index(b"@@BAD@@")  # byte offset of the invalid byte within its line
    data = b"".join(ln + b"\n" for ln in lines).replace(b"@@BAD@@", b"\xff")
    deliver_as(store, reg, "resident_population", "part-0001.jsonl", data, 4)
    report = run(gov_con, store, reg, "resident_population")
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (4, 3, 1), report.errors
    q = quarantine(gov_con, "resident_population")
    assert [(r["_row_number"], r["rule"], r["field"]) for r in q] == [(2, "delivery.encoding_undecodable", "name")]
    assert "(name)" in q[0]["reason"] and f"字节偏移 {offset}" in q[0]["reason"] and "0xFF" in q[0]["reason"]
    assert "李\\xff四" in json.loads(q[0]["raw_record"])["_raw_text"]
    assert [r["name"] for r in ods_values(gov_con, "resident_population", ["name"])] == [rows[i]["name"] for i in (0, 2, 3)]
    # the reported failure: every later query over the ODS table died with a FATAL invalid code point error
    assert len(gov_con.execute("select upper(name) from ods.resident_population").fetchall()) == 3
    assert_duckdb_text_is_valid(gov_con, "resident_population", ds.field_names)
    assert no_error_level_findings(gov_con, "resident_population")
    assert_accounting(gov_con, "resident_population")


def test_jsonl_lone_surrogate_escape_is_quarantined(gov_con, store, reg) -> None:
    """``"\\udcff"`` is valid UTF-8 text but no Unicode character: it must not become invalid bytes in DuckDB either."""
    ds = reg.datasets["resident_population"]
    rows = records(ds, 3)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[2] = lines[2].replace(f'"address": "{rows[2]["address"]}"', '"address": "\\udcff"')
    deliver_as(store, reg, "resident_population", "part-0001.jsonl", ("\n".join(lines) + "\n").encode(), 3)
    report = run(gov_con, store, reg, "resident_population")
    assert (report.rows_accepted, report.rows_quarantined) == (2, 1), report.errors
    q = quarantine(gov_con, "resident_population")
    assert [(r["_row_number"], r["rule"], r["field"]) for r in q] == [(3, "delivery.encoding_undecodable", "address")]
    assert_duckdb_text_is_valid(gov_con, "resident_population", ds.field_names)
    assert_accounting(gov_con, "resident_population")


# ------------------------------------------------------------------------------------------ Parquet


@pytest.mark.parametrize("arrow_type", ["string", "binary", "large_string"])
def test_parquet_invalid_utf8_value_quarantines_the_row(gov_con, store, reg, arrow_type) -> None:
    ds = reg.datasets["bus_card_swipes"]
    rows = records(ds, 4)
    cols = {f: pa.array([r[f] for r in rows], pa.string()) for f in ds.field_names}
    values = [r["stop_id"].encode() for r in rows]
    values[1] = "站点".encode() + b"\xc3\x28"  # 0xC3 then a non-continuation byte
    raw = pa.array(values, pa.binary())
    cols["stop_id"] = {"string": raw.view(pa.string()), "binary": raw,
                       "large_string": raw.cast(pa.large_binary()).view(pa.large_string())}[arrow_type]
    out = io.BytesIO()
    pq.write_table(pa.table(cols), out)
    deliver_as(store, reg, "bus_card_swipes", "part-0001.parquet", out.getvalue(), 4)
    report = run(gov_con, store, reg, "bus_card_swipes")
    assert (report.rows_delivered, report.rows_accepted, report.rows_quarantined) == (4, 3, 1), report.errors
    q = quarantine(gov_con, "bus_card_swipes")
    assert [(r["_row_number"], r["rule"], r["field"]) for r in q] == [(2, "delivery.encoding_undecodable", "stop_id")]
    assert "(stop_id)" in q[0]["reason"] and "字节偏移 6" in q[0]["reason"] and "0xC3" in q[0]["reason"]
    assert json.loads(q[0]["raw_record"])["stop_id"] == "站点\\xc3("
    assert json.loads(q[0]["raw_record"])["swipe_id"] == rows[1]["swipe_id"]
    assert [r["stop_id"] for r in ods_values(gov_con, "bus_card_swipes", ["stop_id"])] == [rows[i]["stop_id"] for i in (0, 2, 3)]
    assert_duckdb_text_is_valid(gov_con, "bus_card_swipes", ds.field_names)
    assert no_error_level_findings(gov_con, "bus_card_swipes")
    assert_accounting(gov_con, "bus_card_swipes")


# ------------------------------------------------------------------------------------------ the vectorized check


def test_invalid_utf8_rows_finds_every_bad_value_and_only_those() -> None:
    from zqdata.ingest import invalid_utf8_rows

    values = [b"ok", None, b"\xe4\xb8", b"\xad", b"", "中文".encode(), b"a\xffb", b"\xed\xb3\xbf", b"\xf0\x9f\x98\x80", b"z\x80"]
    # b"\xe4\xb8" + b"\xad" would be valid together ("中"): the check must hold per value, not over the buffer
    arr = pa.array(values, pa.binary())
    got = invalid_utf8_rows(arr)
    assert {i: (off, bad) for i, off, bad in got} == {2: (0, b"\xe4\xb8"), 3: (0, b"\xad"), 6: (1, b"\xff"),
                                                       7: (0, b"\xed"), 9: (1, b"\x80")}
    assert invalid_utf8_rows(arr.slice(4, 2)) == []  # offsets of a sliced array
    assert invalid_utf8_rows(arr.slice(5, 3)) == [(1, 1, b"\xff"), (2, 0, b"\xed")]
    assert invalid_utf8_rows(pa.array(["中文"] * 5, pa.string())) == []
    assert invalid_utf8_rows(pa.array([1, 2], pa.int64())) == []  # not text: nothing to check
    chunked = pa.chunked_array([pa.array([b"a", b"b\xff"], pa.binary()), pa.array([b"\x80", None], pa.binary())])
    assert invalid_utf8_rows(chunked) == [(1, 1, b"\xff"), (2, 0, b"\x80")]
    dictionary = pa.DictionaryArray.from_arrays(pa.array([0, 1, None, 1, 0], pa.int32()),
                                                pa.array([b"ok", b"x\xfe"], pa.binary()).view(pa.string()))
    assert invalid_utf8_rows(dictionary) == [(1, 1, b"\xfe"), (3, 1, b"\xfe")]
    assert invalid_utf8_rows(pa.array([b"\xff" * 3, b"ok"], pa.large_binary())) == [(0, 0, b"\xff")]


def test_invalid_utf8_rows_agrees_with_a_per_value_decode() -> None:
    """Random values built from fragments that are valid only together: the vectorized check equals decoding each."""
    import random

    from zqdata.ingest import invalid_utf8_rows

    rnd = random.Random(12)
    fragments = [b"a", b"\xe4\xb8", b"\xad", "肇".encode(), b"\xf0\x9f", b"\x98\x80", b"\xc3", b"\xa9", b"\xff", b"", b"\xed\xa0\x80"]
    for _ in range(200):
        values = [None if rnd.random() < 0.1 else b"".join(rnd.choices(fragments, k=rnd.randint(0, 3))) for _ in range(30)]
        arr = pa.array(values, pa.binary())
        start = rnd.randint(0, 10)
        part = arr.slice(start, rnd.randint(0, 20))

        def bad(v: bytes) -> bool:
            try:
                v.decode("utf-8")
                return False
            except UnicodeDecodeError:
                return True

        expected = [i for i, v in enumerate(part.to_pylist()) if v is not None and bad(v)]
        assert [i for i, _off, _seq in invalid_utf8_rows(part)] == expected, part.to_pylist()
