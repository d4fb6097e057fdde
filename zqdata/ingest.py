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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from zqdata import contracts, standards
from zqdata.landing import Manifest, ManifestFile, arrival_time, delivery_prefix, list_delivery_files, read_manifest
from zqdata.registry import Dataset, QualityPolicy, Registry, load_quality_policy
from zqdata.settings import TZ
from zqdata.storage import ObjectInfo, ObjectStore
from zqdata.txn import rollback_keeping_cause
from zqdata.warehouse import relation_columns

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
    ("delivered_at", "TIMESTAMPTZ"),  # the manifest's claim
    ("arrived_at", "TIMESTAMPTZ"),  # the object store's time (latest LastModified of the folder): what timeliness uses
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
# Values ingestion stored in their standard spelling (registry quality_policy: accepted_form, whitespace): counted per
# file, field and case, never a finding (nothing is filed with the agency). No value is kept here (personal data).
NORMALIZATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("partition_date", "DATE"), ("agency", "VARCHAR"), ("dataset", "VARCHAR"), ("delivery_file", "VARCHAR"),
    ("field", "VARCHAR"), ("kind", "VARCHAR"), ("policy_case", "VARCHAR"), ("dimension", "VARCHAR"),
    ("values_normalized", "BIGINT"), ("first_row_number", "INTEGER"), ("detail", "VARCHAR"),
)  # fmt: skip
_SEVERITY_RANK = {"ok": 0, "warn": 1, "error": 2}


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
    have = set(relation_columns(con, "ods", dataset.code))
    for f in dataset.field_names:
        if f not in have:
            con.execute(f"alter table ods.{_q(dataset.code)} add column {_q(f)} VARCHAR")
    con.execute(
        f"create table if not exists quarantine.rows ({lineage}, raw_record VARCHAR, reason VARCHAR, "
        "rule VARCHAR, dimension VARCHAR, field VARCHAR)"
    )
    con.execute(f"create table if not exists meta.deliveries ({', '.join(f'{n} {t}' for n, t in DELIVERY_COLUMNS)})")
    con.execute("alter table meta.deliveries add column if not exists arrived_at TIMESTAMPTZ")  # older gov files
    ensure_quality_tables(con)
    con.execute(f"create table if not exists quality.normalizations ({', '.join(f'{n} {t}' for n, t in NORMALIZATION_COLUMNS)})")


# --------------------------------------------------------------------------------------------- readers


class BadRecord(NamedTuple):
    """A record that cannot enter the ODS as read: quarantined on its own with ``reason`` under ``rule``."""

    number: int  # 1-based record number in the file
    text: str  # the record's text as read (undecodable bytes escaped as \xNN); raw_record when ``record`` is None
    reason: str
    rule: str = "delivery.malformed_record"
    field: str | None = None  # the field the problem is in, when known
    record: dict[str, str | None] | None = None  # the delivered columns (undecodable bytes escaped as \xNN)
    incomplete: bool = True  # the record may be cut off (a last one suggests a truncated file); False: whole but wrong


@dataclass
class Chunk:
    """A bounded batch of records: text columns as delivered, 1-based record numbers, and unparseable records."""

    table: pa.Table
    row_numbers: np.ndarray
    bad: list[BadRecord] = field(default_factory=list)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- encodings at the boundary (issue 12)
# The landing contract: CSV in UTF-8 or GBK, optionally with a UTF-8 BOM; JSON Lines and Parquet text in UTF-8. A BOM is
# stripped and never decides the encoding by itself (GBK exported with a BOM is common); the content decides, UTF-8
# tried first (it validates itself; GB18030 accepts most byte pairs). An undecodable byte sequence quarantines the
# record holding it, naming the field and byte offset; nothing undecodable reaches a DuckDB table (an invalid UTF-8
# value in a VARCHAR column makes DuckDB fail every later query over it, or invalidates the database).

_GBK_NAMES = {"gbk", "gb2312", "gb18030", "cp936", "936"}
ENCODING_LABEL = {"utf-8": "UTF-8", "gbk": "GBK"}
# CSV: an undecodable byte sequence becomes this token in the UTF-8 text handed to pyarrow (two Unicode noncharacters,
# "for internal use", around the bytes in hex), so the reader finds it per field, vectorized, after parsing.
_MARK_OPEN, _MARK_CLOSE = "\ufdd0", "\ufdd1"
_MARK_RE = re.compile("\ufdd0([0-9A-F]+)\ufdd1")
_ESCAPED_RE = re.compile("[\udc00-\udcff]+")


def _escape_bytes(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: each undecodable byte as U+DC00+byte (like surrogateescape, also for bytes below 0x80)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(0xDC00 + b) for b in exc.object[exc.start : exc.end]), exc.end


codecs.register_error("zqdata.escape", _escape_bytes)


def encoding_family(encoding: str | None) -> str:
    """'utf-8' or 'gbk' for a declared/detected encoding name (utf8, UTF-8, utf-8-sig, GB18030, cp936 ...)."""
    e = (encoding or "utf-8").lower().replace("_", "-")
    return "gbk" if e in _GBK_NAMES or e.replace("-", "") in _GBK_NAMES else "utf-8"


def _codec(family: str) -> str:
    return "gb18030" if family == "gbk" else "utf-8"  # GB18030 is the superset decoder of GBK


def _line_blocks(path: Path, chunk_bytes: int, skip: int = 0) -> Iterator[bytes]:
    """Whole-line byte chunks of a file (from byte ``skip``). A newline byte never occurs inside a UTF-8 or GBK/GB18030
    character, so each chunk decodes on its own."""
    with open(path, "rb") as fh:
        fh.seek(skip)
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


