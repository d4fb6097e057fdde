"""Deliveries whose shape the readers accept but the warehouse cannot name or serialize as delivered (found in review):
each ends in quarantine with its reason, or is ingested, never in a library error that blocks the dataset's day.
rows delivered = accepted + quarantined holds for each."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import DAY, deliver, encode, records, run

from zqdata.ingest import row_accounting

CSV, JSONL, PARQUET = "enterprise_registry", "resident_population", "bus_card_swipes"


def _ingest(con, store, reg, code: str, name: str, data: bytes, rows: int):
    deliver(store, reg, code, [(name, data, rows)])
    report = run(con, store, reg, code)
    acc = row_accounting(con, code, DAY)
    assert acc["rows_delivered"] == rows
    assert acc["rows_delivered"] == acc["rows_accepted"] + acc["rows_quarantined"]
    assert (acc["rows_accepted"], acc["rows_quarantined"]) == (acc["rows_in_ods"], acc["rows_in_quarantine"])
    [file] = report.files
    return file, acc


def _csv(reg, extra_header: list[str], extra_value: list[str], newline: str = "\n") -> bytes:
    rows = records(reg.datasets[CSV], 3)
    header = list(rows[0])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header + extra_header)
    for r in rows:
        writer.writerow([r[c] for c in header] + extra_value)
    return buf.getvalue().encode()


def _quarantined_for_columns(con, file, acc, *named: str) -> None:
    assert file.status == "quarantined", (file.status, file.errors)
    assert acc["rows_accepted"] == 0
    detail = " ".join(file.errors)
    assert "文件列与登记的数据集结构不一致" in detail and all(n in detail for n in named), detail
    raws = [json.loads(r[0]) for r in con.execute("SELECT raw_record FROM quarantine.rows").fetchall()]
    assert raws and all(isinstance(r, dict) for r in raws)


@pytest.mark.parametrize("header, value, named", [
    ([""], [""], "空列名"),  # a trailing comma in the header
    (["credit_code"], ["dup"], "credit_code"),  # a column twice
    (["CREDIT_CODE"], ["x"], "CREDIT_CODE"),  # a registered column's name in other case (DuckDB ignores case)
], ids=["empty", "repeated", "case"])
def test_a_csv_with_a_column_name_the_warehouse_cannot_tell_apart_is_quarantined(gov_con, store, reg, header, value,
                                                                                named):
    file, acc = _ingest(gov_con, store, reg, CSV, "part-0001.csv", _csv(reg, header, value), 3)
    _quarantined_for_columns(gov_con, file, acc, named)


@pytest.mark.parametrize("key", ["", "NAME"], ids=["empty", "case"])
def test_a_jsonl_key_the_warehouse_cannot_tell_apart_is_quarantined(gov_con, store, reg, key):
    rows = records(reg.datasets[JSONL], 2)
    for r in rows:
        r[key] = "x"
    file, acc = _ingest(gov_con, store, reg, JSONL, "part-0001.jsonl", encode(rows, "jsonl"), 2)
    _quarantined_for_columns(gov_con, file, acc, key or "空列名")


def test_a_parquet_file_with_a_column_twice_is_quarantined(gov_con, store, reg):
    table = pa.Table.from_pylist(records(reg.datasets[PARQUET], 2))
    table = table.append_column(table.column_names[0], table.column(0))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    file, acc = _ingest(gov_con, store, reg, PARQUET, "part-0001.parquet", buf.getvalue(), 2)
    _quarantined_for_columns(gov_con, file, acc, table.column_names[0])


def test_a_csv_with_carriage_returns_only_is_read(gov_con, store, reg):
    file, acc = _ingest(gov_con, store, reg, CSV, "part-0001.csv", _csv(reg, [], [], newline="\r"), 3)
    assert file.status == "ok", file.errors
    assert acc["rows_accepted"] == 3


@pytest.mark.parametrize("values", [
    pa.array([[dt.date(2025, 1, 1)], None], pa.list_(pa.date32())),
    pa.array([{"t": dt.datetime(2025, 1, 1, 8, 30)}, None], pa.struct([("t", pa.timestamp("us"))])),
    pa.array([[b"ab"], []], pa.list_(pa.binary())),
], ids=["list_of_dates", "struct_with_timestamp", "list_of_bytes"])
def test_a_parquet_column_of_nested_values_json_cannot_hold_is_kept_as_text(gov_con, store, reg, values):
    table = pa.Table.from_pylist(records(reg.datasets[PARQUET], 2)).append_column("extra", values)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    file, acc = _ingest(gov_con, store, reg, PARQUET, "part-0001.parquet", buf.getvalue(), 2)
    _quarantined_for_columns(gov_con, file, acc, "extra")  # an unregistered column: the whole file
    raw = json.loads(gov_con.execute("SELECT raw_record FROM quarantine.rows ORDER BY _row_number").fetchone()[0])
    assert raw["extra"] is not None


def test_a_jsonl_file_without_a_registered_key_is_quarantined_even_when_the_name_is_some_value(gov_con, store, reg):
    """The key's presence was a byte search for `"case_flag"`: a value spelled like the key hid its absence."""
    rows = records(reg.datasets[JSONL], 2)
    for r in rows:
        del r["case_flag"]
    rows[0]["address"] = "case_flag"
    file, acc = _ingest(gov_con, store, reg, JSONL, "part-0001.jsonl", encode(rows, "jsonl"), 2)
    _quarantined_for_columns(gov_con, file, acc, "case_flag")


def test_a_jsonl_key_written_escaped_is_the_key(gov_con, store, reg):
    """`"\\u0063itizen_id"` is valid JSON for `citizen_id`: its values were dropped (the byte search missed the key)
    and the file quarantined as missing the column."""
    rows = records(reg.datasets[JSONL], 2)
    data = encode(rows, "jsonl").replace(b'"citizen_id"', b'"\\u0063itizen_id"')
    file, acc = _ingest(gov_con, store, reg, JSONL, "part-0001.jsonl", data, 2)
    assert file.status == "ok" and acc["rows_accepted"] == 2, file.errors
    assert sorted(r[0] for r in gov_con.execute(f"SELECT citizen_id FROM ods.{JSONL}").fetchall()) == sorted(
        r["citizen_id"] for r in rows)
