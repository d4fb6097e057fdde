"""National standards used by the quality rules: GB 11643 citizen IDs, GB 32100 credit codes, mobile numbers, GB/T 2260.

The scalar functions are the reference implementation (the dbt SQL macros implement the same rules and are cross-checked
against them with `sample_values`); the vectorized generators build valid values for the simulator.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from zqdata.settings import TZ

if TYPE_CHECKING:
    from zqdata.registry import Registry

# GB 11643-1999 公民身份号码
CITIZEN_ID_WEIGHTS: tuple[int, ...] = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CITIZEN_ID_CHECK_CHARS = "10X98765432"  # indexed by S mod 11

# GB 32100-2015 统一社会信用代码 (the alphabet leaves out I, O, S, V, Z)
USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_WEIGHTS: tuple[int, ...] = tuple(pow(3, i, 31) for i in range(17))

# The standard written forms of the landing contract; anything else that parses is a standardization (规范性) finding.
STANDARD_DATE_FORMAT = "%Y-%m-%d"  # 2025-05-01
STANDARD_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S+08:00"  # 2025-05-01T08:00:00+08:00 (Beijing time)

_DIGITS17 = re.compile(r"[0-9]{17}")
_CITIZEN_ID = re.compile(r"[0-9]{17}[0-9X]")
_USCC = re.compile(f"[{USCC_ALPHABET}]{{18}}")
_MOBILE = re.compile(r"1[3-9][0-9]{9}")
_USCC_VALUE = {c: i for i, c in enumerate(USCC_ALPHABET)}

DISTRICT_CODE_TABLE = "district"  # the registry code table holding the GB/T 2260 codes of Zhaoqing


def citizen_id_check_char(first17: str) -> str:
    """GB 11643 check character for the first 17 digits: "10X98765432"[S mod 11]."""
    if not isinstance(first17, str) or not _DIGITS17.fullmatch(first17):
        raise ValueError(f"公民身份号码前17位须为数字 first17 must be 17 ASCII digits: {first17!r}")
    s = sum(int(c) * w for c, w in zip(first17, CITIZEN_ID_WEIGHTS))
    return CITIZEN_ID_CHECK_CHARS[s % 11]


def citizen_id_birth_date(s: str) -> dt.date | None:
    """The birth date encoded in positions 7–14, or None when it is not a real date."""
    try:
        return dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except (ValueError, TypeError, IndexError):
        return None


def is_valid_citizen_id(s: object, today: dt.date | None = None) -> bool:
    """GB 11643: 18 chars (17 digits + digit or upper-case X), real birth date not after today, correct check char."""
    if not isinstance(s, str) or not _CITIZEN_ID.fullmatch(s):
        return False
    born = citizen_id_birth_date(s)
    if born is None or born > (today or dt.datetime.now(TZ).date()):
        return False
    return citizen_id_check_char(s[:17]) == s[17]


def citizen_id_sex(s: str) -> str | None:
    """The GB/T 2261.1 sex code the 17th character of a GB 11643 ID encodes: odd '1' 男, even '2' 女 (None: no digit)."""
    if not isinstance(s, str) or len(s) < 17 or s[16] not in "0123456789":
        return None
    return "1" if int(s[16]) % 2 else "2"


def uscc_check_char(first17: str) -> str:
    """GB 32100 check character: C = 31 - (S mod 31), with 31 written as '0'."""
    if not isinstance(first17, str) or len(first17) != 17 or any(c not in _USCC_VALUE for c in first17):
        raise ValueError(f"统一社会信用代码前17位含非法字符 first17 must be 17 chars of {USCC_ALPHABET}: {first17!r}")
    s = sum(_USCC_VALUE[c] * w for c, w in zip(first17, USCC_WEIGHTS))
    return USCC_ALPHABET[(31 - s % 31) % 31]


def is_valid_uscc(s: object) -> bool:
    """GB 32100: 18 characters of the code alphabet with a correct check character."""
    if not isinstance(s, str) or not _USCC.fullmatch(s):
        return False
    return uscc_check_char(s[:17]) == s[17]


def is_valid_mobile(s: object) -> bool:
    """Mainland mobile number: 11 ASCII digits matching ``1[3-9]\\d{9}``."""
    return isinstance(s, str) and _MOBILE.fullmatch(s) is not None


def zhaoqing_districts(registry: "Registry | None" = None) -> dict[str, str]:
    """GB/T 2260 codes of Zhaoqing → name, read from the registry code table ``district``."""
    if registry is None:
        from zqdata.registry import registry as _registry

        registry = _registry()
    return dict(registry.code_tables[DISTRICT_CODE_TABLE])


def county_districts(registry: "Registry | None" = None) -> list[str]:
    """District/county-level codes (the city-level code 4412**00** is not an address), sorted."""
    return sorted(c for c in zhaoqing_districts(registry) if not c.endswith("00"))


def is_county_level_district(code: object) -> bool:
    """GB/T 2260 level: six digits whose last two are not '00' (区、县、县级市); ``4412**00**`` is the prefecture and
    ``44**0000**`` the province."""
    return isinstance(code, str) and len(code) == 6 and code.isascii() and code.isdigit() and not code.endswith("00")


def is_zhaoqing_district(code: object, registry: "Registry | None" = None) -> bool:
    """True when ``code`` is one of the GB/T 2260 codes in the registry's Zhaoqing district table."""
    return isinstance(code, str) and code in zhaoqing_districts(registry)