def _json_lines(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """Whole-line byte chunks of a JSON Lines file."""
    return _line_blocks(path, chunk_bytes)


def _decodes_as(path: Path, encoding: str, skip: int = 0) -> bool:
    """Whether the whole file (from byte ``skip``) decodes strictly in ``encoding`` (streamed, bounded memory)."""
    dec = codecs.getincrementaldecoder(encoding)(errors="strict")
    try:
        with open(path, "rb") as fh:
            fh.seek(skip)
            for block in iter(lambda: fh.read(1 << 24), b""):
                dec.decode(block)
        dec.decode(b"", final=True)
        return True
    except UnicodeDecodeError:
        return False


def _bad_lines(path: Path, codec: str, skip: int) -> tuple[int, int]:
    """(lines holding an undecodable byte sequence, lines read) in ``codec``; stops once most lines are bad."""
    bad = lines = 0
    for block in _line_blocks(path, 16 << 20, skip):
        pieces = block.split(b"\n")
        if block.endswith(b"\n"):
            pieces.pop()
        try:
            block.decode(codec)
            lines += len(pieces)
            continue
        except UnicodeDecodeError:
            pass
        for piece in pieces:  # only blocks with an error are looked at line by line
            lines += 1
            try:
                piece.decode(codec)
            except UnicodeDecodeError:
                bad += 1
                if bad > 1000 and 2 * bad > lines:
                    return bad, lines
    return bad, lines


@dataclass
class CsvEncoding:
    """What a CSV file is encoded in, as found (the content decides; the BOM is noted and stripped)."""

    encoding: str | None  # 'utf-8' | 'utf-8-sig' (BOM + UTF-8) | 'gbk' | None: most lines decode in neither
    bom: bool = False
    bad_lines: int = 0  # lines holding an undecodable byte sequence in ``encoding`` (their records are quarantined)
    lines: int = 0

    @property
    def family(self) -> str:
        return encoding_family(self.encoding)


def detect_csv_encoding(path: Path, declared: str = "utf-8") -> CsvEncoding:
    """The file's encoding: the content after an optional UTF-8 BOM decides, UTF-8 first, then GBK.

    When neither decodes every line, the one leaving fewer undecodable lines is taken (a tie: the declared one) and
    those lines' records are quarantined one by one; when most lines decode in neither, the encoding is None.
    """
    with open(path, "rb") as fh:
        bom = fh.read(3) == codecs.BOM_UTF8
    skip = 3 if bom else 0
    if _decodes_as(path, "utf-8", skip):
        return CsvEncoding("utf-8-sig" if bom else "utf-8", bom)
    if _decodes_as(path, "gb18030", skip):
        return CsvEncoding("gbk", bom)
    declared = encoding_family(declared)
    counts = {fam: _bad_lines(path, _codec(fam), skip) for fam in ("utf-8", "gbk")}
    best = min(counts, key=lambda fam: (counts[fam][0] / max(counts[fam][1], 1), fam != declared))
    bad, lines = counts[best]
    if 2 * bad > lines:
        return CsvEncoding(None, bom, bad, lines)
    return CsvEncoding("utf-8-sig" if bom and best == "utf-8" else best, bom, bad, lines)


def _valid_utf8(data: bytes | pa.Buffer) -> bool:
    """Whether a byte buffer is valid UTF-8 (Arrow's vectorized check, no Python string built)."""
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    offsets = pa.py_buffer(np.array([0, buf.size], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, buf]).validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def invalid_utf8_rows(arr: pa.Array | pa.ChunkedArray) -> list[tuple[int, int, bytes]]:
    """(row, byte offset in the value, the offending byte sequence) of each value of a string/binary column that is
    not valid UTF-8; [] for other types.

    Vectorized: one UTF-8 validation over the column's value buffer and a character-boundary check at every value's
    start and end in numpy; Python touches only the offending values. (A valid buffer whose values all start and end on
    character boundaries holds only valid values.)
    """
    if isinstance(arr, pa.ChunkedArray):
        out: list[tuple[int, int, bytes]] = []
        base = 0
        for chunk in arr.chunks:
            out += [(base + i, off, seq) for i, off, seq in invalid_utf8_rows(chunk)]
            base += len(chunk)
        return out
    t = arr.type
    if pa.types.is_dictionary(t):
        if not (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
                or pa.types.is_binary(t.value_type) or pa.types.is_large_binary(t.value_type)):  # fmt: skip
            return []
        bad_values = {i: (off, seq) for i, off, seq in invalid_utf8_rows(arr.dictionary)}
        if not bad_values:
            return []
        idx = arr.indices.to_numpy(zero_copy_only=False)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return [(int(r), *bad_values[int(idx[r])]) for r in np.flatnonzero(valid & np.isin(idx, list(bad_values)))]
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        arr = pc.cast(arr, pa.large_binary())
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_binary(t):
        off_type = np.int32
    elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        off_type = np.int64
    else:
        return []
    n = len(arr)
    if n == 0:
        return []
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_type, count=arr.offset + n + 1)[arr.offset :].astype(np.int64)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return []
    data = np.frombuffer(bufs[2], dtype=np.uint8, count=hi)
    starts, ends = offsets[:-1], offsets[1:]
    present = ends > starts
    if arr.null_count:
        present &= arr.is_valid().to_numpy(zero_copy_only=False)
    suspect = np.zeros(n, dtype=bool)
    suspect[present] = (data[starts[present]] & 0xC0) == 0x80  # starts with a continuation byte
    inner = present & (ends < hi)
    suspect[inner] |= (data[ends[inner]] & 0xC0) == 0x80  # the next byte continues this value's last character
    if not _valid_utf8(bufs[2].slice(lo, hi - lo)):
        view = memoryview(data)
        pos = lo
        while pos < hi:
            try:
                codecs.utf_8_decode(view[pos:hi], "strict", True)
                break
            except UnicodeDecodeError as exc:
                row = int(np.searchsorted(offsets, pos + exc.start, side="right")) - 1
                suspect[row] = True
                pos = max(int(ends[row]), pos + exc.start + 1)
    out = []
    for row in np.flatnonzero(suspect & present):
        value = data[starts[row] : ends[row]].tobytes()
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append((int(row), exc.start, value[exc.start : exc.end]))
    return out


