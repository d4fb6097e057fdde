"""Deterministic simulator of the source agencies' daily deliveries, with defect injection and a ground-truth file.

Every value is a function of (seed, day, dataset, row), so the same inputs give byte-identical files. Enterprises, persons,
meters and bus cards form a stable universe (a function of seed and size), so pseudonyms stay stable across days. Columns
are built with numpy/pyarrow per chunk of at most ``CHUNK_ROWS`` rows (one part file each); only the few defective values
are touched in Python.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import random
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from zqdata import standards
from zqdata.landing import MANIFEST_NAME, Manifest, ManifestFile, delivery_prefix, set_simulated_arrival, sha256_hex
from zqdata.quality.dimensions import DIMENSION_KEYS
from zqdata.reference import field_rules
from zqdata.registry import Dataset, Registry
from zqdata.settings import TZ, get_settings
from zqdata.storage import ObjectStore

CHUNK_ROWS = 1_000_000  # rows per part file: bounds memory and lets ingestion read files in parallel
EXTRA_COLUMN = "remark"  # the unregistered column of the extra_column delivery defect
BOM = b"\xef\xbb\xbf"  # the UTF-8 signature of the gbk_with_bom delivery defect
UNDECODABLE_RECORDS = 3  # records per delivery that get an undecodable byte sequence (undecodable_bytes)
# Invalid in UTF-8 and in GBK alike (no lead byte, or a lead byte without its trail byte): whatever the file's
# encoding, no codec decodes them, so ingestion must quarantine the record rather than guess another encoding.
UNDECODABLE_SEQUENCES = (b"\xff", b"\x80", b"\xc3\x28")
REFERENCE_DATASET = "enterprise_registry"  # the daily full snapshot other enterprise datasets must agree with

_EXT = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}
_U64 = np.uint64


# ---------------------------------------------------------------- defect catalogue


@dataclass(frozen=True)
class DefectKind:
    key: str
    dimension: str
    # "row": injected at the defect rate; "delivery": only when named (kind or kind:dataset), into one dataset's
    # delivery. A delivery-level kind may still name records in the ground truth (undecodable_bytes).
    level: str
    description: str
    # "row": a rule names the defective record; "dataset": an expectation over the whole partition finds it (GX,
    # dataset-level finding), while the ground truth still names the record that was changed; "normalization": an
    # accepted spelling (registry quality_policy, severity none) that ingestion normalizes and counts per file and
    # field in quality.normalizations instead of filing a finding; "accepted": a delivery the landing contract allows
    # (every record lands, nothing error-level, no record-level finding), the ground truth names the file to check
    found_by: str = "row"


DEFECT_KINDS: dict[str, DefectKind] = {
    k.key: k
    for k in [
        DefectKind("citizen_id_check_char", "accuracy", "row", "公民身份号码校验码错误"),
        DefectKind("citizen_id_birth_date", "accuracy", "row", "公民身份号码出生日期不存在（校验码正确）"),
        DefectKind("uscc_check_char", "accuracy", "row", "统一社会信用代码校验码错误（告警级规则）"),
        DefectKind("invalid_mobile", "accuracy", "row", "手机号码不合规"),
        DefectKind("district_not_zhaoqing", "accuracy", "row", "行政区划代码不在肇庆市 GB/T 2260 代码表内"),
        DefectKind("out_of_range", "accuracy", "row", "数值超出登记的取值范围或为负"),
        DefectKind("required_empty", "completeness", "row", "必填字段为空"),
        DefectKind("nonstandard_format", "standardization", "row", "日期/时间为可解析的非标准格式，如 2025/05/01",
                   found_by="normalization"),
        DefectKind("unparseable_value", "standardization", "row", "日期/数值无法解析"),
        DefectKind("fullwidth_digits", "standardization", "row", "数值使用全角数字"),
        DefectKind("credit_code_not_in_registry", "consistency", "row", "统一社会信用代码不在当日企业登记快照中"),
        DefectKind("district_mismatch", "consistency", "row", "区县代码与企业登记不一致"),
        DefectKind("duplicate_primary_key", "consistency", "row", "主键重复（后一行复制前一行）"),
        DefectKind("event_time_outside_day", "timeliness", "row", "业务时间不在所属分区日内"),
        DefectKind("code_outside_table", "understandability", "row", "代码值不在代码表内，如性别 '0'、状态 '9'"),
        # cross-field rules the national standards give (GB 11643, GB/T 2260) and history plausibility (issue 12)
        DefectKind("id_birth_date_mismatch", "consistency", "row", "出生日期与公民身份号码第 7–14 位编码的出生日期不一致"),
        DefectKind("id_sex_mismatch", "consistency", "row", "性别与公民身份号码第 17 位（奇数男、偶数女）不一致"),
        DefectKind("district_wrong_level", "accuracy", "row", "区县代码字段填写了非区县级的行政区划代码（市级 441200）"),
        DefectKind("implausible_meter_reading", "accuracy", "row",
                   "抄表读数为正常值的 100 倍（单位或小数点错误），与该表前几日的中位数相比不合理（数据集级期望发现）",
                   found_by="dataset"),
        DefectKind("late_delivery", "timeliness", "delivery", "超过交付时限（sla_hours）交付"),
        DefectKind("missing_delivery", "completeness", "delivery", "应交未交"),
        DefectKind("extra_column", "understandability", "delivery", "文件含未登记的列"),
        DefectKind("manifest_count_mismatch", "completeness", "delivery", "清单记录数与文件不符"),
        # hostile deliveries ingestion must survive (issue 12); the dimension is the one ingestion reports them under
        DefectKind("gbk_with_bom", "standardization", "delivery",
                   "清单声明 GBK 的 CSV 以 UTF-8 BOM 开头（契约允许：去除 BOM 按 GBK 入库，记录全部接受，仅一条编码警告）",
                   found_by="accepted"),
        DefectKind("undecodable_bytes", "standardization", "delivery",
                   f"{UNDECODABLE_RECORDS} 条记录的一个文本值含无法解码的字节序列（逐条隔离，原因注明字段与字节偏移）"),
        DefectKind("malformed_manifest", "understandability", "delivery", "清单 _manifest.json 不是有效 JSON 或缺少必需的键"),
        DefectKind("future_folder", "timeliness", "delivery", "另有一份交付写入了日期在未来的目录（数据日期写错）"),
        DefectKind("emptying_redelivery", "completeness", "delivery",
                   "当日重新交付的文件没有数据记录（CSV 仅有表头），替换先前的完整交付：分区应为空"),
    ]
}
ROW_DEFECT_KINDS: tuple[str, ...] = tuple(k for k, v in DEFECT_KINDS.items() if v.level == "row")
DELIVERY_DEFECT_KINDS: tuple[str, ...] = tuple(k for k, v in DEFECT_KINDS.items() if v.level == "delivery")
assert all(k.dimension in DIMENSION_KEYS for k in DEFECT_KINDS.values())
# Delivery formats a delivery-level kind can be injected into (default: every format).
DELIVERY_KIND_FORMATS: dict[str, tuple[str, ...]] = {"gbk_with_bom": ("csv",)}
# Delivery-level kinds that cannot share a dataset's delivery: one would hide the other, or change the ground truth
# of the other (a manifest that cannot be read has no record count to mismatch; a file quarantined for its columns
# files no record-level finding; a delivery that is missing or without records has nothing else to find).
_EXCLUSIVE: dict[str, frozenset[str]] = {
    "gbk_with_bom": frozenset({"missing_delivery", "extra_column", "manifest_count_mismatch", "undecodable_bytes",
                               "malformed_manifest", "emptying_redelivery"}),
    "undecodable_bytes": frozenset({"missing_delivery", "extra_column", "emptying_redelivery"}),
    "malformed_manifest": frozenset({"missing_delivery", "manifest_count_mismatch", "emptying_redelivery"}),
    "future_folder": frozenset({"missing_delivery"}),
    "emptying_redelivery": frozenset({"missing_delivery", "extra_column", "manifest_count_mismatch"}),
}


@dataclass(frozen=True)
class InjectedDefect:
    """One ground-truth line: which record (1-based within its landing file) got which defect."""

    dataset: str
    file: str | None
    row: int | None
    field: str | None
    dimension: str
    kind: str


def ground_truth_path(day: dt.date) -> Path:
    """``<ZQ_DATA_DIR>/ground_truth/<YYYY-MM-DD>.jsonl`` (outside the landing zone)."""
    return get_settings().data_dir / "ground_truth" / f"{day.isoformat()}.jsonl"


def read_ground_truth(day: dt.date) -> list[InjectedDefect]:
    """The defects injected for a day (empty when the day was simulated without defects)."""
    path = ground_truth_path(day)
    if not path.exists():
        return []
    return [InjectedDefect(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _is_reference_uscc(ds: Dataset, name: str) -> bool:
    return ds.primary_key == [name]


def _references_enterprises(ds: Dataset) -> bool:
    """A dataset that names enterprises by credit code and district, which must agree with the enterprise registry."""
    fmts = {f.format for f in ds.fields}
    return ds.code != REFERENCE_DATASET and "uscc" in fmts and "district_code" in fmts


_RULE_OF_KIND = {"id_birth_date_mismatch": "citizen_id_birth_date", "id_sex_mismatch": "citizen_id_sex",
                 "district_wrong_level": "district_level"}


def applicable_fields(kind: str, ds: Dataset) -> list[str]:
    """Fields of ``ds`` that can carry a row-level defect of ``kind`` (read from the registry's field metadata)."""
    fs = ds.fields
    if kind in ("citizen_id_check_char", "citizen_id_birth_date"):
        return [f.name for f in fs if f.format == "citizen_id"]
    if kind == "uscc_check_char":  # elsewhere a bad check char would also break the registry join: two defects in one
        return [f.name for f in fs if f.format == "uscc" and _is_reference_uscc(ds, f.name)]
    if kind == "invalid_mobile":
        return [f.name for f in fs if f.format == "mobile"]
    if kind == "district_not_zhaoqing":
        return [f.name for f in fs if f.format == "district_code"]
    if kind == "out_of_range":
        return [f.name for f in fs if f.range is not None]
    if kind == "required_empty":
        return [f.name for f in fs if f.required]
    if kind == "nonstandard_format":
        return [f.name for f in fs if f.type in ("date", "timestamp")]
    if kind == "unparseable_value":
        return [f.name for f in fs if f.type in ("date", "timestamp", "integer", "decimal")]
    if kind == "fullwidth_digits":
        return [f.name for f in fs if f.type in ("integer", "decimal")]
    if kind == "credit_code_not_in_registry":
        return [f.name for f in fs if f.format == "uscc"] if _references_enterprises(ds) else []
    if kind == "district_mismatch":
        return [f.name for f in fs if f.format == "district_code"] if _references_enterprises(ds) else []
    if kind == "duplicate_primary_key":
        return [",".join(ds.primary_key)]
    if kind == "event_time_outside_day":
        return [ds.event_time_field]
    if kind == "code_outside_table":
        return [f.name for f in fs if f.code_table and f.code_table != standards.DISTRICT_CODE_TABLE]
    if kind == "undecodable_bytes":  # free text (no format, no code table), preferably not part of the key
        text = [f.name for f in fs if f.type == "string" and not f.format and not f.code_table]
        return [n for n in text if n not in ds.primary_key] or text
    if kind in _RULE_OF_KIND:  # the fields the generated dbt rule is declared on (zqdata.reference.field_rules)
        return [r.field for r in field_rules(ds) if r.rule == _RULE_OF_KIND[kind] and r.field]
    if kind == "implausible_meter_reading":
        # a daily reading per entity (mirrors expectations.suites.history_plausibility, which imports GX;
        # tests/test_simulator.py checks they agree)
        ev = ds.event_time_field
        if not ev or ev not in ds.primary_key or ds.field(ev).type != "date" or len(ds.primary_key) < 2:
            return []
        return [f.name for f in fs if f.range is not None and f.type in ("integer", "decimal")
                and f.name not in ds.primary_key]
    raise ValueError(f"未知的缺陷类型 unknown defect kind {kind!r}; 可选 {', '.join(DEFECT_KINDS)}")


# ---------------------------------------------------------------- sizes and hashing


def rows_by_dataset(registry: Registry, rows_per_day: int) -> dict[str, int]:
    """Split ``rows_per_day`` over datasets by ``delivery.volume_share`` (largest remainder; at least one row each)."""
    codes = sorted(registry.datasets)
    total_share = sum(registry.datasets[c].delivery.volume_share for c in codes)
    exact = {c: rows_per_day * registry.datasets[c].delivery.volume_share / total_share for c in codes}
    rows = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(codes, key=lambda c: (rows[c] - exact[c], c))[: rows_per_day - sum(rows.values())]:
        rows[c] += 1
    return {c: max(1, n) for c, n in rows.items()}


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _mix(seed: int, salt: int, idx: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, salt, idx): a stable pseudo-random uint64 per entity, independent of the day."""
    offset = _U64((seed * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03) % 2**64)
    with np.errstate(over="ignore"):
        z = (np.asarray(idx).astype(_U64) + offset) * _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _offset(seed: int, modulus: int) -> int:
    """A seed-dependent offset in [0, modulus) for the index → identifier bijections."""
    return int(_mix(seed, 999, np.zeros(1, dtype=np.int64))[0] % _U64(modulus))


def _unit(seed: int, salt: int, idx: np.ndarray) -> np.ndarray:
    """Stable uniform [0, 1) per entity."""
    return (_mix(seed, salt, idx) >> _U64(11)).astype(np.float64) * 2.0**-53


def _pick(u: np.ndarray, weights: Iterable[float]) -> np.ndarray:
    """Indices drawn by ``weights`` from uniforms ``u``."""
    cum = np.cumsum(np.asarray(list(weights), dtype=np.float64))
    return np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(cum) - 1)


# ---------------------------------------------------------------- string building (vectorized)


def _s(values: Iterable[str]) -> pa.StringArray:
    return pa.array(list(values), type=pa.string())


def _take(choices: pa.StringArray, idx: np.ndarray) -> pa.Array:
    return choices.take(pa.array(np.asarray(idx, dtype=np.int64)))


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _ints(values: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(values, dtype=np.int64)).cast(pa.string())


def _decimals(cents: np.ndarray) -> pa.Array:
    """Fixed two-decimal strings from integer cents (non-negative)."""
    c = np.asarray(cents, dtype=np.int64)
    return _join(_ints(c // 100), ".", standards.ascii_to_arrow(standards.ascii_digits(c % 100, 2)))


def _coded(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    return _join(prefix, standards.ascii_to_arrow(standards.ascii_digits(numbers, width)))


def _timestamps(day: dt.date, seconds: np.ndarray) -> pa.Array:
    """Standard timestamps ``YYYY-MM-DDTHH:MM:SS+08:00`` of ``day`` at ``seconds`` after midnight (Beijing time)."""
    s = np.asarray(seconds, dtype=np.int64)
    hms = (s // 3600) * 10000 + (s // 60 % 60) * 100 + s % 60
    d = standards.ascii_digits(hms, 6)
    n = len(s)
    m = np.empty((n, 25), dtype=np.uint8)
    m[:, :11] = np.frombuffer(f"{day.isoformat()}T".encode(), dtype=np.uint8)
    m[:, 11:13], m[:, 14:16], m[:, 17:19] = d[:, 0:2], d[:, 2:4], d[:, 4:6]
    m[:, 13] = m[:, 16] = ord(":")
    m[:, 19:] = np.frombuffer(b"+08:00", dtype=np.uint8)
    return standards.ascii_to_arrow(m)


def _dates(days: np.ndarray) -> pa.Array:
    """Standard dates ``YYYY-MM-DD`` from datetime64[D]."""
    return pa.array(np.asarray(days, dtype="datetime64[D]")).cast(pa.string())


def _const(value: str, n: int) -> pa.Array:
    return pa.array(np.full(n, value, dtype=object), type=pa.string())


# ---------------------------------------------------------------- the stable universe

_SURNAMES = "陈梁黄李何林罗张吴冯莫邓谭潘叶刘王杨周苏伍区麦邝植黎陆彭钟严郭蔡"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华文辉志俊嘉欣梓浩宇子晓佳颖婷锦荣健玲燕妍诗雅思铭海金"
_BRAND = "星湖鼎端砚华盛宏兴达源丰泰隆昌信诚德利和嘉粤西江创新恒远宝鑫润骏腾飞景锐联安康"
_INDUSTRY = ["科技", "五金制品", "建材", "陶瓷", "食品", "电子", "物流", "纺织", "家具", "贸易", "新能源", "农业发展",
             "餐饮管理", "汽车零部件", "金属制品", "印刷", "医药", "建筑工程", "环保科技", "电器"]
_FORMS = ["有限公司", "股份有限公司", "有限责任公司"]
_ROADS = ["天宁北路", "端州一路", "端州二路", "端州三路", "建设一路", "建设三路", "星湖大道", "信安大道", "康乐北路",
          "江滨西路", "宋城一路", "砚阳路", "西江北路", "迎宾大道", "新区大道", "龙湖大道", "桥东路", "城中路"]
_ROUTES = [str(i) for i in range(1, 31)] + ["201", "202", "203", "205", "301", "302", "305", "K1", "K2", "K3"]
_HOUR_WEIGHTS = [0.2, 0.1, 0.05, 0.05, 0.1, 0.5, 2, 6, 8, 4, 3, 3, 3.5, 3, 3, 3.5, 4.5, 7, 7.5, 4, 2.5, 1.5, 1, 0.5]
_BIRTH_FIRST = np.datetime64("1935-01-01")
_BIRTH_DAYS = int((np.datetime64("2006-12-31") - _BIRTH_FIRST).astype(int)) + 1
_PERSON_PRIME = 2_147_483_647  # > number of (district, birth date, sequence) slots: the index → ID map is a bijection
_ORG_MULT = 8_589_934_583  # prime, coprime to 31**7: the enterprise index → organisation number map is a bijection
_OUTSIDER_BASE = 10**9  # organisation numbers of enterprises outside the universe (never registered)


@dataclass
class Universe:
    """Enterprises, persons, meters and cards as pure functions of (seed, index); sizes scale with rows_per_day."""

    seed: int
    registry: Registry
    n_enterprises: int
    n_persons: int
    n_cards: int
    districts: np.ndarray = field(init=False)
    district_names: pa.StringArray = field(init=False)

    def __post_init__(self) -> None:
        codes = standards.county_districts(self.registry)
        self.districts = np.array([int(c) for c in codes], dtype=np.int64)
        table = standards.zhaoqing_districts(self.registry)
        self.district_names = _s(table[c] for c in codes)
        if len(codes) * _BIRTH_DAYS * 1000 >= _PERSON_PRIME or self.n_persons > len(codes) * _BIRTH_DAYS * 1000:
            raise ValueError("person universe too large for distinct citizen IDs")

    # enterprises ---------------------------------------------------------
    def enterprise_district_idx(self, e: np.ndarray) -> np.ndarray:
        return (_mix(self.seed, 101, e) % _U64(len(self.districts))).astype(np.int64)

    def credit_codes(self, e: np.ndarray, district_idx: np.ndarray | None = None) -> pa.Array:
        e = np.asarray(e, dtype=np.int64)
        d = self.enterprise_district_idx(e) if district_idx is None else district_idx
        org = (e * _ORG_MULT + _offset(self.seed, 31**7)) % 31**7
        return standards.usccs(self.districts[d], org)

    def enterprise_columns(self, e: np.ndarray, day: dt.date) -> dict[str, pa.Array]:
        d = self.enterprise_district_idx(e)
        brand = (_mix(self.seed, 102, e) % _U64(len(_BRAND) ** 2)).astype(np.int64)
        brand_chars = _s(_BRAND)
        prefix = pc.utf8_slice_codeunits(_take(self.district_names, d), 0, 2)
        name = _join(
            "肇庆市", prefix, _take(brand_chars, brand // len(_BRAND)), _take(brand_chars, brand % len(_BRAND)),
            _take(_s(_INDUSTRY), (_unit(self.seed, 103, e) * len(_INDUSTRY)).astype(np.int64)),
            _take(_s(_FORMS), _pick(_unit(self.seed, 104, e), [0.8, 0.1, 0.1])),
        )
        rep = (_mix(self.seed, 105, e) % _U64(self.n_persons)).astype(np.int64)
        capital = np.round(10 ** (1 + 4 * _unit(self.seed, 106, e) ** 2) * 100).astype(np.int64)  # 10 to 100000 万元
        established = _BIRTH_FIRST + np.timedelta64(57 * 365, "D") + (
            _unit(self.seed, 107, e) * 12000).astype("timedelta64[D]")  # from 1992
        established = np.minimum(established, np.datetime64(day) - np.timedelta64(1, "D"))
        status = _take(_s(["1", "2", "3", "4"]), _pick(_unit(self.seed, 108, e), [0.92, 0.03, 0.04, 0.01]))
        return {
            "credit_code": self.credit_codes(e, d), "ent_name": name, "legal_rep_name": self.person_names(rep),
            "legal_rep_id": self.citizen_ids(rep), "district_code": _ints(self.districts[d]),
            "reg_capital_wan": _decimals(capital), "status": status, "established_date": _dates(established),
        }

    # persons -------------------------------------------------------------
    def _person_slots(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = len(self.districts) * _BIRTH_DAYS * 1000
        q = (np.asarray(p, dtype=np.int64) % m * _PERSON_PRIME + self.seed) % m
        return q // (_BIRTH_DAYS * 1000), (q // 1000) % _BIRTH_DAYS, q % 1000

    def citizen_ids(self, p: np.ndarray) -> pa.Array:
        d, b, s = self._person_slots(p)
        return standards.citizen_ids(self.districts[d], _BIRTH_FIRST + b.astype("timedelta64[D]"), s)

    def person_names(self, p: np.ndarray) -> pa.Array:
        u = _mix(self.seed, 201, p)
        g = len(_GIVEN)
        sur = (u % _U64(len(_SURNAMES))).astype(np.int64)
        g1 = ((u >> _U64(16)) % _U64(g)).astype(np.int64)
        g2 = ((u >> _U64(32)) % _U64(g)).astype(np.int64)
        two = ((u >> _U64(48)) % _U64(10)).astype(np.int64) < 7
        given = _s(_GIVEN)
        second = pc.if_else(pa.array(two), _take(given, g2), "")
        return _join(_take(_s(_SURNAMES), sur), _take(given, g1), second)

    def person_columns(self, p: np.ndarray) -> dict[str, pa.Array]:
        d, b, s = self._person_slots(p)
        born = _BIRTH_FIRST + b.astype("timedelta64[D]")
        u = _mix(self.seed, 203, p)
        second = np.array([3, 5, 7, 8, 9], dtype=np.int64)[(u % _U64(5)).astype(np.int64)]
        phone_num = 10**10 + second * 10**9 + ((u >> _U64(8)) % _U64(10**9)).astype(np.int64)
        has_phone = _unit(self.seed, 204, p) < 0.92
        phone = pc.if_else(pa.array(has_phone), standards.ascii_to_arrow(standards.ascii_digits(phone_num, 11)), "")
        road = (_unit(self.seed, 205, p) * len(_ROADS)).astype(np.int64)
        number = 1 + (_mix(self.seed, 206, p) % _U64(300)).astype(np.int64)
        flat = _mix(self.seed, 207, p)
        room = pc.if_else(
            pa.array(_unit(self.seed, 208, p) < 0.6),
            _join(_ints(1 + (flat % _U64(30)).astype(np.int64)), "栋",
                  _ints(101 + ((flat >> _U64(8)) % _U64(2800)).astype(np.int64)), "房"),
            "",
        )
        address = _join("广东省肇庆市", _take(self.district_names, d), _take(_s(_ROADS), road), _ints(number), "号", room)
        case_flag = pc.if_else(pa.array(_unit(self.seed, 209, p) < 0.01), "Y", "")
        return {
            "citizen_id": standards.citizen_ids(self.districts[d], born, s), "name": self.person_names(p),
            "gender": pc.if_else(pa.array(s % 2 == 1), "1", "2"), "birth_date": _dates(born), "phone": phone,
            "address": address, "district_code": _ints(self.districts[d]), "case_flag": case_flag,
        }


def build_universe(registry: Registry, rows_per_day: int, seed: int) -> Universe:
    """The stable universe for a volume: the enterprise registry lists every enterprise every day."""
    rows = rows_by_dataset(registry, rows_per_day)
    n_ent = rows.get(REFERENCE_DATASET, max(1, rows_per_day // 25))
    n_res = rows.get("resident_population", rows_per_day // 12)
    return Universe(
        seed=seed, registry=registry, n_enterprises=n_ent,
        n_persons=max(1000, 10 * n_res, 2 * n_ent), n_cards=max(100, rows.get("bus_card_swipes", 0) // 3),
    )


# ---------------------------------------------------------------- per-dataset generators


@dataclass
class DayContext:
    """Everything a generator needs for one day: the universe, the day and the enterprises not to refer to."""

    universe: Universe
    registry: Registry
    day: dt.date
    seed: int
    enterprise_ok: np.ndarray  # remap table: enterprise index → an enterprise whose registry row is clean today

    @property
    def ymd(self) -> str:
        return self.day.strftime("%Y%m%d")

    def rng(self, dataset: str, part: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.day.toordinal(), _crc(dataset), part])

    def clean_enterprises(self, e: np.ndarray) -> np.ndarray:
        return self.enterprise_ok[e]


def _seconds(rng: np.random.Generator, n: int, hours: list[float] | None = None) -> np.ndarray:
    if hours is None:
        return rng.integers(0, 86400, n)
    return _pick(rng.random(n), hours) * 3600 + rng.integers(0, 3600, n)


def _gen_enterprise_registry(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    cols = ctx.universe.enterprise_columns(rows, ctx.day)
    cols["updated_at"] = _timestamps(ctx.day, _seconds(rng, len(rows)))
    return cols


def _gen_social_insurance(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    u, n = ctx.universe, len(rows)
    e = ctx.clean_enterprises((_mix(ctx.seed, _crc(ctx.ymd) + 301, rows) % _U64(u.n_enterprises)).astype(np.int64))
    first = ctx.day.replace(day=1)
    prev = (first - dt.timedelta(days=1)).strftime("%Y-%m")
    period = pc.if_else(pa.array(rng.random(n) < 0.85), prev, first.strftime("%Y-%m"))
    headcount = np.maximum(1, (3 * 10 ** (3 * _unit(ctx.seed, 302, e) ** 2)).astype(np.int64))
    wage_base = rng.integers(4000_00, 6500_00, n)  # cents
    contribution = headcount * wage_base * 33 // 100
    return {
        "record_id": _coded("SI" + ctx.ymd, rows, 9), "credit_code": u.credit_codes(e),
        "district_code": _ints(u.districts[u.enterprise_district_idx(e)]), "period": period,
        "insured_headcount": _ints(headcount), "contribution_yuan": _decimals(contribution),
        "paid_at": _timestamps(ctx.day, _seconds(rng, n, [0] * 8 + [1] * 10 + [0] * 6)),
    }


def _gen_meter(prefix: str, salt: int, amount_field: str, scale: float):
    def gen(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
        u, n = ctx.universe, len(rows)
        e = ctx.clean_enterprises((_mix(ctx.seed, salt, rows) % _U64(u.n_enterprises)).astype(np.int64))
        base = scale * 10 ** (3 * _unit(ctx.seed, salt + 1, rows) ** 2)  # meter size is stable across days
        amount = np.round(base * rng.uniform(0.6, 1.4, n) * 100).astype(np.int64)
        return {
            "meter_id": _coded(prefix, (rows * 3_141_592_653 + _offset(ctx.seed + salt, 10**10)) % 10**10, 10),
            "credit_code": u.credit_codes(e),
            "district_code": _ints(u.districts[u.enterprise_district_idx(e)]), "reading_date": _const(ctx.day.isoformat(), n),
            amount_field: _decimals(amount),
        }

    return gen


def _gen_resident_population(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    u = ctx.universe
    # Distinct persons within a day: consecutive slots of a day-dependent window, permuted by a bijection mod n_persons.
    k = (ctx.day.toordinal() * 7_368_787 + rows) % u.n_persons
    p = (k * 1_000_000_007) % u.n_persons if u.n_persons % 1_000_000_007 else k
    cols = u.person_columns(p)
    cols["updated_at"] = _timestamps(ctx.day, _seconds(rng, len(rows)))
    return cols


def _route_tables() -> tuple[pa.StringArray, np.ndarray, np.ndarray, np.ndarray]:
    stops, offsets, counts, fares = [], [], [], []
    for i, r in enumerate(_ROUTES):
        count = 12 + (_crc(r) % 25)
        offsets.append(len(stops))
        counts.append(count)
        stops += [f"{r}-{k:02d}" for k in range(1, count + 1)]
        fares.append(600 if r.startswith("3") and len(r) == 3 else 400 if len(r) == 3 else 300 if r.startswith("K")
                     else 100 if i % 7 == 6 else 200)
    return _s(stops), np.array(offsets), np.array(counts), np.array(fares, dtype=np.int64)


def _gen_bus_card_swipes(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    u, n = ctx.universe, len(rows)
    card = (rng.random(n) ** 1.5 * u.n_cards).astype(np.int64)  # some cards ride much more than others
    card_type_idx = _pick(_unit(ctx.seed, 401, card), [0.70, 0.12, 0.13, 0.05])
    route = _pick(rng.random(n), [1 / (1 + 0.15 * i) for i in range(len(_ROUTES))])
    stops, offsets, counts, fares = _route_tables()
    stop = offsets[route] + (rng.random(n) * counts[route]).astype(np.int64)
    discount = np.array([100, 50, 0, 0], dtype=np.int64)[card_type_idx]
    return {
        "swipe_id": _coded("BS" + ctx.ymd, rows, 10),
        "card_id": _coded("4412", (card * 314_159_265_359 + _offset(ctx.seed, 10**12)) % 10**12, 12),
        "card_type": _take(_s(["01", "02", "03", "04"]), card_type_idx),
        "route_id": _take(_s(_ROUTES), route), "stop_id": _take(stops, stop),
        "swipe_time": _timestamps(ctx.day, _seconds(rng, n, _HOUR_WEIGHTS)),
        "fare_yuan": _decimals(fares[route] * discount // 100),
    }


def _gen_subject_consent(ctx: DayContext, rows: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    u, n = ctx.universe, len(rows)
    is_ent = rng.random(n) < 0.6
    e = ctx.clean_enterprises(rng.integers(0, u.n_enterprises, n))
    p = rng.integers(0, u.n_persons, n)
    subject = pc.if_else(pa.array(is_ent), u.credit_codes(e), u.citizen_ids(p))
    scen = sorted(s.code for s in ctx.registry.scenarios.values() if s.status == "active") or sorted(ctx.registry.scenarios)
    ent_s = [s for s in scen if ctx.registry.scenarios[s].consent_required == "enterprise"] or scen
    per_s = [s for s in scen if ctx.registry.scenarios[s].consent_required == "person"] or scen
    scenario = pc.if_else(pa.array(is_ent), _take(_s(ent_s), rng.integers(0, len(ent_s), n)),
                          _take(_s(per_s), rng.integers(0, len(per_s), n)))
    return {
        "consent_id": _coded("CS" + ctx.ymd, rows, 8),
        "subject_type": pc.if_else(pa.array(is_ent), "enterprise", "person"), "subject_id": subject,
        "scenario_code": scenario, "status": pc.if_else(pa.array(rng.random(n) < 0.9), "granted", "revoked"),
        "effective_at": _timestamps(ctx.day, _seconds(rng, n)),
    }


GENERATORS: dict[str, Callable[[DayContext, np.ndarray, np.random.Generator], dict[str, pa.Array]]] = {
    "enterprise_registry": _gen_enterprise_registry,
    "social_insurance": _gen_social_insurance,
    "electricity_usage": _gen_meter("D", 501, "kwh", 50.0),
    "water_usage": _gen_meter("S", 601, "cubic_meters", 5.0),
    "resident_population": _gen_resident_population,
    "bus_card_swipes": _gen_bus_card_swipes,
    "subject_consent": _gen_subject_consent,
}


# ---------------------------------------------------------------- defect planning and corruption


@dataclass(frozen=True)
class _RowDefect:
    row: int  # 0-based across the dataset's delivery
    kind: str
    field: str


def _plan_row_defects(ds: Dataset, n: int, rate: float, kinds: list[str], rng: np.random.Generator) -> list[_RowDefect]:
    """Choose round(rate·n) distinct rows and give each one applicable (kind, field); a duplicate needs a clean row before."""
    usable = [k for k in kinds if applicable_fields(k, ds)]
    k = int(round(rate * n))
    if not usable or k == 0:
        return []
    rows = np.sort(rng.choice(n, size=min(k, n), replace=False))
    chosen = set(rows.tolist())
    kind_idx = rng.integers(0, len(usable), len(rows))
    field_u = rng.random(len(rows))
    plan = []
    for r, ki, fu in zip(rows.tolist(), kind_idx.tolist(), field_u.tolist()):
        kind = usable[ki]
        if kind == "duplicate_primary_key" and (r % CHUNK_ROWS == 0 or (r - 1) in chosen):
            others = [x for x in usable if x != "duplicate_primary_key"]
            if not others:
                continue
            kind = others[ki % len(others)]
        fields = applicable_fields(kind, ds)
        plan.append(_RowDefect(r, kind, fields[int(fu * len(fields))]))
    return plan


def _plan_undecodable(ds: Dataset, n: int, plan: list[_RowDefect], rng: np.random.Generator) -> list[_RowDefect]:
    """``UNDECODABLE_RECORDS`` rows with no other defect (and no duplicate's original), each with one free-text field."""
    fields = applicable_fields("undecodable_bytes", ds)
    if not fields or n == 0:
        return []
    taken = {d.row for d in plan} | {d.row - 1 for d in plan if d.kind == "duplicate_primary_key"}
    drawn = rng.choice(n, size=min(n, UNDECODABLE_RECORDS + len(taken)), replace=False).tolist()
    rows = sorted([r for r in drawn if r not in taken][:UNDECODABLE_RECORDS])
    field_idx = rng.integers(0, len(fields), len(rows)).tolist()
    return [_RowDefect(r, "undecodable_bytes", fields[i]) for r, i in zip(rows, field_idx)]


def _fmt_number(x: float, ftype: str) -> str:
    return str(int(x)) if ftype == "integer" else f"{x:.2f}"


def _corrupt(kind: str, value: str | None, ds: Dataset, fname: str, day: dt.date, r: random.Random,
             ctx: DayContext, row_district: str | None, global_row: int) -> str:
    """The defective value of one field (the other fields of the row stay as generated)."""
    v = value or ""
    f = ds.field(fname) if kind != "duplicate_primary_key" else None
    if kind == "citizen_id_check_char":
        return v[:17] + r.choice([c for c in standards.CITIZEN_ID_CHECK_CHARS if c != v[17]])
    if kind == "citizen_id_birth_date":
        body = v[:10] + r.choice(["0230", "0231", "1301", "0000", "0431", "0632"]) + v[14:17]
        return body + standards.citizen_id_check_char(body)
    if kind == "uscc_check_char":
        return v[:17] + r.choice([c for c in standards.USCC_ALPHABET if c != v[17]])
    if kind == "invalid_mobile":
        digits = "".join(r.choice("0123456789") for _ in range(9))
        return r.choice(["1" + r.choice("012") + digits, "1" + r.choice("3589") + digits[:8]])
    if kind == "district_not_zhaoqing":
        table = standards.zhaoqing_districts(ctx.registry)
        return r.choice([c for c in ["440103", "440304", "441201", "445302", "450102"] if c not in table])
    if kind == "out_of_range":
        assert f is not None and f.range is not None
        options = []
        if f.range.max is not None:
            options.append(_fmt_number(f.range.max * r.choice([2, 3, 10]) + 1, f.type))
        if f.range.min is not None:
            options.append(_fmt_number(f.range.min - r.choice([1, 5, 100]), f.type))
        return r.choice(options)
    if kind == "required_empty":
        return ""
    if kind == "nonstandard_format":
        assert f is not None
        if f.type == "date":
            d = dt.date.fromisoformat(v[:10])
            return r.choice([d.strftime("%Y/%m/%d"), d.strftime("%Y%m%d")])
        t = dt.datetime.fromisoformat(v)
        return r.choice([t.strftime("%Y-%m-%d %H:%M:%S"), t.strftime("%Y/%m/%d %H:%M")])
    if kind == "unparseable_value":
        assert f is not None
        if f.type == "date":
            return r.choice([f"{day.year}-13-01", f"{day.year}-02-30", "不详"])
        if f.type == "timestamp":
            return r.choice([f"{day.isoformat()}T25:61:00+08:00", "不详", f"{day.isoformat()}T"])
        return r.choice(["N/A", "12.3.4", "约100"])
    if kind == "fullwidth_digits":
        return v.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    if kind == "credit_code_not_in_registry":
        district = np.array([int(row_district or v[2:8])], dtype=np.int64)
        org = np.array([((_OUTSIDER_BASE + global_row) * _ORG_MULT + _offset(ctx.seed, 31**7)) % 31**7], dtype=np.int64)
        return standards.usccs(district, org)[0].as_py()
    if kind == "district_mismatch":
        return r.choice([c for c in standards.county_districts(ctx.registry) if c != v])
    if kind == "event_time_outside_day":
        assert f is not None
        other = day + dt.timedelta(days=r.choice([-1, 1]))
        return other.isoformat() + v[10:] if f.type == "timestamp" else other.isoformat()
    if kind == "code_outside_table":
        assert f is not None and f.code_table is not None
        table = ctx.registry.code_tables[f.code_table]
        width = len(next(iter(table)))
        candidates = {1: ["0", "9", "5"], 2: ["99", "00", "09"]}.get(width, ["unknown", "pending", "other"])
        return r.choice([c for c in candidates if c not in table])
    if kind == "id_birth_date_mismatch":  # another real date than the (valid, untouched) ID encodes
        return (dt.date.fromisoformat(v[:10]) + dt.timedelta(days=r.choice([-365, -31, -1, 1, 31, 365]))).isoformat()
    if kind == "id_sex_mismatch":
        return "2" if v == "1" else "1"
    if kind == "district_wrong_level":  # the prefecture's own code (in the table, not county level)
        return v[:4] + "00"
    if kind == "implausible_meter_reading":
        assert f is not None
        return _fmt_number(float(v) * 100, f.type)
    if kind == "undecodable_bytes":  # a marker inside the value, replaced by invalid bytes once the file is written
        cut = r.randint(0, len(v))
        return v[:cut] + _undecodable_marker(r.randrange(len(UNDECODABLE_SEQUENCES))) + v[cut:]
    raise ValueError(f"unknown defect kind {kind!r}")


def _undecodable_marker(i: int) -> str:
    """ASCII, so the same bytes in UTF-8 and GBK; never produced by a generator."""
    return f"@@ZQ-UNDECODABLE-{i}@@"


def _insert_undecodable(data: bytes) -> bytes:
    """The serialized file (or value) with each marker replaced by its invalid byte sequence."""
    for i, seq in enumerate(UNDECODABLE_SEQUENCES):
        data = data.replace(_undecodable_marker(i).encode("ascii"), seq)
    return data


def _undecodable_columns(cols: dict[str, pa.Array], defects: list[_RowDefect], start: int) -> dict[str, pa.Array]:
    """Parquet: the marked values as bytes holding the invalid sequence, the column viewed (unvalidated) as text."""
    n = len(next(iter(cols.values())))
    for fname in sorted({d.field for d in defects}):
        idx = sorted(d.row - start for d in defects if d.field == fname)
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        values = pa.array([_insert_undecodable(cols[fname][i].as_py().encode("utf-8")) for i in idx], pa.binary())
        cols[fname] = pc.replace_with_mask(cols[fname].cast(pa.binary()), pa.array(mask), values).view(pa.string())
    return cols


def _apply_row_defects(cols: dict[str, pa.Array], ds: Dataset, defects: list[_RowDefect], start: int,
                       ctx: DayContext) -> dict[str, pa.Array]:
    """Corrupt the planned rows of one chunk (rows ``start``… of the delivery)."""
    if not defects:
        return cols
    n = len(next(iter(cols.values())))
    dup = [d.row - start for d in defects if d.kind == "duplicate_primary_key"]
    if dup:
        idx = np.arange(n)
        idx[dup] = np.array(dup) - 1  # the later row repeats the whole earlier (clean) record
        cols = {k: a.take(pa.array(idx)) for k, a in cols.items()}
    by_field: dict[str, list[tuple[int, str]]] = {}
    district = cols.get("district_code")
    for d in defects:
        if d.kind == "duplicate_primary_key":
            continue
        i = d.row - start
        r = random.Random(f"{ctx.seed}/{ctx.day}/{ds.code}/{d.row}")
        row_district = district[i].as_py() if district is not None else None
        new = _corrupt(d.kind, cols[d.field][i].as_py(), ds, d.field, ctx.day, r, ctx, row_district, d.row)
        by_field.setdefault(d.field, []).append((i, new))
    for fname, changes in by_field.items():
        mask = np.zeros(n, dtype=bool)
        changes.sort()
        mask[[i for i, _ in changes]] = True
        cols[fname] = pc.replace_with_mask(cols[fname], pa.array(mask), pa.array([v for _, v in changes], pa.string()))
    return cols


# ---------------------------------------------------------------- file writing


def _serialize(table: pa.Table, fmt: str, encoding: str) -> bytes:
    """One part file in the dataset's registered format and encoding (every column as text)."""
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()
    if fmt == "csv":
        buf = pa.BufferOutputStream()
        pcsv.write_csv(table, buf, pcsv.WriteOptions(quoting_style="needed"))
        data = buf.getvalue().to_pybytes()
        return data if encoding.lower().replace("-", "") == "utf8" else data.decode("utf-8").encode(encoding)
    if fmt == "jsonl":
        with tempfile.TemporaryDirectory() as tmp, duckdb.connect() as con:
            path = os.path.join(tmp, "part.jsonl")
            con.execute("SET threads = 1")  # keeps row order, and the file byte-identical across runs
            con.register("part", table)
            con.execute(f"COPY part TO '{path}' (FORMAT json)")
            data = Path(path).read_bytes()
        return data if encoding.lower().replace("-", "") == "utf8" else data.decode("utf-8").encode(encoding)
    raise ValueError(f"unsupported delivery format {fmt!r}")


def _delivery_times(ctx: DayContext, ds: Dataset, late: bool, redelivery: bool = False
                    ) -> tuple[dt.datetime, dt.datetime]:
    """(extracted_at, delivered_at): inside the SLA window after the day ends, or 1–12 hours beyond it when late.

    A redelivery arrives after the delivery it replaces: halfway to the deadline (still on time), or an hour later."""
    r = random.Random(f"{ctx.seed}/{ctx.day}/{ds.code}/delivery")
    day_end = dt.datetime.combine(ctx.day + dt.timedelta(days=1), dt.time(), tzinfo=TZ)
    sla = ds.delivery.sla_hours * 3600
    if late:
        delivered = day_end + dt.timedelta(seconds=sla + r.randint(3600, 12 * 3600))
    else:
        delivered = day_end + dt.timedelta(seconds=r.randint(int(sla * 0.1), int(sla * 0.9)))
    if redelivery:
        left = int((day_end + dt.timedelta(seconds=sla) - delivered).total_seconds())
        delivered += dt.timedelta(seconds=left // 2 if left > 0 else 3600)
    extracted = max(day_end, delivered - dt.timedelta(seconds=r.randint(300, 1800)))
    return extracted, delivered


# ---------------------------------------------------------------- the day


_NO_ROW_DEFECTS = frozenset({"missing_delivery", "extra_column", "gbk_with_bom", "emptying_redelivery"})


def _parse_kinds(defect_kinds: Iterable[str] | None, registry: Registry, rng: random.Random
                 ) -> tuple[list[str], dict[str, set[str]]]:
    """Row-level kinds to inject at the rate, and delivery-level kinds per dataset (``kind`` or ``kind:dataset``)."""
    if defect_kinds is None:
        return list(ROW_DEFECT_KINDS), {}
    row_kinds: list[str] = []
    delivery: dict[str, set[str]] = {}
    # A default target never is the reference snapshot: losing it would break every other enterprise dataset.
    targets = sorted(c for c in registry.datasets if c != REFERENCE_DATASET) or sorted(registry.datasets)
    for item in defect_kinds:
        kind, _, target = item.partition(":")
        if kind not in DEFECT_KINDS:
            raise ValueError(f"未知的缺陷类型 unknown defect kind {kind!r}; 可选 {', '.join(DEFECT_KINDS)}")
        if target and target not in registry.datasets:
            raise ValueError(f"未登记的数据集 unknown dataset {target!r} in defect kind {item!r}")
        if DEFECT_KINDS[kind].level == "row":
            if target:
                raise ValueError(f"行级缺陷不能指定数据集 row-level kind {kind!r} takes no dataset")
            row_kinds.append(kind)
            continue
        if target and not _delivery_kind_applies(kind, registry.datasets[target]):
            need = "/".join(DELIVERY_KIND_FORMATS.get(kind, tuple(_EXT))) + " delivery"
            need += " with a free-text field" if kind == "undecodable_bytes" else ""
            raise ValueError(f"交付级缺陷 {kind!r} 不适用于数据集 {target!r} (needs a {need})")
        candidates = [c for c in targets if _delivery_kind_applies(kind, registry.datasets[c])]
        if not target and not candidates:
            raise ValueError(f"没有数据集适用交付级缺陷 {kind!r} (no registered dataset can carry it)")
        delivery.setdefault(target or rng.choice(candidates), set()).add(kind)
    for code, kinds in sorted(delivery.items()):
        for kind in sorted(kinds):
            clash = _EXCLUSIVE.get(kind, frozenset()) & kinds
            if clash:
                raise ValueError(f"同一数据集 {code} 不能同时注入交付级缺陷 {kind} 与 {', '.join(sorted(clash))}"
                                 f" (one would hide the other in the ground truth)")
    return sorted(set(row_kinds), key=ROW_DEFECT_KINDS.index), delivery


def _delivery_kind_applies(kind: str, ds: Dataset) -> bool:
    if ds.delivery.format not in DELIVERY_KIND_FORMATS.get(kind, tuple(_EXT)):
        return False
    return kind != "undecodable_bytes" or bool(applicable_fields(kind, ds))


def simulate_day(
    store: ObjectStore,
    registry: Registry,
    day: dt.date,
    rows_per_day: int,
    seed: int,
    defect_rate: float = 0.0,
    defect_kinds: Iterable[str] | None = None,
) -> list[InjectedDefect]:
    """Write every registry dataset's delivery for ``day`` (replacing the day's folders) and the day's ground truth.

    ``defect_kinds``: None = every row-level kind at ``defect_rate``; otherwise only the listed kinds. Delivery-level kinds
    (``DELIVERY_DEFECT_KINDS``) apply only when listed, to one dataset chosen by (seed, day) among those the kind fits, or
    to the one named as ``kind:dataset``. ``emptying_redelivery`` writes the dataset's delivery again without records: call
    it after a run of the same day without it (the complete delivery it replaces). ``future_folder`` writes, besides the
    day's delivery, a copy dated a decade or more ahead (a wrong digit in the year), reported by the night's run.
    """
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be within [0, 1], got {defect_rate}")
    if rows_per_day < 0:
        raise ValueError("rows_per_day must be non-negative")
    missing = sorted(set(registry.datasets) - set(GENERATORS))
    if missing:
        raise ValueError(f"模拟器不支持这些登记数据集 no simulator for registered datasets: {', '.join(missing)}")
    row_kinds, delivery_kinds = _parse_kinds(defect_kinds, registry, random.Random(f"{seed}/{day}/delivery-kinds"))
    rows = rows_by_dataset(registry, rows_per_day)
    universe = build_universe(registry, rows_per_day, seed)
    plans: dict[str, list[_RowDefect]] = {}
    for code in sorted(registry.datasets):
        ds = registry.datasets[code]
        kinds = delivery_kinds.get(code, set())
        # No row defects where the whole file is quarantined (extra_column), where every record must land untouched
        # (gbk_with_bom) or where there are no records: the ground truth stays unambiguous
        rate = 0.0 if _NO_ROW_DEFECTS & kinds else defect_rate
        rng = np.random.default_rng([seed, day.toordinal(), _crc(code), 7])
        plans[code] = _plan_row_defects(ds, rows[code], rate, row_kinds, rng)
        if "undecodable_bytes" in kinds:
            bad_rng = np.random.default_rng([seed, day.toordinal(), _crc(code), 11])
            bad = _plan_undecodable(ds, rows[code], plans[code], bad_rng)
            plans[code] = sorted(plans[code] + bad, key=lambda d: d.row)

    # Enterprises whose snapshot row is defective (or duplicated) are not referred to by the other datasets today.
    tainted = np.zeros(universe.n_enterprises, dtype=bool)
    for d in plans.get(REFERENCE_DATASET, []):
        tainted[d.row] = True
        if d.kind == "duplicate_primary_key":
            tainted[d.row - 1] = True
    if {"missing_delivery", "emptying_redelivery"} & delivery_kinds.get(REFERENCE_DATASET, set()):
        tainted[:] = False  # nothing to avoid: every reference fails anyway
    ok = np.flatnonzero(~tainted)
    remap = ok[np.searchsorted(ok, np.arange(universe.n_enterprises)) % len(ok)] if len(ok) else np.arange(
        universe.n_enterprises)
    ctx = DayContext(universe=universe, registry=registry, day=day, seed=seed, enterprise_ok=remap)

    truth: list[InjectedDefect] = []
    for code in sorted(registry.datasets):
        truth += _write_dataset(store, ctx, registry.datasets[code], rows[code], plans[code],
                                delivery_kinds.get(code, set()))
    _write_ground_truth(day, truth)
    return truth


def _write_dataset(store: ObjectStore, ctx: DayContext, ds: Dataset, n: int, plan: list[_RowDefect],
                   delivery_kinds: set[str]) -> list[InjectedDefect]:
    agency = ctx.registry.datasets[ds.code].agency
    prefix = delivery_prefix(agency, ds.code, ctx.day)
    store.delete_prefix(prefix + MANIFEST_NAME)  # manifest first: a half-replaced folder never looks complete
    store.delete_prefix(prefix)
    dim = {k: v.dimension for k, v in DEFECT_KINDS.items()}
    if "missing_delivery" in delivery_kinds:
        return [InjectedDefect(ds.code, None, None, None, dim["missing_delivery"], "missing_delivery")]

    fmt, encoding = ds.delivery.format, ds.delivery.encoding
    if "gbk_with_bom" in delivery_kinds:
        encoding = "gbk"  # declared so in the manifest; the BOM in front says UTF-8
    if "emptying_redelivery" in delivery_kinds:
        n, plan = 0, []
    future = _future_day(ctx, ds) if "future_folder" in delivery_kinds else None
    future_prefix = delivery_prefix(agency, ds.code, future) if future else ""
    if future_prefix:
        store.delete_prefix(future_prefix + MANIFEST_NAME)
        store.delete_prefix(future_prefix)
    n_parts = max(1, math.ceil(n / CHUNK_ROWS))
    bounds = [n * i // n_parts for i in range(n_parts + 1)]
    truth: list[InjectedDefect] = []
    entries: list[ManifestFile] = []
    for part in range(n_parts):
        start, stop = bounds[part], bounds[part + 1]
        name = f"part-{part + 1:04d}.{_EXT[fmt]}"
        key = prefix + name
        if stop > start:
            cols = GENERATORS[ds.code](ctx, np.arange(start, stop, dtype=np.int64), ctx.rng(ds.code, part))
            cols = {f: cols[f] for f in ds.field_names}  # registry order; a generator missing a field fails loudly here
        else:  # no records: a CSV header, an empty JSON Lines file, a Parquet schema
            cols = {f: pa.array([], pa.string()) for f in ds.field_names}
        chunk = [d for d in plan if start <= d.row < stop]
        cols = _apply_row_defects(cols, ds, chunk, start, ctx)
        truth += [InjectedDefect(ds.code, key, d.row - start + 1, d.field, dim[d.kind], d.kind) for d in chunk]
        undecodable = [d for d in chunk if d.kind == "undecodable_bytes"]
        if undecodable and fmt == "parquet":
            cols = _undecodable_columns(cols, undecodable, start)
        if "extra_column" in delivery_kinds:
            cols[EXTRA_COLUMN] = _const("系统导出附加列", stop - start)
            truth.append(InjectedDefect(ds.code, key, None, EXTRA_COLUMN, dim["extra_column"], "extra_column"))
        data = _serialize(pa.table(cols), fmt, encoding)
        del cols
        if undecodable and fmt != "parquet":
            data = _insert_undecodable(data)
        for kind in ("gbk_with_bom", "emptying_redelivery"):
            if kind in delivery_kinds:  # the file as a whole: accepted as GBK / found empty
                truth.append(InjectedDefect(ds.code, key, None, None, dim[kind], kind))
        if "gbk_with_bom" in delivery_kinds:
            data = BOM + data
        store.put_bytes(key, data)
        if future_prefix:
            store.put_bytes(future_prefix + name, data)
        count = stop - start
        if "manifest_count_mismatch" in delivery_kinds and part == 0:
            count = max(0, count + random.Random(f"{ctx.seed}/{ctx.day}/{ds.code}/count").choice([-3, -1, 1, 2, 5]))
            if count == stop - start:
                count += 1
            truth.append(InjectedDefect(ds.code, key, None, None, dim["manifest_count_mismatch"], "manifest_count_mismatch"))
        entries.append(ManifestFile(name=name, format=fmt, encoding=encoding, record_count=count, sha256=sha256_hex(data)))

    late = "late_delivery" in delivery_kinds
    if late:
        truth.append(InjectedDefect(ds.code, None, None, None, dim["late_delivery"], "late_delivery"))
    extracted, delivered = _delivery_times(ctx, ds, late, redelivery="emptying_redelivery" in delivery_kinds)
    manifest = Manifest(agency=agency, dataset=ds.code, partition_date=ctx.day, extracted_at=extracted,
                        delivered_at=delivered, files=entries)
    # Streamed like landing.write_delivery (data files first, manifest last) so only one part is in memory at a time.
    if "malformed_manifest" in delivery_kinds:
        store.put_bytes(prefix + MANIFEST_NAME, _malformed_manifest(ctx, ds, manifest))
        truth.append(InjectedDefect(ds.code, prefix + MANIFEST_NAME, None, None, dim["malformed_manifest"],
                                    "malformed_manifest"))
    else:
        store.put_bytes(prefix + MANIFEST_NAME, manifest.model_dump_json(indent=1).encode("utf-8"))
    # Timeliness reads the store's arrival time: in a local store the files get the arrival the simulator chose
    # (written now for a past day they would otherwise look months late); S3 keeps its own LastModified.
    set_simulated_arrival(store, agency, ds.code, ctx.day, delivered)
    if future is not None:  # the same delivery, its folder and manifest dated in the future
        dated = manifest.model_copy(update={"partition_date": future})
        store.put_bytes(future_prefix + MANIFEST_NAME, dated.model_dump_json(indent=1).encode("utf-8"))
        set_simulated_arrival(store, agency, ds.code, future, delivered)
        truth.append(InjectedDefect(ds.code, future_prefix, None, None, dim["future_folder"], "future_folder"))
    return truth


def _future_day(ctx: DayContext, ds: Dataset) -> dt.date:
    """The day of a future_folder: the year mistyped by one digit (10, 20 or 30 years ahead), so the folder stays in
    the future of any run of the simulated days (the simulator does not know the run's clock)."""
    years = random.Random(f"{ctx.seed}/{ctx.day}/{ds.code}/future").choice([10, 20, 30])
    try:
        return ctx.day.replace(year=ctx.day.year + years)
    except ValueError:  # 29 February
        return ctx.day.replace(year=ctx.day.year + years, day=28)


def _malformed_manifest(ctx: DayContext, ds: Dataset, manifest: Manifest) -> bytes:
    """The manifest broken as agencies break it: cut off mid-write (not JSON), or a required key left out."""
    r = random.Random(f"{ctx.seed}/{ctx.day}/{ds.code}/manifest")
    text = manifest.model_dump_json(indent=1)
    if r.random() < 0.5:
        return text[: r.randint(len(text) // 4, 3 * len(text) // 4)].encode("utf-8")
    doc = json.loads(text)
    del doc[r.choice(["partition_date", "extracted_at", "files"])]
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")


def _write_ground_truth(day: dt.date, truth: list[InjectedDefect]) -> Path:
    path = ground_truth_path(day)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in truth), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- settings for the demo / Dagster


@dataclass(frozen=True)
class SimulatorSettings:
    """Whether and how the landing assets simulate deliveries (ZQ_SIMULATE, ZQ_SIM_*)."""

    enabled: bool = True
    rows_per_day: int = 20000
    defect_rate: float = 0.01
    seed: int = 20250501

    @classmethod
    def from_env(cls) -> "SimulatorSettings":
        env = os.environ
        try:
            return cls(
                enabled=env.get("ZQ_SIMULATE", "1").strip().lower() in ("1", "true", "yes", "on"),
                rows_per_day=int(env.get("ZQ_SIM_ROWS_PER_DAY", cls.rows_per_day)),
                defect_rate=float(env.get("ZQ_SIM_DEFECT_RATE", cls.defect_rate)),
                seed=int(env.get("ZQ_SIM_SEED", cls.seed)),
            )
        except ValueError as exc:
            raise ValueError(f"模拟器环境变量无效 invalid ZQ_SIM_* setting: {exc}") from exc
