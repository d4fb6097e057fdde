"""The landing contract: where an agency delivers a dataset's files for a day, and the manifest that describes them.

Layout: ``<agency>/<dataset>/<YYYY-MM-DD>/part-NNNN.<csv|jsonl|parquet>`` plus ``_manifest.json`` written last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from zqdata.settings import TZ
from zqdata.storage import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from zqdata.registry import Registry

MANIFEST_NAME = "_manifest.json"
FileFormat = Literal["csv", "jsonl", "parquet"]
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    format: FileFormat
    encoding: str = "utf-8"
    record_count: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agency: str
    dataset: str
    partition_date: dt.date
    extracted_at: dt.datetime
    delivered_at: dt.datetime | None = None
    files: list[ManifestFile]

    @field_validator("extracted_at", "delivered_at")
    @classmethod
    def _aware(cls, v: dt.datetime | None) -> dt.datetime | None:
        # Agencies deliver Beijing time; a naive timestamp is read as Asia/Shanghai, never as UTC.
        return v.replace(tzinfo=TZ) if v is not None and v.tzinfo is None else v


def delivery_prefix(agency: str, dataset: str, day: dt.date) -> str:
    """The delivery folder of a dataset for a day, e.g. ``samr/enterprise_registry/2025-05-01/``."""
    return f"{agency}/{dataset}/{day.isoformat()}/"


def manifest_key(agency: str, dataset: str, day: dt.date) -> str:
    return delivery_prefix(agency, dataset, day) + MANIFEST_NAME


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_delivery(
    store: ObjectStore,
    agency: str,
    dataset: str,
    day: dt.date,
    files: list[tuple[str, bytes, str, str, int]],
    extracted_at: dt.datetime,
    delivered_at: dt.datetime | None,
    replace: bool = True,
) -> Manifest:
    """Write a delivery: data files first, ``_manifest.json`` last (its presence means the delivery is complete).

    ``files`` are ``(name, data, format, encoding, record_count)``; the sha256 is computed here. With ``replace`` the
    day's folder is emptied first (manifest removed before anything else) so a re-delivery leaves no stale files.
    """
    prefix = delivery_prefix(agency, dataset, day)
    if replace:
        store.delete_prefix(prefix + MANIFEST_NAME)
        store.delete_prefix(prefix)
    entries: list[ManifestFile] = []
    for name, data, fmt, encoding, record_count in files:
        if "/" in name or name == MANIFEST_NAME:
            raise ValueError(f"非法交付文件名 invalid delivery file name: {name!r}")
        store.put_bytes(prefix + name, data)
        entries.append(
            ManifestFile(name=name, format=fmt, encoding=encoding, record_count=record_count, sha256=sha256_hex(data))
        )
    manifest = Manifest(
        agency=agency,
        dataset=dataset,
        partition_date=day,
        extracted_at=extracted_at,
        delivered_at=delivered_at,
        files=entries,
    )
    store.put_bytes(prefix + MANIFEST_NAME, manifest.model_dump_json(indent=1).encode("utf-8"))
    return manifest


def read_manifest(store: ObjectStore, agency: str, dataset: str, day: dt.date) -> Manifest | None:
    """The day's manifest, or None when absent. An unreadable manifest raises ``ValueError`` with the reason."""
    key = manifest_key(agency, dataset, day)
    if not store.exists(key):
        return None
    raw = store.get_bytes(key)
    try:
        return Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise ValueError(f"清单文件无法解析 manifest {key} is invalid: {exc}") from exc


def try_read_manifest(store: ObjectStore, agency: str, dataset: str, day: dt.date) -> tuple[Manifest | None, str | None]:
    """``(manifest, problem)``: the manifest or None when absent, and the reason when it is present but unreadable.

    For callers that must go on with a bad manifest (the landing step reports it; ingestion quarantines/records it)."""
    try:
        return read_manifest(store, agency, dataset, day), None
    except ValueError as exc:
        return None, str(exc).splitlines()[0]


def arrival_time(objects: list[ObjectInfo]) -> dt.datetime | None:
    """When a delivery arrived according to the object store: the latest LastModified (file mtime / S3 LastModified)
    of its objects, data files and manifest. Unlike the manifest's ``delivered_at`` the agency does not write it."""
    return max((o.last_modified for o in objects), default=None)


def delivery_arrival(store: ObjectStore, agency: str, dataset: str, day: dt.date) -> dt.datetime | None:
    """The arrival time of a day's delivery (see ``arrival_time``); None when the folder is empty or absent."""
    return arrival_time(store.list(delivery_prefix(agency, dataset, day)))