def _escaped(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="backslashreplace")


def _undecodable_reason(offset: int, seq: bytes, family: str, label: str | None = None, where: str = "字段值") -> str:
    """Chinese reason (English in parentheses) for an undecodable byte sequence: field, bytes, byte offset (from 0)."""
    enc = ENCODING_LABEL[family]
    scope = {"字段值": "the field value", "行": "the line", "记录": "the record"}[where]
    return (
        f"{'字段' + label if label else '记录'}含无法按 {enc} 解码的字节序列 0x{seq.hex().upper()}"
        f"（{where}内字节偏移 {offset}）(undecodable {enc} byte sequence at byte offset {offset} of {scope})"
    )


def _label(labels: dict[str, str] | None, name: str) -> str:
    return (labels or {}).get(name) or f"({name})"


def _transcode(block: bytes, codec: str) -> bytes:
    """A whole-line block as UTF-8, each undecodable byte sequence replaced by the marker token (see _MARK_OPEN)."""
    try:
        text = block.decode(codec)
        return block if codec == "utf-8" else text.encode("utf-8")
    except UnicodeDecodeError:
        text = block.decode(codec, errors="zqdata.escape")
        return _ESCAPED_RE.sub(
            lambda m: _MARK_OPEN + bytes(ord(c) - 0xDC00 for c in m.group()).hex().upper() + _MARK_CLOSE, text
        ).encode("utf-8")


class _TranscodedFile(io.RawIOBase):
    """A file's bytes from ``skip`` on, read as UTF-8 with undecodable sequences marked (streamed, bounded memory)."""

    def __init__(self, path: Path, codec: str, skip: int) -> None:
        super().__init__()
        self._blocks = _line_blocks(path, 16 << 20, skip)
        self._codec = codec
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        while not len(self._buf):
            block = next(self._blocks, None)
            if block is None:
                return 0
            self._buf = memoryview(_transcode(block, self._codec))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _unmark(text: str) -> str:
    """Marked text for display: each undecodable byte as \\xNN (like Python's backslashreplace)."""
    return _MARK_RE.sub(lambda m: "".join(f"\\x{b:02x}" for b in bytes.fromhex(m.group(1))), text)


def _first_mark(text: str, codec: str) -> tuple[int, bytes] | None:
    """(byte offset in the original encoding, the undecodable bytes) of the first marker token in ``text``."""
    m = _MARK_RE.search(text)
    if m is None:
        return None
    return len(text[: m.start()].encode(codec)), bytes.fromhex(m.group(1))


def _as_text(table: pa.Table) -> pa.Table:
    """Every column as text (ODS keeps values as delivered; parquet/JSON numbers become their text form)."""
    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type):
            cols.append(col)
        elif pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type):
            cols.append(pc.cast(col, pa.string()))
        elif pa.types.is_nested(col.type):
            cols.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                  for v in col.to_pylist()], pa.string()))  # dates, bytes, decimals: text
        else:
            cols.append(pc.cast(col, pa.string()))
    return pa.table(cols, names=table.column_names)


def _is_bytes_like(t: pa.DataType) -> bool:
    return any(
        check(t) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
                               pa.types.is_string_view, pa.types.is_binary_view)
    )  # fmt: skip


def _escaped_pylist(col: pa.ChunkedArray) -> list[str | None]:
    """A (small) column's values as text for raw_record, undecodable bytes escaped as \\xNN."""
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if _is_bytes_like(col.type):
        return [_escaped(v) for v in pc.cast(col, pa.large_binary()).to_pylist()]
    return _as_text(pa.table({"c": col}))["c"].to_pylist()