def __getattr__(name: str) -> dict[str, str]:
    # ZHAOQING_DISTRICTS is read from the registry on first use, not at import time.
    if name == "ZHAOQING_DISTRICTS":
        return zhaoqing_districts()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- vectorized generators of valid values


def ascii_digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers as a (n, width) matrix of ASCII digit codes, zero-padded."""
    v = np.asarray(values, dtype=np.int64)
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((v[:, None] // powers[None, :]) % 10 + 48).astype(np.uint8)


def ascii_to_arrow(matrix: np.ndarray) -> pa.StringArray:
    """A (n, k) matrix of ASCII codes as an Arrow string array of n values of length k."""
    n, k = matrix.shape
    if n == 0:
        return pa.array([], type=pa.string())
    fixed = np.ascontiguousarray(matrix, dtype=np.uint8).view(f"S{k}").ravel()
    return pa.array(fixed).cast(pa.binary()).cast(pa.string())


def citizen_ids(district_codes: np.ndarray, birth_dates: np.ndarray, sequences: np.ndarray) -> pa.StringArray:
    """Valid GB 11643 IDs from address codes (6-digit ints), birth dates (datetime64[D]) and 3-digit sequence numbers."""
    bd = np.asarray(birth_dates, dtype="datetime64[D]")
    year = bd.astype("datetime64[Y]").astype(np.int64) + 1970
    month = bd.astype("datetime64[M]").astype(np.int64) % 12 + 1
    day = (bd - bd.astype("datetime64[M]")).astype(np.int64) + 1
    ymd = year * 10000 + month * 100 + day
    body = np.asarray(district_codes, dtype=np.int64) * 10**11 + ymd * 1000 + np.asarray(sequences, dtype=np.int64)
    digits = ascii_digits(body, 17)
    s = (digits.astype(np.int64) - 48) @ np.array(CITIZEN_ID_WEIGHTS, dtype=np.int64)
    check = np.frombuffer(CITIZEN_ID_CHECK_CHARS.encode(), dtype=np.uint8)[s % 11]
    return ascii_to_arrow(np.concatenate([digits, check[:, None]], axis=1))


def usccs(district_codes: np.ndarray, org_numbers: np.ndarray, type_code: str = "91") -> pa.StringArray:
    """Valid GB 32100 codes: ``type_code`` (91 = 企业), the 6-digit district, 'MA' + 7 chars encoding
    ``org_numbers`` (distinct numbers < 31**7 give distinct codes), and the check char."""
    alphabet = np.frombuffer(USCC_ALPHABET.encode(), dtype=np.uint8)
    org = np.asarray(org_numbers, dtype=np.int64)
    if org.size and (org.min() < 0 or org.max() >= 31**7):
        raise ValueError("org_numbers must be in [0, 31**7)")
    n = org.size
    vals = np.empty((n, 17), dtype=np.int64)
    vals[:, 0] = _USCC_VALUE[type_code[0]]
    vals[:, 1] = _USCC_VALUE[type_code[1]]
    vals[:, 2:8] = ascii_digits(np.asarray(district_codes, dtype=np.int64), 6).astype(np.int64) - 48
    vals[:, 8] = _USCC_VALUE["M"]
    vals[:, 9] = _USCC_VALUE["A"]
    powers = 31 ** np.arange(6, -1, -1, dtype=np.int64)
    vals[:, 10:17] = (org[:, None] // powers[None, :]) % 31
    check = (31 - (vals @ np.array(USCC_WEIGHTS, dtype=np.int64)) % 31) % 31
    codes = np.concatenate([alphabet[vals], alphabet[check][:, None]], axis=1)
    return ascii_to_arrow(codes)


def mobiles(rng: np.random.Generator, n: int) -> pa.StringArray:
    """Valid mobile numbers with the prefixes in common use (13x, 15x, 17x, 18x, 19x)."""
    second = np.array([3, 5, 7, 8, 9], dtype=np.int64)[rng.integers(0, 5, n)]
    numbers = 10**10 + second * 10**9 + rng.integers(0, 10**9, n, dtype=np.int64)
    return ascii_to_arrow(ascii_digits(numbers, 11))


# ---------------------------------------------------------------- cross-check samples for the SQL implementations

SampleKind = Literal["citizen_id", "uscc", "mobile", "district_code"]


def _corrupt(kind: SampleKind, value: str, r: random.Random, districts: list[str]) -> str:
    """One invalid variant of a valid value, covering the ways real values go wrong."""
    if kind == "citizen_id":
        choices = [
            lambda: value[:17] + r.choice([c for c in CITIZEN_ID_CHECK_CHARS if c != value[17]]),  # wrong check char
            lambda: _with_check(value[:10] + r.choice(["0230", "1301", "0000", "0431"]) + value[14:17]),  # no such date
            lambda: _with_check(value[:6] + "2999" + value[10:17]),  # born in the future
            lambda: value[:17],  # 17 chars
            lambda: value[:17] + "x" if value[17] == "X" else value[:16] + "x" + value[17],  # lower-case / misplaced x
            lambda: value.translate(_FULLWIDTH),  # full-width digits
            lambda: " " + value,
            lambda: "",
        ]
    elif kind == "uscc":
        choices = [
            lambda: value[:17] + r.choice([c for c in USCC_ALPHABET if c != value[17]]),
            lambda: value[:9] + r.choice("IOSVZ") + value[10:],  # letters outside the alphabet
            lambda: value.lower(),
            lambda: value[:17],
            lambda: value + "0",
            lambda: "",
        ]
    elif kind == "mobile":
        choices = [
            lambda: "1" + r.choice("012") + value[2:],
            lambda: value[:10],
            lambda: value + "8",
            lambda: "+86" + value,
            lambda: value.translate(_FULLWIDTH),
            lambda: "2" + value[1:],
            lambda: "",
        ]
    else:
        choices = [
            lambda: r.choice(["440103", "440300", "441201", "441299", "445200"]),  # elsewhere in Guangdong / unassigned
            lambda: districts[0][:5],
            lambda: r.choice(districts) + "0",
            lambda: "",
        ]
    return r.choice(choices)()


def _with_check(first17: str) -> str:
    return first17 + citizen_id_check_char(first17)


_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def sample_values(kind: SampleKind, n: int, seed: int, registry: "Registry | None" = None) -> list[str]:
    """``n`` values of ``kind`` (about half valid, half invalid in varied ways) for cross-checking rule implementations."""
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    districts = county_districts(registry)
    codes = np.array([int(c) for c in districts], dtype=np.int64)[rng.integers(0, len(districts), n)]
    if kind == "citizen_id":
        born = np.datetime64("1940-01-01") + rng.integers(0, 365 * 66, n).astype("timedelta64[D]")
        valid = citizen_ids(codes, born, rng.integers(0, 1000, n)).to_pylist()
    elif kind == "uscc":
        valid = usccs(codes, rng.integers(0, 31**7, n)).to_pylist()
    elif kind == "mobile":
        valid = mobiles(rng, n).to_pylist()
    elif kind == "district_code":
        valid = [str(c) for c in codes]
    else:
        raise ValueError(f"unknown sample kind {kind!r}; expected citizen_id, uscc, mobile or district_code")
    return [v if r.random() < 0.5 else _corrupt(kind, v, r, districts) for v in valid]


# ---------------------------------------------------------------- normalization of accepted spellings (issue 12, finding 9)
# The landing contract accepts several spellings of a typed value (registry/quality_policy.yaml: accepted_forms);
# ingestion stores the standard one and counts the change (quality.normalizations), never files it with the agency.
# Only values that already passed the contract are normalized; a value that cannot be normalized safely is kept.

STANDARD_PATTERNS: dict[str, str] = {
    "integer": r"^-?[0-9]+$",
    "decimal": r"^-?[0-9]+(?:\.[0-9]+)?$",
    "date": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    "timestamp": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\+08:00$",
    "year_month": r"^[0-9]{4}-[0-9]{2}$",
}
_YM_PARTS = r"^(?P<year>[0-9]{4})[-/]?(?P<month>[0-9]{1,2})$"
_DATE_PARTS = r"^(?P<year>[0-9]{4})[-/]?(?P<month>[0-9]{1,2})[-/]?(?P<day>[0-9]{1,2})$"
_TS_PARTS = (
    r"^(?P<year>[0-9]{4})[-/]?(?P<month>[0-9]{1,2})[-/]?(?P<day>[0-9]{1,2})(?:T|\s+)?"
    r"(?P<hour>[0-9]{1,2}):?(?P<minute>[0-9]{2})(?::?(?P<second>[0-9]{2}))?"
    r"(?P<tz>Z|[+-][0-9]{2}(?::?[0-9]{2})?)?$"
)


def _pad(col: pa.Array, width: int = 2) -> pa.Array:
    import pyarrow.compute as pc

    return pc.utf8_lpad(col, width, "0")


def _decimal_text(v: str | None) -> str | None:
    """'1e3' → '1000', '+1.5' → '1.5', '.5' → '0.5', '5.' → '5'; None when it is not a finite number."""
    from decimal import Decimal, InvalidOperation

    if v is None or not v.isascii():  # Decimal() would also read full-width or other Unicode digits
        return None
    try:
        d = Decimal(v)
    except InvalidOperation:
        return None
    if not d.is_finite() or abs(d.adjusted()) > 30:
        return None  # keep absurd exponents as delivered (the range rule judges them)
    text = format(d, "f")
    return "0" if text in ("-0", "+0") else text


def _timestamp_text(year, month, day, hour, minute, second, tz) -> str | None:
    off = dt.timedelta(0) if tz == "Z" else dt.timedelta(
        hours=int(tz[1:3]), minutes=int(tz[3:].lstrip(":") or 0)) * (1 if tz[0] == "+" else -1)
    try:
        t = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
                        tzinfo=dt.timezone(off))
    except ValueError:
        return None
    return t.astimezone(TZ).strftime(STANDARD_TIMESTAMP_FORMAT)


def normalize_text(values: pa.Array, kind: str) -> pa.Array:
    """The values in their standard spelling: trimmed (Unicode whitespace); for a typed ``kind`` (integer, decimal,
    date, timestamp, year_month) an accepted non-standard spelling rewritten to the standard one. Vectorized; a value
    not in an accepted spelling (the contract quarantines or nulls it) is only trimmed."""
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim_whitespace(values)
    if kind not in STANDARD_PATTERNS or len(trimmed) == 0:
        return trimmed
    odd = pc.invert(pc.match_substring_regex(trimmed, STANDARD_PATTERNS[kind])).fill_null(False)
    if not pc.any(odd).as_py():
        return trimmed
    if kind == "integer":
        fixed = pc.replace_substring_regex(trimmed, r"^\+", "")
    elif kind == "decimal":
        # a value that is no number at all stays as delivered (trimmed): the contract quarantines or nulls it
        fixed = pa.array([(_decimal_text(v) or v) if o else v for v, o in zip(trimmed.to_pylist(), odd.to_pylist())],
                         pa.string())
    elif kind in ("date", "year_month"):
        parts = pc.extract_regex(pc.if_else(odd, trimmed, ""), _DATE_PARTS if kind == "date" else _YM_PARTS)
        f = {n: pc.struct_field(parts, n) for n in (("year", "month", "day") if kind == "date" else ("year", "month"))}
        pieces = [f["year"], _pad(f["month"])] + ([_pad(f["day"])] if kind == "date" else [])
        fixed = pc.binary_join_element_wise(*pieces, "-")
    else:  # timestamp: naive = Beijing time; an offset converted to +08:00; a fractional second is kept as delivered
        parts = pc.extract_regex(pc.if_else(odd, trimmed, ""), _TS_PARTS)
        f = {n: pc.struct_field(parts, n) for n in ("year", "month", "day", "hour", "minute", "second", "tz")}
        second = pc.if_else(pc.equal(f["second"], ""), "00", f["second"])
        fixed = pc.binary_join_element_wise(
            pc.binary_join_element_wise(f["year"], _pad(f["month"]), _pad(f["day"]), "-"),
            pc.binary_join_element_wise(pc.binary_join_element_wise(_pad(f["hour"]), f["minute"], second, ":"),
                                        "+08:00", ""), "T")
        other_tz = pc.and_kleene(pc.not_equal(f["tz"], ""),
                                 pc.invert(pc.is_in(f["tz"], pa.array(["+08:00", "+0800", "+08"])))).fill_null(False)
        if pc.any(other_tz).as_py():
            rows = np.flatnonzero(other_tz.to_numpy(zero_copy_only=False))
            sub = {n: pc.take(c, pa.array(rows)).to_pylist() for n, c in f.items()}
            conv = [_timestamp_text(*(sub[n][i] for n in ("year", "month", "day", "hour", "minute", "second", "tz")))
                    for i in range(len(rows))]
            py = fixed.to_pylist()
            for r, v in zip(rows.tolist(), conv):
                py[r] = v
            fixed = pa.array(py, pa.string())
    ok = pc.and_kleene(odd, pc.is_valid(fixed)).fill_null(False)
    if kind in ("date", "timestamp", "year_month"):
        ok = pc.and_kleene(ok, pc.not_equal(pc.utf8_length(fixed), 0)).fill_null(False)
        ok = pc.and_kleene(ok, pc.match_substring_regex(fixed, STANDARD_PATTERNS[kind])).fill_null(False)
    return pc.if_else(ok, fixed, trimmed)
