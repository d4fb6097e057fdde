"""Mask rules as DuckDB SQL: HMAC equal to Python's hmac, partial masking, age bands, and refusals."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from zqdata.desensitize import (
    DesensitizationError,
    PseudonymKey,
    key_from_env,
    mask_expression,
    pseudonymize,
)
from zqdata.registry import DatasetField, MaskRule, RegistryError, load_registry
from zqdata.settings import repo_root

D = dt.date(2025, 5, 1)


def _eval(f: DatasetField, values: list, key: PseudonymKey | None = None, sql_type: str = "VARCHAR") -> list:
    ds = load_registry().datasets["resident_population"]
    expr = mask_expression(ds, f, D, "v")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t (i INTEGER, v {sql_type})")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
    params = key.params() if key and "$zq_" in expr else {}
    return [r[0] for r in con.execute(f"SELECT {expr} FROM t ORDER BY i", params).fetchall()]


def _field(name: str, **mask) -> DatasetField:
    base = load_registry().datasets["resident_population"].field(name)
    return base.model_copy(update={"mask": MaskRule(**mask)})


@pytest.mark.parametrize("secret", ["k" * 32, "a-32-byte-secret-for-the-tests!!", "长" * 40, b"\x00\xff" * 16])
def test_sql_hmac_equals_python_hmac(secret):
    values = ["11010519491231002X", "", "张三", "CARD-0001", "x" * 200, None]
    got = _eval(_field("citizen_id", method="pseudonymize"), values, PseudonymKey.from_secret(secret))
    assert got == [None if v is None else pseudonymize(v, secret) for v in values]


@pytest.mark.parametrize("first,last,value,expected", [
    (3, 4, "13800138000", "138****8000"),
    (1, 0, "张三", "张*"),
    (1, 0, "欧阳娜娜", "欧***"),
    (1, 0, "张", "*"),            # nothing is ever shown whole
    (3, 4, "1380013", "*******"),
    (3, 4, None, None),
])
def test_partial_masking(first, last, value, expected):
    assert _eval(_field("phone", method="mask", keep_first=first, keep_last=last), [value]) == [expected]


@pytest.mark.parametrize("birth,expected", [
    (dt.date(1995, 5, 1), "30-39"),   # 30th birthday on the partition date
    (dt.date(1995, 5, 2), "20-29"),   # one day short of 30
    (dt.date(2025, 5, 1), "0-9"),
    (dt.date(2030, 1, 1), None),      # a future birth date is not banded
    (None, None),
])
def test_age_band_at_the_partition_date(birth, expected):
    got = _eval(_field("birth_date", method="age_band", band_years=10), [birth], sql_type="DATE")
    assert got == [expected]


def test_suppress_releases_no_column_and_keep_is_the_value():
    assert mask_expression(load_registry().datasets["resident_population"], _field("address", method="suppress"), D) is None
    assert _eval(_field("district_code", method="keep"), ["441202"]) == ["441202"]


def test_unknown_method_is_refused_at_the_boundary():
    f = _field("district_code", method="keep")
    bad = f.model_copy(update={"mask": MaskRule.model_construct(method="shuffle")})
    with pytest.raises(DesensitizationError, match="未知脱敏方法 'shuffle'.*unknown mask method"):
        mask_expression(load_registry().datasets["resident_population"], bad, D)


def test_missing_rule_is_refused_at_the_boundary():
    f = _field("district_code", method="keep")
    bad = f.model_copy(update={"mask": None})
    with pytest.raises(DesensitizationError, match="no mask rule"):
        mask_expression(load_registry().datasets["resident_population"], bad, D)


def test_key_is_required_from_the_environment(monkeypatch):
    monkeypatch.delenv("ZQ_PSEUDONYM_KEY", raising=False)
    with pytest.raises(DesensitizationError, match="ZQ_PSEUDONYM_KEY"):
        key_from_env()
    monkeypatch.setenv("ZQ_PSEUDONYM_KEY", "s3cret-s3cret-s3cret-s3cret-s3cret")
    assert "s3cret" not in repr(key_from_env())


@pytest.mark.parametrize("secret", ["x", "s3cret", "31-bytes-is-one-byte-too-short!", b"\x01" * 31])
def test_a_short_key_is_refused_with_a_clear_message(monkeypatch, secret):
    """A 1-byte key was recovered from a pseudonym by brute force (issue 11, finding 6): at least 32 bytes."""
    with pytest.raises(DesensitizationError, match="32"):
        PseudonymKey.from_secret(secret)
    if isinstance(secret, str):
        monkeypatch.setenv("ZQ_PSEUDONYM_KEY", secret)
        with pytest.raises(DesensitizationError, match="ZQ_PSEUDONYM_KEY"):
            key_from_env()


# -- classification → mask rules refused when the registry loads ----------------------------------------------


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "registry"
    shutil.copytree(repo_root() / "registry", dst)
    return dst


def _set_field(directory: Path, dataset: str, field: str, **changes) -> None:
    path = directory / "datasets" / f"{dataset}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for f in doc["fields"]:
        if f["name"] == field:
            for k, v in changes.items():
                f[k] = v if not isinstance(v, dict) else {**f.get(k, {}), **v}
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")


@pytest.mark.parametrize("dataset,field,changes,message", [
    ("bus_card_swipes", "card_id", {"mask": {"method": "keep"}}, "not_open field cannot be released"),
    ("resident_population", "case_flag", {"mask": {"method": "pseudonymize"}}, "confidential field must be suppressed"),
    ("enterprise_registry", "legal_rep_id", {"mask": {"method": "keep"}}, "sensitive personal field"),
    ("enterprise_registry", "legal_rep_name", {"mask": {"method": "keep"}}, "personal field of level 重要"),
])
def test_registry_refuses_a_field_released_as_is_against_its_classification(registry_copy, dataset, field, changes,
                                                                          message):
    _set_field(registry_copy, dataset, field, **changes)
    with pytest.raises(RegistryError, match=message):
        load_registry(registry_copy)


def test_registry_refuses_a_scenario_authorizing_a_suppressed_field(registry_copy):
    path = registry_copy / "scenarios.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["scenarios"][0]["authorized_fields"]["resident_population"] = ["name"]
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RegistryError, match="resident_population.name is suppressed"):
        load_registry(registry_copy)


def test_security_doc_classification_table_is_current():
    from zqdata.desensitize import render_security_doc

    text = (repo_root() / "docs" / "security.md").read_text(encoding="utf-8")
    assert text == render_security_doc(text, load_registry()), "run: zq audit classification --write"