def read_csv_chunks(
    path: Path, encoding: str, batch_rows: int, sniff: CsvEncoding | None = None, labels: dict[str, str] | None = None
) -> Iterator[Chunk]:
    """CSV records in bounded batches (pyarrow streaming reader); rows with a wrong field count are reported, not lost.

    ``encoding``: 'utf-8', 'utf-8-sig', 'gbk', or 'replace' (undecodable file: every record is still read, bytes
    escaped, for the whole-file quarantine). ``sniff`` (detect_csv_encoding) tells whether some lines hold undecodable
    bytes: then the text goes to pyarrow with those sequences marked, and each record holding one is reported as a
    BadRecord naming the field and byte offset instead of failing the file.
    """
    family = "utf-8" if encoding == "replace" else encoding_family(encoding)
    codec = _codec(family)
    if sniff is None:
        with open(path, "rb") as fh:
            bom = fh.read(3) == codecs.BOM_UTF8
    else:
        bom = sniff.bom
    marked = encoding == "replace" or (sniff is not None and sniff.bad_lines > 0) or (bom and family == "gbk")
    source: object
    if marked:  # a GBK file's BOM is skipped here; pyarrow itself skips a UTF-8 BOM
        source = _TranscodedFile(path, codec, 3 if bom else 0)
        enc = "utf8"
    else:
        source = pa.OSFile(str(path))
        enc = "utf8" if family == "utf-8" else "gb18030"
    with open(path, "rb") as fh:
        fh.seek(3 if bom else 0)
        head = fh.read(1 << 20)
    try:  # newline="": a record may end in CR alone, as pyarrow reads it too
        header = next(csv.reader(io.StringIO(_transcode(head[: head.rfind(b"\n") + 1] or head, codec).decode("utf-8"),
                                             newline="")), [])
    except csv.Error as exc:
        raise FileUnreadable(f"CSV 表头无法解析 (header unreadable): {exc}") from exc
    if not header:
        raise FileUnreadable("CSV 文件没有表头行")
    bad: list[BadRecord] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        number = (row.number - 1) if row.number else -1  # physical line → record (header is line 1)
        reason = f"记录字段数为 {row.actual_columns}，表头为 {row.expected_columns} 列（行被截断或分隔符错误）"
        hit = _first_mark(row.text, codec) if marked else None
        if hit is not None:
            reason += "；" + _undecodable_reason(hit[0], hit[1], family, where="记录")
        bad.append(BadRecord(number, _unmark(row.text) if marked else row.text, reason))
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
            table = _as_text(pa.Table.from_batches([batch]))
            if marked and table.num_rows:
                table, pos, undecodable = _split_marked(table, pos, codec, family, labels)
                new_bad += undecodable
            yield Chunk(table, pos, new_bad)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise FileUnreadable(f"CSV 文件无法继续解析（文件损坏或被截断）：{exc}") from exc
    if reported < len(bad):
        yield Chunk(pa.table({c: pa.array([], pa.string()) for c in header}), np.array([], dtype=np.int64), bad[reported:])


def _split_marked(
    table: pa.Table, pos: np.ndarray, codec: str, family: str, labels: dict[str, str] | None
) -> tuple[pa.Table, np.ndarray, list[BadRecord]]:
    """Take the records holding a marked (undecodable) byte sequence out of a CSV batch, as BadRecords."""
    hits = np.zeros(table.num_rows, dtype=bool)
    for col in table.columns:  # vectorized per column; Python only for the hit records
        hits |= pc.match_substring(col, _MARK_OPEN).fill_null(False).to_numpy()
    rows = np.flatnonzero(hits)
    if not len(rows):
        return table, pos, []
    out: list[BadRecord] = []
    taken: list[int] = []
    for row, rec in zip(rows, table.take(pa.array(rows)).to_pylist(), strict=True):
        cells = [(c, _first_mark(v, codec)) for c, v in rec.items() if v and _MARK_OPEN in v]
        cells = [(c, h) for c, h in cells if h is not None]
        if not cells:
            continue  # a genuine U+FDD0 in the data, not a marker token
        record = {c: None if v is None else _unmark(v) for c, v in rec.items()}
        reason = "；".join(_undecodable_reason(off, seq, family, _label(labels, c)) for c, (off, seq) in cells)
        out.append(BadRecord(int(pos[row]), json.dumps(record, ensure_ascii=False), reason,
                             "delivery.encoding_undecodable", cells[0][0], record))  # fmt: skip
        taken.append(int(row))
    if not taken:
        return table, pos, []
    keep = np.ones(table.num_rows, dtype=bool)
    keep[taken] = False
    return table.filter(pa.array(keep)), pos[keep], out


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _jsonl_undecodable(number: int, raw: bytes, offset: int, seq: bytes, labels: dict[str, str] | None) -> BadRecord:
    """A JSON line holding invalid UTF-8: the field is the first key whose value holds the bad bytes, if it parses."""
    field_name = None
    try:
        obj = json.loads(raw.decode("utf-8", errors="zqdata.escape"))
        if isinstance(obj, dict):
            field_name = next(
                (k for k, v in obj.items()
                 if _ESCAPED_RE.search(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))), None,
            )  # fmt: skip
            if field_name is not None and _ESCAPED_RE.search(field_name):
                field_name = None
    except ValueError:
        pass
    label = _label(labels, field_name) if field_name else None
    reason = _undecodable_reason(offset, seq, "utf-8", label, where="行")
    return BadRecord(number, _escaped(raw) or "", reason, "delivery.encoding_undecodable", field_name)


def _lone_surrogate(number: int, text: str, rec: dict, labels: dict[str, str] | None) -> BadRecord | None:
    """A JSON line whose \\uD800-\\uDFFF escape decodes to no character (it would be invalid UTF-8 in DuckDB)."""
    for k, v in rec.items():
        m = _SURROGATE_RE.search(k) or (_SURROGATE_RE.search(v) if isinstance(v, str) else None)
        if m is None:
            continue
        esc = re.search("\\\\u" + f"{ord(m.group()):04x}", text, re.IGNORECASE)
        where = f"，行内字节偏移 {len(text[: esc.start()].encode('utf-8', 'surrogatepass'))}" if esc else ""
        field_name = None if _SURROGATE_RE.search(k) else k
        label = f"字段{_label(labels, k)}" if field_name else "键名"
        reason = (
            f"{label}含无效的 Unicode 转义 \\u{ord(m.group()):04x}（孤立的代理项，不是字符{where}）"
            "(lone surrogate escape: not a character)"
        )
        return BadRecord(number, text, reason, "delivery.encoding_undecodable", field_name)
    return None


