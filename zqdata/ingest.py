"""Delivery → ODS + quarantine in the gov DuckDB, atomically per (dataset, partition).

Every delivered record ends up either in ``ods.<dataset>`` (values exactly as delivered, as text) or in
``quarantine.rows`` with a specific Chinese reason; ``meta.deliveries`` accounts for each file and
``quality.findings`` receives the contract ('pandera') and delivery-level ('delivery') findings.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from zqdata import contracts
from zqdata.landing import Manifest, ManifestFile, delivery_prefix, list_delivery_files, read_manifest
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ
from zqdata.storage import ObjectInfo, ObjectStore
from zqdata.txn import rollback_keeping_cause

BATCH_ROWS = 200_000
LINEAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("_lineage_id", "VARCHAR"),
    ("_agency", "VARCHAR"),
    ("_dataset", "VARCHAR"),
    ("_delivery_file", "VARCHAR"),
    ("_row_number", "INTEGER"),
    ("_batch_id", "VARCHAR"),
    ("_ingested_at", "TIMESTAMPTZ"),
    ("_partition_date", "DATE"),
)
DELIVERY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("partition_date", "DATE"),
    ("agency", "VARCHAR"),
    ("dataset", "VARCHAR"),
    ("delivery_file", "VARCHAR"),  # landing key; NULL for a missing delivery
    ("file_name", "VARCHAR"),
    ("format", "VARCHAR"),
    ("encoding", "VARCHAR"),  # detected (CSV) or declared
    ("declared_encoding", "VARCHAR"),
    ("manifest_present", "BOOLEAN"),
    ("manifest_record_count", "BIGINT"),
    ("actual_record_count", "BIGINT"),
    ("manifest_sha256", "VARCHAR"),
    ("actual_sha256", "VARCHAR"),
    ("size_bytes", "BIGINT"),
    ("rows_delivered", "BIGINT"),
    ("rows_accepted", "BIGINT"),
    ("rows_quarantined", "BIGINT"),
    ("extracted_at", "TIMESTAMPTZ"),
    ("delivered_at", "TIMESTAMPTZ"),
    ("batch_id", "VARCHAR"),
    ("status", "VARCHAR"),  # ok | warn | quarantined | duplicate | error | missing | rejected
    ("error", "VARCHAR"),
    ("ingested_at", "TIMESTAMPTZ"),
)
FINDING_COLUMNS = (
    "partition_date", "agency", "dataset", "tool", "rule", "dimension", "severity",
    "delivery_file", "row_number", "lineage_id", "field", "detail",
)  # fmt: skip
# Delivery-level rules: rule → (dimension, severity). Listed once so findings and the rule catalog agree.
DELIVERY_RULES: dict[str, tuple[str, str]] = {
    "delivery.manifest_missing": ("completeness", "error"),
    "delivery.manifest_invalid": ("understandability", "error"),
    "delivery.record_count_mismatch": ("completeness", "error"),
    "delivery.checksum_mismatch": ("accuracy", "error"),
    "delivery.file_missing": ("completeness", "error"),
    "delivery.unlisted_file": ("completeness", "warn"),
    "delivery.empty_file": ("completeness", "error"),
    "delivery.unreadable_file": ("completeness", "error"),
    "delivery.truncated_file": ("completeness", "error"),
    "delivery.malformed_record": ("completeness", "error"),
    "delivery.encoding_undecodable": ("standardization", "error"),
    "delivery.encoding_mismatch": ("standardization", "warn"),
    "delivery.duplicate_file": ("consistency", "error"),
    "delivery.future_partition": ("timeliness", "error"),
}
DUPLICATE_REASON = "重复交付"


class FileUnreadable(Exception):
    """The file cannot be read (any further); the message is the Chinese reason."""


@dataclass
class FileReport:
    key: str | None
    name: str | None
    format: str | None
    status: str = "ok"
    errors: list[str] = field(default_factory=list)
    rows_delivered: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0

    @property
    def error(self) -> str | None:
        return "；".join(self.errors) or None


@dataclass
class IngestReport:
    dataset: str
    agency: str
    partition_date: dt.date
    status: str  # ok | warn | missing | rejected
    files: list[FileReport] = field(default_factory=list)
    findings: int = 0

    @property
    def rows_delivered(self) -> int:
        return sum(f.rows_delivered for f in self.files)

    @property
    def rows_accepted(self) -> int:
        return sum(f.rows_accepted for f in self.files)

    @property
    def rows_quarantined(self) -> int:
        return sum(f.rows_quarantined for f in self.files)

    @property
    def errors(self) -> list[str]:
        return [f"{f.name or '-'}: {f.error}" for f in self.files if f.error]


# --------------------------------------------------------------------------------------------- tables


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ensure_gov_tables(con: duckdb.DuckDBPyConnection, dataset: Dataset) -> None:
    """Create the ODS table of ``dataset``, ``quarantine.rows``, ``meta.deliveries`` and the quality tables if absent."""
    from zqdata.quality.scores import ensure_quality_tables  # the quality engineer owns that DDL

    for schema in ("ods", "quarantine", "meta"):
        con.execute(f"create schema if not exists {schema}")
    lineage = ", ".join(f"{n} {t}" for n, t in LINEAGE_COLUMNS)
    fields = ", ".join(f"{_q(f)} VARCHAR" for f in dataset.field_names)
    con.execute(f"create table if not exists ods.{_q(dataset.code)} ({fields}, {lineage})")
    # A field added to the registry later becomes a new (NULL for old rows) column rather than a failure.
    have = {
        r[0]
        for r in con.execute(
            "select column_name from information_schema.columns where table_schema = 'ods' and table_name = ?",
            [dataset.code],
        ).fetchall()
    }
    for f in dataset.field_names:
        if f not in have:
            con.execute(f"alter table ods.{_q(dataset.code)} add column {_q(f)} VARCHAR")
    con.execute(
        f"create table if not exists quarantine.rows ({lineage}, raw_record VARCHAR, reason VARCHAR, "
        "rule VARCHAR, dimension VARCHAR, field VARCHAR)"
    )
    con.execute(f"create table if not exists meta.deliveries ({', '.join(f'{n} {t}' for n, t in DELIVERY_COLUMNS)})")
    ensure_quality_tables(con)


# --------------------------------------------------------------------------------------------- readers


@dataclass
class Chunk:
    """A bounded batch of records: text columns as delivered, 1-based record numbers, and unparseable records."""

    table: pa.Table
    row_numbers: np.ndarray
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (record number, raw text, reason)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _decodes_as(path: Path, encoding: str) -> bool:
    """Whether the whole file decodes strictly in ``encoding`` (streamed, bounded memory)."""
    dec = codecs.getincrementaldecoder(encoding)(errors="strict")
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                dec.decode(block)
        dec.decode(b"", final=True)
        return True
    except UnicodeDecodeError:
        return False


def detect_csv_encoding(path: Path) -> str | None:
    """'utf-8-sig' (BOM), 'utf-8', 'gbk', or None when the file decodes in neither."""
    with open(path, "rb") as fh:
        head = fh.read(3)
    if head == codecs.BOM_UTF8:
        return "utf-8-sig" if _decodes_as(path, "utf-8-sig") else None
    if _decodes_as(path, "utf-8"):
        return "utf-8"
    if _decodes_as(path, "gb18030"):  # GB18030 is the superset decoder of GBK
        return "gbk"
    return None


def _as_text(table: pa.Table) -> pa.Table:
    """Every column as text (ODS keeps values as delivered; parquet/JSON numbers become their text form)."""
    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type):
            cols.append(col)
        elif pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type):
            cols.append(pc.cast(col, pa.string()))
        elif pa.types.is_nested(col.type):
            cols.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in col.to_pylist()], pa.string()))
        else:
            cols.append(pc.cast(col, pa.string()))
    return pa.table(cols, names=table.column_names)


def read_csv_chunks(path: Path, encoding: str, batch_rows: int) -> Iterator[Chunk]:
    """CSV records in bounded batches (pyarrow streaming reader); rows with a wrong field count are reported, not lost."""
    if encoding == "replace":
        # Undecodable file: keep what can be shown (bytes escaped) so every record is still quarantined, never dropped.
        source = pa.BufferReader(path.read_bytes().decode("utf-8", errors="backslashreplace").encode("utf-8"))
        enc = "utf8"
    else:
        source = pa.OSFile(str(path))
        enc = {"utf-8": "utf8", "utf-8-sig": "utf8", "gbk": "gb18030"}[encoding]
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    head_text = head.decode("utf-8" if enc == "utf8" else "gb18030", errors="replace").lstrip("\ufeff")
    header = next(csv.reader(io.StringIO(head_text)), [])
    if not header:
        raise FileUnreadable("CSV 文件没有表头行")
    bad: list[tuple[int, str, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        number = (row.number - 1) if row.number else -1  # physical line → record (header is line 1)
        bad.append(
            (number, row.text, f"记录字段数为 {row.actual_columns}，表头为 {row.expected_columns} 列（行被截断或分隔符错误）")
        )
        return "skip"

    # Block size bounds memory; rows per batch follow from it (~100-250k rows of these datasets per 32 MB).
    reader = pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(encoding=enc, block_size=32 << 20, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )
    emitted = 0  # valid records yielded so far
    reported = 0
    try:
        for batch in reader:
            bad_numbers = np.array(sorted(b[0] for b in bad if b[0] > 0), dtype=np.int64)
            # k-th valid record's number: skip over the bad records' numbers (they are reported before later rows).
            pos = np.arange(emitted + 1, emitted + batch.num_rows + 1, dtype=np.int64)
            if len(bad_numbers):
                shifted = bad_numbers - np.arange(len(bad_numbers))
                pos = pos + np.searchsorted(shifted, pos, side="right")
            emitted += batch.num_rows
            new_bad, reported = bad[reported:], len(bad)
            yield Chunk(_as_text(pa.Table.from_batches([batch])), pos, new_bad)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise FileUnreadable(f"CSV 文件无法继续解析（文件损坏或被截断）：{exc}") from exc
    if reported < len(bad):
        yield Chunk(pa.table({c: pa.array([], pa.string()) for c in header}), np.array([], dtype=np.int64), bad[reported:])


def _json_lines(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """Whole-line byte chunks of a JSON Lines file."""
    with open(path, "rb") as fh:
        rest = b""
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                rest = block
                continue
            yield block[: cut + 1]
            rest = block[cut + 1 :]
        if rest:
            yield rest


def read_jsonl_chunks(path: Path, batch_rows: int, fields: list[str]) -> Iterator[Chunk]:
    """JSON Lines records in bounded batches; fast path pyarrow, per-line fallback only for a chunk with a bad line."""
    # Registered fields are read as text (no timestamp inference); a non-string JSON value there takes the slow path.
    options = pajson.ParseOptions(
        explicit_schema=pa.schema([(f, pa.string()) for f in fields]), unexpected_field_behavior="infer"
    )
    number = 0
    for block in _json_lines(path, 32 << 20):
        lines = [ln for ln in block.split(b"\n") if ln.strip()]
        start = number
        number += len(lines)
        nums = np.arange(start + 1, number + 1, dtype=np.int64)
        try:
            table = pajson.read_json(
                pa.BufferReader(b"\n".join(lines) + b"\n"),
                read_options=pajson.ReadOptions(block_size=64 << 20),
                parse_options=options,
            )
            # explicit_schema adds absent registered keys as null columns; keep only keys that occur in the block
            # (a byte search, so a key present with null values still counts as a delivered column).
            keys = [f for f in fields if json.dumps(f).encode() in block]
            table = table.select([c for c in table.column_names if c not in fields or c in keys])
            if table.num_rows == len(lines):
                for off in range(0, table.num_rows, batch_rows):
                    yield Chunk(_as_text(table.slice(off, batch_rows)), nums[off : off + batch_rows])
                continue
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
        # Slow path for this block only: per-line parsing finds which records are broken (or mixed-typed).
        records: list[dict] = []
        good: list[int] = []
        bad: list[tuple[int, str, str]] = []
        for i, raw in enumerate(lines):
            text = raw.decode("utf-8", errors="backslashreplace")
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                bad.append((start + i + 1, text, "JSON 行无法解析（记录不完整，文件可能被截断）"))
                continue
            records.append({k: (v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)) for k, v in obj.items()})
            good.append(start + i + 1)
        keys = list(dict.fromkeys(k for r in records for k in r))
        table = pa.table({k: pa.array([r.get(k) for r in records], pa.string()) for k in keys})
        yield Chunk(table, np.array(good, dtype=np.int64), bad)


def read_parquet_chunks(path: Path, batch_rows: int) -> Iterator[Chunk]:
    """Parquet records in bounded batches, every column cast to text."""
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileUnreadable(f"Parquet 文件无法读取（文件损坏或被截断）：{exc}") from exc
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            nums = np.arange(number + 1, number + batch.num_rows + 1, dtype=np.int64)
            number += batch.num_rows
            yield Chunk(_as_text(pa.Table.from_batches([batch])), nums)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileUnreadable(f"Parquet 文件读取中断（文件损坏或被截断），已读 {number} 条：{exc}") from exc


# --------------------------------------------------------------------------------------------- ingestion


@dataclass
class _Ctx:
    con: duckdb.DuckDBPyConnection
    ds: Dataset
    agency: str
    day: dt.date
    ingested_at: dt.datetime
    schema: object  # the non-strict pandera contract used per batch
    strict_schema: object
    rules: dict
    findings: list[dict] = field(default_factory=list)
    deliveries: list[dict] = field(default_factory=list)
    files: list[FileReport] = field(default_factory=list)


def batch_id(dataset: str, day: dt.date, file_sha256: str) -> str:
    return hashlib.sha256(f"{dataset}|{day.isoformat()}|{file_sha256}".encode()).hexdigest()[:16]


def _finding(ctx: _Ctx, rule: str, detail: str, key: str | None, field_name: str | None = None) -> None:
    dimension, severity = DELIVERY_RULES[rule]
    ctx.findings.append(
        {
            "partition_date": ctx.day, "agency": ctx.agency, "dataset": ctx.ds.code, "tool": "delivery", "rule": rule,
            "dimension": dimension, "severity": severity, "delivery_file": key, "row_number": None,
            "lineage_id": None, "field": field_name, "detail": detail,
        }
    )  # fmt: skip


def _contract_failures(ctx: _Ctx, frame: pd.DataFrame) -> tuple[dict[int, tuple[str, str, str, str]], pd.DataFrame]:
    """Per failing batch position: (reason, rule, dimension, field); and all failures (one per rule and record)."""
    fails = contracts.failing_rows(ctx.schema, frame)
    if fails.empty:
        return {}, fails
    order = {name: i for i, name in enumerate(ctx.ds.field_names)}
    fails = fails.assign(_o=fails["field"].map(order)).sort_values(["index", "_o", "check"], kind="stable")
    infos = [ctx.rules[(f, c)] for f, c in zip(fails["field"], fails["check"], strict=True)]
    texts = [
        i.reason + ("" if i.rule == "contract.required" else f"：'{v}'") for i, v in zip(infos, fails["value"], strict=True)
    ]
    fails = fails.assign(rule=[i.rule for i in infos], dimension=[i.dimension for i in infos], detail=texts)
    # one entry per failing record: every reason joined in field order, the first failure's rule/dimension/field
    # (grouped in one pass: a Python loop over groups cost ~5 s per 7 M-row delivery with 1 % defects)
    by_row = fails.groupby("index", sort=False)
    details = by_row["detail"].agg("；".join)
    first = by_row[["rule", "dimension", "field"]].first()
    per_row = {
        int(idx): (detail, rule, dim, fld)
        for idx, detail, rule, dim, fld in zip(details.index, details.to_numpy(), first["rule"].to_numpy(),
                                               first["dimension"].to_numpy(), first["field"].to_numpy(), strict=True)
    }
    return per_row, fails


def _load_chunk(ctx: _Ctx, chunk: Chunk, key: str, name: str, file_reason: str | None) -> None:
    """Append one chunk to the per-file staging table, with the contract result (or the file-level reason) per record."""
    fields = ctx.ds.field_names
    n = chunk.table.num_rows
    table = chunk.table
    extra = [c for c in table.column_names if c not in fields]
    need_raw = file_reason is not None or bool(extra)
    cols = {f: (table[f] if f in table.column_names else pa.nulls(n, pa.string())) for f in fields}
    reasons: list[str | None] = [None] * n
    rules: list[str | None] = [None] * n
    dims: list[str | None] = [None] * n
    flds: list[str | None] = [None] * n
    if file_reason is None and n:
        frame = pa.table(cols).to_pandas()
        per_row, fails = _contract_failures(ctx, frame)
        for i, (reason, rule, dim, fld) in per_row.items():
            reasons[i], rules[i], dims[i], flds[i] = reason, rule, dim, fld
        if not fails.empty:
            rows = chunk.row_numbers[fails["index"].to_numpy()]
            prefix = f"{ctx.ds.code}/{ctx.day.isoformat()}/{name}#"
            ctx.con.register(
                "_zq_f",
                pa.table(
                    {
                        "rule": pa.array(fails["rule"].tolist(), pa.string()),
                        "dimension": pa.array(fails["dimension"].tolist(), pa.string()),
                        "row_number": pa.array(rows, pa.int32()),
                        "field": pa.array(fails["field"].tolist(), pa.string()),
                        "detail": pa.array(fails["detail"].tolist(), pa.string()),
                    }
                ),
            )
            ctx.con.execute(
                "insert into _zq_findings select ?, ?, ?, 'pandera', rule, dimension, 'error', ?, row_number, "
                "? || row_number, field, detail from _zq_f",
                [ctx.day, ctx.agency, ctx.ds.code, key, prefix],
            )
            ctx.con.unregister("_zq_f")
        # With exactly the registered columns in registry order, the flush's default raw_record is the same JSON,
        # so it is built there for the quarantined rows only instead of here for the whole batch.
        need_raw = need_raw or (bool(per_row) and table.column_names != fields)
    raw: pa.Array
    if need_raw and n:
        # raw_record carries every delivered column (unregistered ones too); only computed for rows that may need it.
        ctx.con.register("_zq_t", table)
        struct = ", ".join(f"{_q(c)} := {_q(c)}" for c in table.column_names)
        raw = ctx.con.execute(f"select to_json(struct_pack({struct}))::VARCHAR from _zq_t").arrow().read_all().column(0).combine_chunks()
        ctx.con.unregister("_zq_t")
    else:
        raw = pa.nulls(n, pa.string())
    staged = pa.table(
        {
            **cols,
            "_row_number": pa.array(chunk.row_numbers, pa.int32()),
            "_raw": raw,
            "_reason": pa.array(reasons, pa.string()),
            "_rule": pa.array(rules, pa.string()),
            "_dimension": pa.array(dims, pa.string()),
            "_field": pa.array(flds, pa.string()),
        }
    )
    if chunk.bad:
        prefix = f"{ctx.ds.code}/{ctx.day.isoformat()}/{name}#"
        bad_rows = pa.table(
            {
                **{f: pa.nulls(len(chunk.bad), pa.string()) for f in fields},
                "_row_number": pa.array([b[0] for b in chunk.bad], pa.int32()),
                "_raw": pa.array([json.dumps({"_raw_text": b[1]}, ensure_ascii=False) for b in chunk.bad], pa.string()),
                "_reason": pa.array([b[2] for b in chunk.bad], pa.string()),
                "_rule": pa.array(["delivery.malformed_record"] * len(chunk.bad), pa.string()),
                "_dimension": pa.array([DELIVERY_RULES["delivery.malformed_record"][0]] * len(chunk.bad), pa.string()),
                "_field": pa.nulls(len(chunk.bad), pa.string()),
            }
        )
        staged = pa.concat_tables([staged, bad_rows])
        if file_reason is None:
            for number, _text, reason in chunk.bad:
                _finding(ctx, "delivery.malformed_record", f"第 {number} 条记录：{reason}", key)
                ctx.findings[-1].update(row_number=number, lineage_id=f"{prefix}{number}")
    ctx.con.register("_zq_s", staged)
    ctx.con.execute("insert into _zq_rows select * from _zq_s")
    ctx.con.unregister("_zq_s")


def _flush_file(ctx: _Ctx, key: str, name: str, bid: str, file_reason: tuple[str, str, str] | None) -> tuple[int, int, int]:
    """Move the staged records of one file into the ODS and quarantine; returns (delivered, accepted, quarantined)."""
    fields = ctx.ds.field_names
    lineage_sql = "? || '/' || ? || '/' || ? || '#' || _row_number, ?, ?, ?, _row_number, ?, ?, ?"
    params = [ctx.ds.code, ctx.day.isoformat(), name, ctx.agency, ctx.ds.code, key, bid, ctx.ingested_at, ctx.day]
    raw_default = f"to_json(struct_pack({', '.join(f'{_q(f)} := {_q(f)}' for f in fields)}))::VARCHAR"
    if file_reason is not None:
        reason, rule, dimension = file_reason
        ctx.con.execute(
            f"insert into quarantine.rows select {lineage_sql}, coalesce(_raw, {raw_default}), "
            "case when _rule = 'delivery.malformed_record' then ? || '；' || _reason else ? end, ?, ?, NULL "
            "from _zq_rows",
            [*params, reason, reason, rule, dimension],
        )
        ctx.con.execute("delete from _zq_findings where delivery_file = ?", [key])
    else:
        cols = ", ".join(_q(f) for f in fields)
        ctx.con.execute(
            f"insert into ods.{_q(ctx.ds.code)} ({cols}, {', '.join(n for n, _ in LINEAGE_COLUMNS)}) "
            f"select {cols}, {lineage_sql} from _zq_rows where _reason is null",  # staged in file order: no sort needed
            params,
        )
        ctx.con.execute(
            f"insert into quarantine.rows select {lineage_sql}, coalesce(_raw, {raw_default}), _reason, _rule, "
            "_dimension, _field from _zq_rows where _reason is not null order by _row_number",
            params,
        )
    delivered, quarantined = ctx.con.execute(
        "select count(*), count(*) filter (where _reason is not null or ?) from _zq_rows", [file_reason is not None]
    ).fetchone()
    ctx.con.execute("delete from _zq_rows")
    return int(delivered), int(delivered - quarantined), int(quarantined)


def _delivery_row(ctx: _Ctx, rep: FileReport, **values: object) -> None:
    row = {n: None for n, _ in DELIVERY_COLUMNS}
    row.update(
        partition_date=ctx.day, agency=ctx.agency, dataset=ctx.ds.code, delivery_file=rep.key, file_name=rep.name,
        format=rep.format, rows_delivered=rep.rows_delivered, rows_accepted=rep.rows_accepted,
        rows_quarantined=rep.rows_quarantined, status=rep.status, error=rep.error, ingested_at=ctx.ingested_at,
    )  # fmt: skip
    row.update(values)
    ctx.deliveries.append(row)


def _format_of(name: str, entry: ManifestFile | None) -> str | None:
    if entry is not None:
        return entry.format
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"csv": "csv", "jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl", "parquet": "parquet"}.get(suffix)


def _ingest_file(
    ctx: _Ctx,
    store: ObjectStore,
    obj: ObjectInfo,
    manifest: Manifest | None,
    seen_sha: dict[str, str],
    earlier_sha: dict[str, str],
    batch_rows: int,
) -> None:
    name = obj.key.rsplit("/", 1)[-1]
    entry = next((f for f in manifest.files if f.name == name), None) if manifest else None
    fmt = _format_of(name, entry)
    rep = FileReport(obj.key, name, fmt)
    declared = (entry.encoding if entry else ctx.ds.delivery.encoding).lower().replace("_", "-")
    detected: str | None = declared
    file_reason: tuple[str, str, str] | None = None

    def problem(rule: str, detail: str, status: str | None = None) -> None:
        _finding(ctx, rule, detail, obj.key)
        rep.errors.append(detail)
        if status:
            rep.status = status
        elif rep.status == "ok":
            rep.status = "warn"

    with store.local_copy(obj.key) as path:
        sha = _sha256_of(path)
        size = path.stat().st_size
        bid = batch_id(ctx.ds.code, ctx.day, sha)
        if manifest is not None and entry is None:
            problem("delivery.unlisted_file", f"文件 {name} 未在清单中列出")
        if size == 0:
            problem("delivery.empty_file", f"空文件：{name} 大小为 0 字节", "error")
        elif fmt is None:
            problem("delivery.unreadable_file", f"无法识别的文件格式：{name}（应为 csv / jsonl / parquet）", "error")
        else:
            first = seen_sha.get(sha) or earlier_sha.get(sha)
            if first is not None:
                detail = f"{DUPLICATE_REASON}：文件内容与 {first} 相同（sha256 {sha[:12]}…），保留首次交付，本文件记录全部隔离"
                problem("delivery.duplicate_file", detail, "duplicate")
                file_reason = (detail, "delivery.duplicate_file", DELIVERY_RULES["delivery.duplicate_file"][0])
            if fmt == "csv":
                detected = detect_csv_encoding(path)
                if detected is None:
                    detail = f"文件编码无法识别：{name} 既不是有效的 UTF-8 也不是 GBK 编码，整个文件隔离"
                    problem("delivery.encoding_undecodable", detail, "quarantined" if file_reason is None else None)
                    file_reason = file_reason or (detail, "delivery.encoding_undecodable", "standardization")
                elif detected.replace("-sig", "") != declared.replace("-sig", "") and not _decodes_as(
                    path, "ascii"
                ):  # a pure-ASCII file is the same bytes in UTF-8 and GBK: not a mismatch
                    problem("delivery.encoding_mismatch", f"文件实际编码为 {detected}，清单/登记声明为 {declared}")
            try:
                if fmt == "csv":
                    chunks = read_csv_chunks(path, detected or "replace", batch_rows)
                elif fmt == "jsonl":
                    chunks = read_jsonl_chunks(path, batch_rows, ctx.ds.field_names)
                else:
                    chunks = read_parquet_chunks(path, batch_rows)
                seen_columns: list[str] = []
                last_bad = 0
                count = 0
                for chunk in chunks:
                    for c in chunk.table.column_names:
                        if c not in seen_columns:
                            seen_columns.append(c)
                    # CSV/parquet know their columns from the first chunk: decide the file-level contract before rows.
                    if file_reason is None and fmt != "jsonl" and count == 0:
                        file_reason = _column_reason(ctx, seen_columns, obj.key, rep)
                    count += chunk.table.num_rows + len(chunk.bad)
                    if chunk.bad:
                        last_bad = max(last_bad, max(b[0] for b in chunk.bad))
                    _load_chunk(ctx, chunk, obj.key, name, file_reason[0] if file_reason else None)
                if file_reason is None and fmt == "jsonl" and count:
                    file_reason = _column_reason(ctx, seen_columns, obj.key, rep)
                if count == 0 and size > 0:
                    problem("delivery.empty_file", f"文件 {name} 没有数据记录（仅有表头或空行）")
                if last_bad and last_bad == count:
                    problem("delivery.truncated_file", f"文件 {name} 最后一条记录（第 {last_bad} 条）不完整，文件可能被截断")
            except FileUnreadable as exc:
                problem("delivery.unreadable_file", f"{name}：{exc}", "error")
        delivered, accepted, quarantined = _flush_file(ctx, obj.key, name, bid, file_reason)
    rep.rows_delivered, rep.rows_accepted, rep.rows_quarantined = delivered, accepted, quarantined
    if entry is not None:
        if entry.record_count != delivered:
            problem(
                "delivery.record_count_mismatch",
                f"清单记录数 {entry.record_count} 与实际记录数 {delivered} 不一致：{name}",
            )
        if entry.sha256.lower() != sha:
            problem("delivery.checksum_mismatch", f"清单 sha256 与文件实际摘要不一致：{name}（清单 {entry.sha256[:12]}…，实际 {sha[:12]}…）")
    if size > 0 and delivered > 0 and sha not in seen_sha and sha not in earlier_sha:
        seen_sha[sha] = obj.key
    _delivery_row(
        ctx, rep,
        encoding=detected if fmt == "csv" else (entry.encoding if entry else None), declared_encoding=declared,
        manifest_present=manifest is not None, manifest_record_count=entry.record_count if entry else None,
        actual_record_count=delivered, manifest_sha256=entry.sha256 if entry else None, actual_sha256=sha,
        size_bytes=size, extracted_at=manifest.extracted_at if manifest else None,
        delivered_at=(manifest.delivered_at if manifest and manifest.delivered_at else obj.last_modified), batch_id=bid,
    )  # fmt: skip
    ctx.files.append(rep)


def _column_reason(ctx: _Ctx, columns: list[str], key: str, rep: FileReport) -> tuple[str, str, str] | None:
    """The file-level quarantine reason when the column set differs from the registry (missing/extra/renamed)."""
    missing, extra = contracts.column_problems(ctx.strict_schema, columns)
    if not missing and not extra:
        return None
    detail = contracts.column_problem_reason(missing, extra)
    ctx.findings.append(
        {
            "partition_date": ctx.day, "agency": ctx.agency, "dataset": ctx.ds.code, "tool": "pandera",
            "rule": contracts.COLUMN_SET_RULE, "dimension": "understandability", "severity": "error",
            "delivery_file": key, "row_number": None, "lineage_id": None,
            "field": ",".join([*missing, *extra]), "detail": detail,
        }
    )  # fmt: skip
    rep.errors.append(detail)
    rep.status = "quarantined"
    return detail, contracts.COLUMN_SET_RULE, "understandability"


def _earlier_checksums(con: duckdb.DuckDBPyConnection, dataset: str, day: dt.date) -> dict[str, str]:
    rows = con.execute(
        "select actual_sha256, min(delivery_file) from meta.deliveries where dataset = ? and partition_date < ? "
        "and status <> 'duplicate' and rows_delivered > 0 and actual_sha256 is not null group by 1",
        [dataset, day],
    ).fetchall()
    return {sha: key for sha, key in rows}


def _insert_rows(con: duckdb.DuckDBPyConnection, target: str, columns: list[tuple[str, str]], rows: list[dict]) -> None:
    if not rows:
        return
    types = {
        "DATE": pa.date32(), "VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
        "BOOLEAN": pa.bool_(), "TIMESTAMPTZ": pa.timestamp("us", tz="Asia/Shanghai"),
    }  # fmt: skip
    schema = pa.schema([(n, types[t]) for n, t in columns])
    # Normalize to UTC first: pyarrow mis-converts some aware datetimes (pydantic's TzInfo) in from_pylist.
    utc = [{k: v.astimezone(dt.timezone.utc) if isinstance(v, dt.datetime) else v for k, v in r.items()} for r in rows]
    con.register("_zq_ins", pa.Table.from_pylist(utc, schema=schema))
    con.execute(f"insert into {target} ({', '.join(n for n, _ in columns)}) select * from _zq_ins")
    con.unregister("_zq_ins")


def _register_rules(ctx: _Ctx) -> None:
    """The rules evaluated for this (dataset, partition), so passing rules count in the quality scores."""
    rules = {(contracts.COLUMN_SET_RULE, "understandability", "error", "pandera")}
    rules |= {(r.rule, r.dimension, "error", "pandera") for r in ctx.rules.values()}
    rules |= {(rule, dim, sev, "delivery") for rule, (dim, sev) in DELIVERY_RULES.items()}
    ctx.con.execute(
        "delete from quality.rule_catalog where partition_date = ? and dataset = ? and tool in ('pandera', 'delivery')",
        [ctx.day, ctx.ds.code],
    )
    ctx.con.executemany(
        "insert into quality.rule_catalog (partition_date, dataset, tool, rule, dimension, severity) values (?, ?, ?, ?, ?, ?)",
        [[ctx.day, ctx.ds.code, tool, rule, dim, sev] for rule, dim, sev, tool in sorted(rules)],
    )


def ingest_delivery(
    con: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    registry: Registry,
    dataset_code: str,
    day: dt.date,
    now: dt.datetime | None = None,
    batch_rows: int = BATCH_ROWS,
) -> IngestReport:
    """Ingest one dataset's delivery for ``day``: replaces that partition's ODS, quarantine, meta and findings rows in one transaction."""
    ds = registry.datasets[dataset_code]
    ensure_gov_tables(con, ds)
    fields_ddl = ", ".join(f"{_q(f)} VARCHAR" for f in ds.field_names)
    con.execute(
        f"create or replace temp table _zq_rows ({fields_ddl}, _row_number INTEGER, _raw VARCHAR, _reason VARCHAR, "
        "_rule VARCHAR, _dimension VARCHAR, _field VARCHAR)"
    )
    con.execute("create or replace temp table _zq_findings as select * from quality.findings limit 0")
    ctx = _Ctx(
        con, ds, ds.agency, day, dt.datetime.now(TZ),
        contracts.build_contract(ds, strict=False), contracts.build_contract(ds, strict=True), contracts.rules_of(ds),
    )  # fmt: skip
    now = (now or dt.datetime.now(TZ)).astimezone(TZ)
    report = IngestReport(ds.code, ds.agency, day, "ok")
    con.execute("begin transaction")
    try:
        for table, col in (
            (f"ods.{_q(ds.code)}", "_partition_date"), ("quarantine.rows", "_partition_date"),
            ("meta.deliveries", "partition_date"),
        ):  # fmt: skip
            ds_col = "_dataset" if col.startswith("_") else "dataset"
            con.execute(f"delete from {table} where {col} = ? and {ds_col} = ?", [day, ds.code])
        con.execute(
            "delete from quality.findings where partition_date = ? and dataset = ? and tool in ('pandera', 'delivery')",
            [day, ds.code],
        )
        objects = list_delivery_files(store, ds.agency, ds.code, day)
        prefix = delivery_prefix(ds.agency, ds.code, day)
        manifest: Manifest | None = None
        manifest_error: str | None = None
        try:
            manifest = read_manifest(store, ds.agency, ds.code, day)
        except ValueError as exc:
            manifest_error = str(exc)
        if day > now.date():
            detail = (
                f"拒绝交付：分区日期 {day.isoformat()} 晚于当前日期 {now.date().isoformat()}（北京时间），"
                f"交付目录 {prefix} 不予入库"
            )
            _finding(ctx, "delivery.future_partition", detail, prefix)
            for obj in objects or [None]:
                rep = FileReport(obj.key if obj else None, obj.key.rsplit("/", 1)[-1] if obj else None, None, "rejected", [detail])
                _delivery_row(ctx, rep, manifest_present=manifest is not None)
                ctx.files.append(rep)
            report.status = "rejected"
        elif not objects and manifest is None:
            rep = FileReport(None, None, ds.delivery.format, "missing", [f"应交付的数据未交付：{prefix} 不存在"])
            _delivery_row(ctx, rep, manifest_present=False)
            ctx.files.append(rep)
            report.status = "missing"
        else:
            if manifest_error:
                _finding(ctx, "delivery.manifest_invalid", manifest_error, prefix + "_manifest.json")
            elif manifest is None:
                _finding(ctx, "delivery.manifest_missing", f"交付目录 {prefix} 缺少清单文件 _manifest.json，无法核对记录数与摘要", prefix)
            seen: dict[str, str] = {}
            earlier = _earlier_checksums(con, ds.code, day)
            for obj in objects:
                _ingest_file(ctx, store, obj, manifest, seen, earlier, batch_rows)
                if manifest is None:
                    rep = ctx.files[-1]
                    rep.errors.insert(0, "缺少清单 _manifest.json" if not manifest_error else "清单无法解析")
                    rep.status = "warn" if rep.status == "ok" else rep.status
                    ctx.deliveries[-1].update(status=rep.status, error=rep.error)
            present = {o.key.rsplit("/", 1)[-1] for o in objects}
            for entry in manifest.files if manifest else []:
                if entry.name not in present:
                    detail = f"清单列出的文件 {entry.name} 未交付（清单记录数 {entry.record_count}）"
                    _finding(ctx, "delivery.file_missing", detail, prefix + entry.name)
                    rep = FileReport(prefix + entry.name, entry.name, entry.format, "missing", [detail])
                    _delivery_row(
                        ctx, rep, manifest_present=True, manifest_record_count=entry.record_count,
                        manifest_sha256=entry.sha256, declared_encoding=entry.encoding,
                        extracted_at=manifest.extracted_at, delivered_at=manifest.delivered_at,
                    )  # fmt: skip
                    ctx.files.append(rep)
            report.status = "ok" if all(f.status == "ok" for f in ctx.files) else "warn"
        _insert_rows(con, "meta.deliveries", list(DELIVERY_COLUMNS), ctx.deliveries)
        if ctx.findings:
            con.register("_zq_df", pd.DataFrame(ctx.findings, columns=list(FINDING_COLUMNS)).astype({"row_number": "Int32"}))
            con.execute(f"insert into _zq_findings ({', '.join(FINDING_COLUMNS)}) select {', '.join(FINDING_COLUMNS)} from _zq_df")
            con.unregister("_zq_df")
        con.execute(f"insert into quality.findings ({', '.join(FINDING_COLUMNS)}) select {', '.join(FINDING_COLUMNS)} from _zq_findings")
        report.findings = con.execute("select count(*) from _zq_findings").fetchone()[0]
        _register_rules(ctx)
        con.execute("commit")
    except BaseException as exc:
        rollback_keeping_cause(con, exc)
        raise
    finally:
        with contextlib.suppress(duckdb.Error):  # temp tables; a failure here must not hide the error above
            con.execute("drop table if exists _zq_rows")
            con.execute("drop table if exists _zq_findings")
    report.files = ctx.files
    return report


def row_accounting(con: duckdb.DuckDBPyConnection, dataset: str, day: dt.date) -> dict[str, int]:
    """Delivered vs accepted + quarantined for a partition, from meta.deliveries and the actual ODS/quarantine tables."""
    delivered, accepted_meta, quarantined_meta = con.execute(
        "select coalesce(sum(rows_delivered), 0), coalesce(sum(rows_accepted), 0), coalesce(sum(rows_quarantined), 0) "
        "from meta.deliveries where dataset = ? and partition_date = ?",
        [dataset, day],
    ).fetchone()
    in_ods = con.execute(f"select count(*) from ods.{_q(dataset)} where _partition_date = ?", [day]).fetchone()[0]
    in_quarantine = con.execute(
        "select count(*) from quarantine.rows where _dataset = ? and _partition_date = ?", [dataset, day]
    ).fetchone()[0]
    return {
        "rows_delivered": int(delivered), "rows_accepted": int(accepted_meta), "rows_quarantined": int(quarantined_meta),
        "rows_in_ods": int(in_ods), "rows_in_quarantine": int(in_quarantine),
    }  # fmt: skip