def set_simulated_arrival(store: ObjectStore, agency: str, dataset: str, day: dt.date, when: dt.datetime) -> bool:
    """Simulation only: give a simulated delivery's files the arrival time the simulator chose (its manifest's
    ``delivered_at``), as if the agency had delivered then. Possible for the local store only (file mtime); S3 sets
    LastModified itself. Returns whether the times were set."""
    import os

    from zqdata.storage import LocalObjectStore

    if not isinstance(store, LocalObjectStore):
        return False
    stamp = when.timestamp()
    for obj in store.list(delivery_prefix(agency, dataset, day)):
        os.utime(store.root / obj.key, (stamp, stamp))
    return True


def future_delivery_days(store: ObjectStore, agency: str, dataset: str, today: dt.date) -> list[dt.date]:
    """Delivery folders dated after ``today`` (Asia/Shanghai): data that cannot exist yet, never a partition to ingest."""
    return [d for d in list_delivery_days(store, agency, dataset) if d > today]


def list_delivery_files(store: ObjectStore, agency: str, dataset: str, day: dt.date) -> list[ObjectInfo]:
    """The data files of a day's delivery (everything in the folder except the manifest), sorted by key."""
    prefix = delivery_prefix(agency, dataset, day)
    return [o for o in store.list(prefix) if o.key[len(prefix) :] != MANIFEST_NAME]


def list_delivery_days(store: ObjectStore, agency: str, dataset: str) -> list[dt.date]:
    """The days that have a delivery folder (with or without manifest) for a dataset, ascending."""
    base = f"{agency}/{dataset}/"
    days: set[dt.date] = set()
    for obj in store.list(base):
        part = obj.key[len(base) :].split("/", 1)[0]
        if _DAY_RE.match(part):
            try:
                days.add(dt.date.fromisoformat(part))
            except ValueError:
                continue
    return sorted(days)


_TYPE_CN = {"string": "文本", "integer": "整数", "decimal": "小数", "date": "日期", "timestamp": "时间戳",
            "year_month": "年月（文本字段，格式 year_month）"}
_SEVERITY_CN = {"none": "无（不产生问题，仅计数）", "warn": "警告 warn", "error": "错误 error"}
_ACTION_CN = {"normalize": "规范化，值保留", "trim": "去除首尾空白，值保留", "null_value": "该字段置空，记录保留",
              "quarantine_record": "记录隔离"}