def _key_written(name: str, data: bytes) -> bool:
    """``name`` written as an object key (``"name":``) in JSON Lines ``data``; an escaped quote (``\\"``) is no key."""
    return re.search(rb'(?<!\\)' + re.escape(json.dumps(name).encode()) + rb"\s*:", data) is not None


def read_jsonl_chunks(
    path: Path, batch_rows: int, fields: list[str], labels: dict[str, str] | None = None
) -> Iterator[Chunk]:
    """JSON Lines records in bounded batches; fast path pyarrow, per-line fallback only for a chunk with a bad line.

    pyarrow's JSON reader accepts invalid UTF-8 as is: each block is validated first (vectorized), and a line holding
    an invalid byte sequence is reported as a BadRecord (field and byte offset) instead of being parsed.
    """
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
        if not _valid_utf8(block):
            found = invalid_utf8_rows(pa.array(lines, pa.binary()))
            drop = np.zeros(len(lines), dtype=bool)
            undecodable = []
            for i, off, seq in found:
                drop[i] = True
                undecodable.append(_jsonl_undecodable(int(nums[i]), lines[i], off, seq, labels))
            if undecodable:
                yield Chunk(pa.table({}), np.array([], dtype=np.int64), undecodable)
                lines = [ln for ln, d in zip(lines, drop, strict=True) if not d]
                nums = nums[~drop]
            if not lines:
                continue
        data = b"\n".join(lines) + b"\n"
        try:
            table = pajson.read_json(
                pa.BufferReader(data),
                read_options=pajson.ReadOptions(block_size=64 << 20),
                parse_options=options,
            )
            # explicit_schema adds absent registered keys as null columns; keep only keys that occur in the block: a
            # column with a value (its key may be written escaped), or one written as a key with null values only
            # (`"field":`, not merely the text "field" as some value)
            keys = [f for f in fields if table.column(f).null_count < table.num_rows or _key_written(f, data)]
            table = table.select([c for c in table.column_names if c not in fields or c in keys])
            # (a \\uDC80-style escape must not come out as invalid UTF-8 either: then the slow path decides per line)
            if table.num_rows == len(lines) and not any(invalid_utf8_rows(c) for c in table.columns):
                for off in range(0, table.num_rows, batch_rows):
                    yield Chunk(_as_text(table.slice(off, batch_rows)), nums[off : off + batch_rows])
                continue
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
        # Slow path for this block only: per-line parsing finds which records are broken (or mixed-typed).
        records: list[dict] = []
        good: list[int] = []
        bad: list[BadRecord] = []
        for num, raw in zip(nums.tolist(), lines, strict=True):
            text = raw.decode("utf-8", errors="backslashreplace")
            try:
                obj = json.loads(text)
            except ValueError:
                bad.append(BadRecord(num, text, "JSON 行无法解析（记录不完整，文件可能被截断）(not valid JSON: incomplete)"))
                continue
            if not isinstance(obj, dict):
                kind = {list: "数组 array", str: "字符串 string", bool: "布尔值 boolean"}.get(type(obj), "数值或 null")
                bad.append(BadRecord(num, text, f"JSON 行是{kind}，不是对象：每行须为一个 JSON 对象 (not an object)",
                                     incomplete=False))
                continue
            rec = {k: (v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)) for k, v in obj.items()}
            lone = _lone_surrogate(num, text, rec, labels)
            if lone is not None:
                bad.append(lone)
                continue
            records.append(rec)
            good.append(num)
        keys = list(dict.fromkeys(k for r in records for k in r))
        table = pa.table({k: pa.array([r.get(k) for r in records], pa.string()) for k in keys})
        yield Chunk(table, np.array(good, dtype=np.int64), bad)


