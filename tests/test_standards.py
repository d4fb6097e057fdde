"""GB 11643 / GB 32100 / mobile / GB/T 2260 reference rules and the generators of valid values."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from zqdata import standards
from zqdata.registry import load_registry
from zqdata.standards import (
    CITIZEN_ID_CHECK_CHARS,
    USCC_ALPHABET,
    citizen_id_check_char,
    is_valid_citizen_id,
    is_valid_mobile,
    is_valid_uscc,
    uscc_check_char,
)

# Published examples (DOMAIN.md, GB 11643 textbook example, two well-known enterprises' codes).
VALID_CITIZEN_IDS = ["11010519491231002X", "440524188001010014"]
VALID_USCCS = ["91350100M000100Y43", "914403001922038216", "9144030071526726XG"]


@pytest.mark.parametrize("cid", VALID_CITIZEN_IDS)
def test_valid_citizen_ids_pass(cid: str) -> None:
    assert is_valid_citizen_id(cid)
    assert citizen_id_check_char(cid[:17]) == cid[17]


@pytest.mark.parametrize("cid", VALID_CITIZEN_IDS)
def test_every_wrong_citizen_id_check_char_is_rejected(cid: str) -> None:
    wrong = [c for c in CITIZEN_ID_CHECK_CHARS if c != cid[17]]
    assert len(wrong) == 10
    assert not any(is_valid_citizen_id(cid[:17] + c) for c in wrong)


@pytest.mark.parametrize(
    "birth, why",
    [("19490230", "30 Feb"), ("19491301", "month 13"), ("19490000", "day 0"), ("19000229", "1900 not a leap year"),
     ("20990101", "future")],
)
def test_impossible_birth_dates_are_rejected_even_with_a_correct_check_char(birth: str, why: str) -> None:
    first17 = "110105" + birth + "002"
    assert not is_valid_citizen_id(first17 + citizen_id_check_char(first17)), why


def test_birth_date_not_after_today() -> None:
    first17 = "441202" + "20250502" + "001"
    cid = first17 + citizen_id_check_char(first17)
    assert is_valid_citizen_id(cid, today=dt.date(2025, 5, 2))
    assert not is_valid_citizen_id(cid, today=dt.date(2025, 5, 1))


@pytest.mark.parametrize(
    "bad",
    ["11010519491231002x", "11010519491231002", "11010519491231002XX", " 11010519491231002X",
     "１１010519491231002X", "", None, 11010519491231002],
)
def test_malformed_citizen_ids_are_rejected(bad: object) -> None:
    assert not is_valid_citizen_id(bad)


@pytest.mark.parametrize("code", VALID_USCCS)
def test_valid_usccs_pass(code: str) -> None:
    assert is_valid_uscc(code)
    assert uscc_check_char(code[:17]) == code[17]


@pytest.mark.parametrize("code", VALID_USCCS)
def test_every_wrong_uscc_check_char_is_rejected(code: str) -> None:
    wrong = [c for c in USCC_ALPHABET if c != code[17]]
    assert len(wrong) == 30
    assert not any(is_valid_uscc(code[:17] + c) for c in wrong)


def test_uscc_check_value_31_is_written_as_zero() -> None:
    # An all-zero body has S = 0, so C = 31 - 0 = 31, which GB 32100 writes as "0".
    body = "0" * 17
    assert uscc_check_char(body) == "0"
    assert is_valid_uscc(body + "0")


@pytest.mark.parametrize(
    "bad", ["91350100m000100y43", "91350100M000100Y4", "91350100M000100Y430", "91350100I000100Y43", "", None]
)
def test_malformed_usccs_are_rejected(bad: object) -> None:
    assert not is_valid_uscc(bad)


@pytest.mark.parametrize(
    "value, ok",
    [("13800138000", True), ("19912345678", True), ("12800138000", False), ("1380013800", False),
     ("138001380000", False), ("+8613800138000", False), ("１３８００１３８０００", False), ("", False), (None, False)],
)
def test_mobile(value: object, ok: bool) -> None:
    assert is_valid_mobile(value) is ok


def test_districts_come_from_the_registry_code_table() -> None:
    reg = load_registry()
    assert standards.zhaoqing_districts(reg) == reg.code_tables["district"]
    assert standards.ZHAOQING_DISTRICTS == reg.code_tables["district"]
    assert "441202" in standards.county_districts(reg) and "441200" not in standards.county_districts(reg)
    assert standards.is_zhaoqing_district("441284", reg) and not standards.is_zhaoqing_district("440103", reg)


def test_generated_citizen_ids_are_valid_and_encode_their_inputs() -> None:
    rng = np.random.default_rng(3)
    n = 500
    districts = np.array([int(c) for c in standards.county_districts()])[rng.integers(0, 8, n)]
    born = np.datetime64("1930-01-01") + rng.integers(0, 365 * 90, n).astype("timedelta64[D]")
    seq = rng.integers(0, 1000, n)
    ids = standards.citizen_ids(districts, born, seq).to_pylist()
    assert all(is_valid_citizen_id(x) for x in ids)
    assert [x[:6] for x in ids] == [str(d) for d in districts]
    assert [standards.citizen_id_birth_date(x) for x in ids] == [b.astype(dt.date) for b in born]


def test_generated_usccs_are_valid_distinct_and_carry_the_district() -> None:
    rng = np.random.default_rng(4)
    n = 500
    districts = np.array([int(c) for c in standards.county_districts()])[rng.integers(0, 8, n)]
    codes = standards.usccs(districts, np.arange(n) * 7919 + 31**7 - n * 7919).to_pylist()
    assert all(is_valid_uscc(c) for c in codes)
    assert len(set(codes)) == n
    assert [c[2:8] for c in codes] == [str(d) for d in districts]


def test_generated_mobiles_are_valid() -> None:
    assert all(is_valid_mobile(m) for m in standards.mobiles(np.random.default_rng(5), 300).to_pylist())


@pytest.mark.parametrize(
    "kind, rule",
    [("citizen_id", is_valid_citizen_id), ("uscc", is_valid_uscc), ("mobile", is_valid_mobile),
     ("district_code", standards.is_zhaoqing_district)],
)
def test_sample_values_mix_valid_and_invalid_deterministically(kind: str, rule) -> None:
    values = standards.sample_values(kind, 200, seed=11)
    assert values == standards.sample_values(kind, 200, seed=11)
    verdicts = [rule(v) for v in values]
    assert 40 < sum(verdicts) < 160  # both kinds well represented


def test_sample_values_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        standards.sample_values("passport", 3, seed=1)  # type: ignore[arg-type]


def test_normalize_text_rewrites_only_ascii_accepted_decimals_and_keeps_the_rest_as_delivered():
    """'1e3' → '1000'; full-width digits and non-numbers are not accepted spellings: kept (trimmed) for the contract."""
    import pyarrow as pa

    from zqdata.standards import normalize_text

    out = normalize_text(pa.array(["1e3", " +1.5 ", "４.００", "约100", None]), "decimal").to_pylist()
    assert out == ["1000", "1.5", "４.００", "约100", None]