def _policy_lines(registry: "Registry") -> list[str]:
    """The field-type and severity-policy sections, rendered from registry/quality_policy.yaml."""
    policy = registry.quality_policy
    lines = [
        "## 字段类型 Field types",
        "",
        "| 类型 | 接受的写法（入库时规范化为第一种标准写法，计入 quality.normalizations，不产生问题） |",
        "|---|---|",
        "| string 文本 | 去除首尾空白后保存 (trimmed) |",
        *[f"| {t} {_TYPE_CN[t]} | {', '.join(f'`{x}`' for x in forms)} |" for t, forms in policy.accepted_forms.items()],
        "",
        "## 处置策略 Severity policy",
        "",
        "<!-- rendered from registry/quality_policy.yaml -->",
        "",
        "| 情形 case | 处置 action | 严重度 severity | 记录于 recorded in |",
        "|---|---|---|---|",
        *[f"| {_cell(c.cn)} ({_cell(c.en)}) | {_ACTION_CN[c.action]} (`{c.action}`) | {_SEVERITY_CN[c.severity]} | "
          f"`{c.recorded_in}` |" for c in policy.cases],
        "",
        "严重度为“无”的情形不产生发现，不向数源单位登记问题；按文件、字段计数。可选字段的格式（手机号码、公民身份号码、统一社会信用代码）"
        "与年月在入库时校验；必填字段的校验位、代码表等规则由 dbt 执行。"
        "Cases of severity none create no finding and file no issue; they are counted per file and field.",
        "",
    ]
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_landing_docs(registry: "Registry") -> str:
    """The landing contract as Markdown with one schema table per registry dataset (committed as docs/landing_contract.md)."""
    lines = [
        "# 数据交付规范 Landing contract",
        "",
        "<!-- Generated by zqdata.landing.render_landing_docs(registry); do not edit by hand. -->",
        "",
        "各数源单位每天将前一日（北京时间）的数据交付到落地区。Each source agency delivers one folder per dataset and day.",
        "",
        "```",
        "<agency>/<dataset>/<YYYY-MM-DD>/part-0001.<csv|jsonl|parquet>",
        f"<agency>/<dataset>/<YYYY-MM-DD>/{MANIFEST_NAME}      (written last: its presence completes the delivery)",
        "```",
        "",
        "## 清单 Manifest",
        "",
        "| 字段 field | 说明 |",
        "|---|---|",
        "| `agency`, `dataset` | 单位代码、数据集代码 |",
        "| `partition_date` | 数据所属日期 (YYYY-MM-DD) |",
        "| `extracted_at`, `delivered_at` | 抽取、交付时间（ISO 8601，带时区，北京时间） |",
        "| `files[]` | `name`, `format` (csv/jsonl/parquet), `encoding` (utf-8/gbk), "
        "`record_count`（CSV 为表头后的行数，JSONL 为行数，Parquet 为行数）, `sha256`（文件字节的十六进制摘要） |",
        "",
        "## 文件格式 File formats",
        "",
        "- CSV：首行为表头，列名与下表字段名一致（顺序不限）；编码 UTF-8 或 GBK（清单 `encoding` 声明），可带 UTF-8 BOM"
        "（EF BB BF）；RFC 4180 引号规则。BOM 入库时去除，不单独决定编码：以内容为准（先按 UTF-8，再按 GBK 解码）；"
        "实际编码与声明不符（包括 GBK 内容带 UTF-8 BOM）照常入库，记录警告。"
        "A BOM is stripped; the content decides the encoding; a mismatch with the declaration is a warning.",
        "- JSON Lines：UTF-8 编码，每行一个 JSON 对象，键为字段名；值保存为文本。不是对象的行（数组、字符串等）单独隔离。",
        "- Parquet：列名为字段名；任何类型的列均按文本保存；文本、二进制列须为有效 UTF-8。",
        "- 无法解码的字节 undecodable bytes：任何格式中，某条记录含无法按文件编码解码的字节序列（JSON 中含 `\\uD800`–`\\uDFFF` "
        "孤立代理项转义亦同）时，仅隔离该记录，原因注明字段与字节偏移，其余记录照常入库。"
        "A record holding an undecodable byte sequence is quarantined on its own (reason: field and byte offset).",
        "- 缺列、多列、改名列：整个文件隔离（交付级问题）。Missing, extra or renamed columns quarantine the whole file.",
        "",
        "## 交付级检查 Delivery-level checks (ingestion)",
        "",
        "| 检查 | 结果 |",
        "|---|---|",
        "| 清单缺失 manifest missing | 记录错误，文件照常入库并核对，文件状态 `error`（状态即最严重发现的严重度） |",
        "| 清单记录数与实际不符 record_count mismatch | 记录错误，文件状态 `error` |",
        "| 清单 sha256 与实际不符 checksum mismatch | 记录错误（列出两个完整摘要），文件状态 `error` |",
        "| 空文件、截断文件、无法解码 empty / truncated / undecodable | 该文件记录错误，可读出的行进入隔离区"
        "（无法解码指多数行既非 UTF-8 也非 GBK；个别记录无法解码时仅隔离该记录） |",
        "| 同一文件重复交付 same content twice | 保留首次，重复文件的行以“重复交付”隔离 |",
        "| 交付日期在未来 future partition | 拒绝 |",
        "| 应交未交 expected but absent | meta.deliveries 状态 `missing` |",
        "",
        *_policy_lines(registry),
        "## 数据集 Datasets",
    ]
    for code in sorted(registry.datasets):
        ds = registry.datasets[code]
        agency = registry.agencies[ds.agency]
        d = ds.delivery
        lines += [
            "",
            f"### {ds.name} `{ds.code}`",
            "",
            f"{_cell(ds.description)}",
            "",
            f"- 数源单位 agency: {agency.name} (`{agency.code}`)",
            f"- 交付 delivery: `{d.format}`, 编码 `{d.encoding}`, 时限 T+{d.sla_hours} 小时 (hours after the day ends)",
            f"- 路径 path: `{delivery_prefix(agency.code, ds.code, dt.date(2025, 5, 1)).replace('2025-05-01', 'YYYY-MM-DD')}`",
            f"- 主键 primary key: {', '.join(f'`{k}`' for k in ds.primary_key)}; 业务时间 event time: `{ds.event_time_field}`",
            "",
            "| 字段 field | 中文名 | 类型 type | 必填 required | 格式/代码表 | 说明 |",
            "|---|---|---|---|---|---|",
        ]
        for f in ds.fields:
            extra = ", ".join(x for x in (f.format or "", f"code_table: {f.code_table}" if f.code_table else "") if x)
            lines.append(
                f"| `{f.name}` | {_cell(f.cn_name)} | {f.type} | {'是' if f.required else '否'} | {_cell(extra)} | "
                f"{_cell(f.description)} |"
            )
    return "\n".join(lines) + "\n"


def write_landing_docs() -> None:
    """Re-render ``docs/landing_contract.md`` from the registry (run after changing the registry)."""
    from zqdata.registry import load_registry
    from zqdata.settings import repo_root

    (repo_root() / "docs" / "landing_contract.md").write_text(render_landing_docs(load_registry()), encoding="utf-8")