def read_parquet_chunks(path: Path, batch_rows: int, labels: dict[str, str] | None = None) -> Iterator[Chunk]:
    """Parquet records in bounded batches, every column cast to text.

    pyarrow reads a string column's bytes without checking them: each text/binary column is validated per batch
    (vectorized), and a row holding invalid UTF-8 is reported as a BadRecord naming the column and byte offset.
    """
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileUnreadable(f"Parquet 文件无法读取（文件损坏或被截断）：{exc}") from exc
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            nums = np.arange(number + 1, number + batch.num_rows + 1, dtype=np.int64)
            number += batch.num_rows
            table = pa.Table.from_batches([batch])
            cells: dict[int, list[tuple[str, int, bytes]]] = {}
            for name, col in zip(table.column_names, table.columns, strict=True):
                for row, off, seq in invalid_utf8_rows(col):
                    cells.setdefault(row, []).append((name, off, seq))
            bad: list[BadRecord] = []
            if cells:
                rows = sorted(cells)
                subset = table.take(pa.array(rows))
                values = {name: _escaped_pylist(subset[name]) for name in subset.column_names}
                for k, row in enumerate(rows):
                    record = {name: values[name][k] for name in subset.column_names}
                    reason = "；".join(_undecodable_reason(off, seq, "utf-8", _label(labels, c)) for c, off, seq in cells[row])
                    bad.append(BadRecord(int(nums[row]), json.dumps(record, ensure_ascii=False), reason,
                                         "delivery.encoding_undecodable", cells[row][0][0], record))  # fmt: skip
                keep = np.ones(len(nums), dtype=bool)
                keep[rows] = False
                table, nums = table.filter(pa.array(keep)), nums[keep]
            yield Chunk(_as_text(table), nums, bad)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
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
    policy: QualityPolicy | None = None
    findings: list[dict] = field(default_factory=list)
    normalized: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)  # (file, field, case) -> [n, row]
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
    """Per quarantined batch position: (reason, rule, dimension, field); and all failures (one per rule and record),
    with their severity and whether the value is nulled (an invalid optional field: the record is kept)."""
    fails = contracts.failing_rows(ctx.schema, frame)
    if fails.empty:
        return {}, fails.assign(rule=[], dimension=[], detail=[], severity=[], nulls=[])
    order = {name: i for i, name in enumerate(ctx.ds.field_names)}
    fails = fails.assign(_o=fails["field"].map(order)).sort_values(["index", "_o", "check"], kind="stable")
    infos = [ctx.rules[(f, c)] for f, c in zip(fails["field"], fails["check"], strict=True)]
    texts = [
        i.reason + ("" if i.rule == "contract.required" else f"：'{v}'") for i, v in zip(infos, fails["value"], strict=True)
    ]
    nulled = _policy(ctx).case("invalid_optional").severity
    fails = fails.assign(rule=[i.rule for i in infos], dimension=[i.dimension for i in infos], detail=texts,
                         severity=[nulled if i.nulls else "error" for i in infos], nulls=[i.nulls for i in infos])
    # one entry per quarantined record: every reason joined in field order, the first failure's rule/dimension/field
    # (grouped in one pass: a Python loop over groups cost ~5 s per 7 M-row delivery with 1 % defects)
    hard = fails[~fails["nulls"].astype(bool)]
    if hard.empty:
        return {}, fails
    by_row = hard.groupby("index", sort=False)
    details = by_row["detail"].agg("；".join)
    first = by_row[["rule", "dimension", "field"]].first()
    per_row = {
        int(idx): (detail, rule, dim, fld)
        for idx, detail, rule, dim, fld in zip(details.index, details.to_numpy(), first["rule"].to_numpy(),
                                               first["dimension"].to_numpy(), first["field"].to_numpy(), strict=True)
    }
    return per_row, fails


EMPTY_COLUMN_NAME = "（空列名 empty column name）"


def odd_column_names(names: list[str]) -> list[str]:
    """The delivered column names the warehouse cannot tell apart, in file order: an empty name (shown as
    `EMPTY_COLUMN_NAME`), a name given twice, a name equal to an earlier one but for case (DuckDB ignores case)."""
    out: list[str] = []
    seen: set[str] = set()
    for n in names:
        odd = EMPTY_COLUMN_NAME if not n.strip() else (n if n.lower() in seen else None)
        if odd is not None and odd not in out:
            out.append(odd)
        seen.add(n.lower())
    return out


def _raw_records(table: pa.Table) -> pa.Array | None:
    """Each record as the JSON object of its delivered columns. DuckDB builds it (`to_json(struct_pack(...))`) unless a
    name it cannot take is among them (`odd_column_names`): then Python, keys as delivered (a repeated one twice)."""
    names = table.column_names
    if not odd_column_names(names):
        return None  # the caller's DuckDB path
    keys = [json.dumps(n, ensure_ascii=False) for n in names]
    columns = [c.to_pylist() for c in table.columns]

    def record(i: int) -> str:
        return "{" + ", ".join(f"{k}: {json.dumps(col[i], ensure_ascii=False, default=str)}"
                               for k, col in zip(keys, columns)) + "}"

    return pa.array([record(i) for i in range(table.num_rows)], pa.string())


def _load_chunk(ctx: _Ctx, chunk: Chunk, key: str, name: str, file_reason: str | None) -> None:
    """Append one chunk to the per-file staging table, with the contract result (or the file-level reason) per record."""
    fields = ctx.ds.field_names
    n = chunk.table.num_rows
    table = chunk.table
    extra = [c for c in table.column_names if c not in fields]
    need_raw = file_reason is not None or bool(extra)
    names = table.column_names
    cols = {f: (table.column(names.index(f)) if f in names else pa.nulls(n, pa.string())) for f in fields}
    reasons: list[str | None] = [None] * n
    rules: list[str | None] = [None] * n
    dims: list[str | None] = [None] * n
    flds: list[str | None] = [None] * n
    if file_reason is None and n:
        frame = pa.table(cols).to_pandas()
        per_row, fails = _contract_failures(ctx, frame)
        for i, (reason, rule, dim, fld) in per_row.items():
            reasons[i], rules[i], dims[i], flds[i] = reason, rule, dim, fld
        kept = np.ones(n, dtype=bool)
        kept[list(per_row)] = False
        soft = fails[fails["nulls"].astype(bool)] if not fails.empty else fails
        for fname in set(soft["field"]) if not soft.empty else ():  # invalid optional values of kept records: nulled
            idx = soft.loc[soft["field"] == fname, "index"].to_numpy(dtype=np.int64)
            mask = np.zeros(n, dtype=bool)
            mask[idx[kept[idx]]] = True
            cols[fname] = pc.if_else(pa.array(mask), pa.nulls(n, pa.string()), cols[fname])
        cols = _normalize(ctx, cols, kept, chunk.row_numbers, key)
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
                        "severity": pa.array(fails["severity"].tolist(), pa.string()),
                    }
                ),
            )
            ctx.con.execute(
                "insert into _zq_findings select ?, ?, ?, 'pandera', rule, dimension, severity, ?, row_number, "
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
        raw = _raw_records(table)
        if raw is None:
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
                "_row_number": pa.array([b.number for b in chunk.bad], pa.int32()),
                "_raw": pa.array(
                    [json.dumps(b.record if b.record is not None else {"_raw_text": b.text}, ensure_ascii=False)
                     for b in chunk.bad], pa.string(),
                ),  # fmt: skip
                "_reason": pa.array([b.reason for b in chunk.bad], pa.string()),
                "_rule": pa.array([b.rule for b in chunk.bad], pa.string()),
                "_dimension": pa.array([DELIVERY_RULES[b.rule][0] for b in chunk.bad], pa.string()),
                "_field": pa.array([b.field for b in chunk.bad], pa.string()),
            }
        )
        staged = pa.concat_tables([staged, bad_rows])
        if file_reason is None:
            for b in chunk.bad:  # record-level findings (row_number set): counted per record, not per file
                _finding(ctx, b.rule, f"第 {b.number} 条记录：{b.reason}", key, b.field)
                ctx.findings[-1].update(row_number=b.number, lineage_id=f"{prefix}{b.number}")
    ctx.con.register("_zq_s", staged)
    ctx.con.execute("insert into _zq_rows select * from _zq_s")
    ctx.con.unregister("_zq_s")


def _policy(ctx: _Ctx) -> QualityPolicy:
    if ctx.policy is None:
        ctx.policy = load_quality_policy()
    return ctx.policy


def _normalize(ctx: _Ctx, cols: dict, kept: np.ndarray, row_numbers: np.ndarray, key: str) -> dict:
    """The kept records' values in their standard spelling (trimmed; accepted typed spellings rewritten), each change
    counted per field and policy case in ``ctx.normalized`` (quality.normalizations), never as a finding."""
    if not kept.any():
        return cols
    keep_arr = pa.array(kept)
    out = dict(cols)
    for f in ctx.ds.fields:
        col = cols[f.name]
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        kind = contracts.field_kind(f)
        fixed = standards.normalize_text(arr, kind)
        changed = pc.and_kleene(pc.not_equal(fixed, arr), keep_arr).fill_null(False)
        if not pc.any(changed).as_py():
            continue
        trimmed = pc.utf8_trim_whitespace(arr)
        respelled = pc.and_kleene(changed, pc.not_equal(fixed, trimmed)).fill_null(False)
        for case, mask in (("accepted_form", respelled), ("whitespace", pc.and_kleene(changed, pc.invert(respelled)))):
            m = mask.to_numpy(zero_copy_only=False)
            if m.any():
                slot = ctx.normalized.setdefault((key, f.name, case), [0, int(row_numbers[np.argmax(m)])])
                slot[0] += int(m.sum())
        out[f.name] = pc.if_else(changed, fixed, arr)
    return out


def _normalization_rows(ctx: _Ctx) -> list[dict]:
    rows = []
    for (key, fname, case), (count, first) in sorted(ctx.normalized.items()):
        f = ctx.ds.field(fname)
        kind = contracts.field_kind(f)
        what = ("去除首尾空白 (trimmed)" if case == "whitespace"
                else f"改写为标准写法 {_policy(ctx).accepted_forms.get(kind, ['-'])[0]} (rewritten to the standard form)")
        rows.append({
            "partition_date": ctx.day, "agency": ctx.agency, "dataset": ctx.ds.code, "delivery_file": key,
            "field": fname, "kind": kind, "policy_case": case, "dimension": "standardization",
            "values_normalized": count, "first_row_number": first,
            "detail": f"字段「{f.cn_name}」({fname}) {count} 个值已规范化：{what}，值保留，不计为问题 (normalized, kept)",
        })  # fmt: skip
    return rows


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
            "case when _rule in ('delivery.malformed_record', 'delivery.encoding_undecodable') then ? || '；' || _reason "
            "else ? end, ?, ?, NULL "
            "from _zq_rows",
            [*params, reason, reason, rule, dimension],
        )
        ctx.con.execute("delete from _zq_findings where delivery_file = ?", [key])
        for k in [k for k in ctx.normalized if k[0] == key]:  # nothing of a quarantined file was stored
            del ctx.normalized[k]
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


def _worse(status: str, severity: str) -> str:
    """A file status raised to a finding's severity (ok < warn < error); other statuses (quarantined, duplicate …) stay."""
    if status not in _SEVERITY_RANK:
        return status
    return severity if _SEVERITY_RANK[severity] > _SEVERITY_RANK[status] else status


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
        else:  # the file's status says the worst severity of its findings (issue 12, finding 8)
            rep.status = _worse(rep.status, DELIVERY_RULES[rule][1])

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
            sniff: CsvEncoding | None = None
            if fmt == "csv":
                sniff = detect_csv_encoding(path, declared)
                detected = sniff.encoding
                if detected is None:
                    detail = (
                        f"文件编码无法识别：{name} 的 {sniff.lines} 行中有 {sniff.bad_lines} 行既不是有效的 UTF-8 也不是 GBK 编码，"
                        "整个文件隔离 (undecodable: most lines are neither UTF-8 nor GBK)"
                    )
                    problem("delivery.encoding_undecodable", detail, "quarantined" if file_reason is None else None)
                    file_reason = file_reason or (detail, "delivery.encoding_undecodable", "standardization")
                else:
                    # a pure-ASCII file is the same bytes in UTF-8 and GBK: not a mismatch (the BOM is not content)
                    ascii_only = _decodes_as(path, "ascii", 3 if sniff.bom else 0)
                    mismatch = sniff.family != encoding_family(declared) and not ascii_only
                    if sniff.bom and (sniff.family == "gbk" or (ascii_only and encoding_family(declared) == "gbk")):
                        # The contract allows a BOM; the content decides. A UTF-8 signature on GBK content is said,
                        # not held against the file: the BOM is stripped and the records decoded as GBK.
                        problem("delivery.encoding_mismatch", (
                            f"文件以 UTF-8 BOM（EF BB BF）开头，但内容为 GBK 编码"
                            f"{'，与清单/登记声明的 ' + declared + ' 不一致' if mismatch else '（与声明一致）'}："
                            "已去除 BOM，按 GBK 解码入库 (UTF-8 BOM on GBK content: BOM stripped, decoded as GBK)"
                        ))  # fmt: skip
                    elif mismatch:
                        problem("delivery.encoding_mismatch", f"文件实际编码为 {detected}，清单/登记声明为 {declared}")
            labels = {f.name: f"「{f.cn_name}」({f.name})" for f in ctx.ds.fields}
            try:
                if fmt == "csv":
                    chunks = read_csv_chunks(path, detected or "replace", batch_rows, sniff, labels)
                elif fmt == "jsonl":
                    chunks = read_jsonl_chunks(path, batch_rows, ctx.ds.field_names, labels)
                else:
                    chunks = read_parquet_chunks(path, batch_rows, labels)
                seen_columns: list[str] = []
                odd: list[str] = []  # names the warehouse cannot tell apart (`odd_column_names`)
                last_bad = 0
                count = 0
                undecodable = 0
                for chunk in chunks:
                    for c in chunk.table.column_names:
                        if c not in seen_columns:
                            seen_columns.append(c)
                    odd += [c for c in odd_column_names(chunk.table.column_names) + odd_column_names(seen_columns)
                            if c not in odd]
                    # CSV/parquet know their columns from the first chunk: decide the file-level contract before rows.
                    if file_reason is None and fmt != "jsonl" and count == 0:
                        file_reason = _column_reason(ctx, seen_columns, obj.key, rep, odd)
                    count += chunk.table.num_rows + len(chunk.bad)
                    last_bad = max([last_bad, *(b.number for b in chunk.bad
                                                if b.rule == "delivery.malformed_record" and b.incomplete)])
                    undecodable += sum(b.rule == "delivery.encoding_undecodable" for b in chunk.bad)
                    _load_chunk(ctx, chunk, obj.key, name, file_reason[0] if file_reason else None)
                if file_reason is None and fmt == "jsonl" and count:
                    file_reason = _column_reason(ctx, seen_columns, obj.key, rep, odd)
                if count == 0 and size > 0:
                    problem("delivery.empty_file", f"文件 {name} 没有数据记录（仅有表头或空行）")
                if last_bad and last_bad == count:  # the last record is incomplete (not merely e.g. a JSON array)
                    problem("delivery.truncated_file", f"文件 {name} 最后一条记录（第 {last_bad} 条）不完整，文件可能被截断")
                if undecodable and file_reason is None:
                    # said in meta.deliveries; the findings are per record (a file-level one would hold the gate)
                    rep.errors.append(
                        f"{undecodable} 条记录含无法解码的字节序列，已逐条隔离 ({undecodable} records with undecodable bytes quarantined)"
                    )
                    rep.status = "warn" if rep.status == "ok" else rep.status
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
            problem("delivery.checksum_mismatch", f"清单 sha256 与文件实际摘要不一致：{name}（清单 {entry.sha256}，实际 {sha}）"
                    "(manifest sha256 differs from the file's)")
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


def _column_reason(ctx: _Ctx, columns: list[str], key: str, rep: FileReport,
                   odd: Sequence[str] = ()) -> tuple[str, str, str] | None:
    """The file-level quarantine reason when the column set differs from the registry (missing/extra/renamed), or
    holds names the warehouse cannot tell apart (``odd``: empty, repeated, equal but for case)."""
    missing, extra = contracts.column_problems(ctx.strict_schema, [c for c in columns if c.strip()])
    if not missing and not extra and not odd:
        return None
    detail = contracts.column_problem_reason(missing, extra, [c for c in odd if c not in extra])
    ctx.findings.append(
        {
            "partition_date": ctx.day, "agency": ctx.agency, "dataset": ctx.ds.code, "tool": "pandera",
            "rule": contracts.COLUMN_SET_RULE, "dimension": "understandability", "severity": "error",
            "delivery_file": key, "row_number": None, "lineage_id": None,
            "field": ",".join(dict.fromkeys([*missing, *extra, *odd])), "detail": detail,
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
    soft = _policy(ctx).case("invalid_optional").severity
    rules |= {(r.rule, r.dimension, soft if r.nulls else "error", "pandera") for r in ctx.rules.values()}
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
        registry.quality_policy,
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
        con.execute("delete from quality.normalizations where partition_date = ? and dataset = ?", [day, ds.code])
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
                    rule = "delivery.manifest_invalid" if manifest_error else "delivery.manifest_missing"
                    rep.status = _worse(rep.status, DELIVERY_RULES[rule][1])
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
        arrived = arrival_time(store.list(prefix))  # one listing of the folder: the facts the agency cannot forge
        for row in ctx.deliveries:
            row["arrived_at"] = arrived
        _insert_rows(con, "meta.deliveries", list(DELIVERY_COLUMNS), ctx.deliveries)
        _insert_rows(con, "quality.normalizations", list(NORMALIZATION_COLUMNS), _normalization_rows(ctx))
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
