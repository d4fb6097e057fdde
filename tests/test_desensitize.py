"""Mask rules as DuckDB SQL: HMAC equal to Python's hmac, partial masking, age bands, and refusals."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from zqdata.desensitize import (
    DesensitizationError,
    PseudonymKey,
    domain_secret,
    key_from_env,
    mask_expression,
    pseudonym_role,
    pseudonymize,
    release_select,
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


# -- pseudonym domains (issue 11, finding 6) ------------------------------------------------------------------

SECRET = "a-32-byte-secret-for-the-tests!!"


def _scopes() -> list[str]:
    return ["desensitized"] + [f"scenario_{code}" for code in load_registry().scenarios]


@pytest.mark.parametrize("secret", [SECRET, "长" * 40, b"\x00\xff" * 16])
def test_domain_keys_differ_from_the_master_and_from_each_other(secret):
    master = PseudonymKey.from_secret(secret)
    domains = [(r, s) for r in ("resident_population.citizen_id", "enterprise_registry.legal_rep_id", "person")
               for s in _scopes()]
    keys = {d: master.for_domain(*d) for d in domains}
    assert len({k.ipad for k in keys.values()} | {master.ipad}) == len(domains) + 1
    for (role, scope), k in keys.items():
        # the derived key is HMAC(master, "zq-pseudonym/v1|role|scope") (Python reference), 32 bytes
        assert k == PseudonymKey.from_secret(domain_secret(secret, role, scope))
        assert len(domain_secret(secret, role, scope)) == 32
        assert repr(k) == "PseudonymKey(<redacted>)"
    assert master.for_domain("person", "desensitized") == keys[("person", "desensitized")]  # deterministic


def test_a_domain_label_is_unambiguous_and_the_reference_needs_role_and_scope():
    key = PseudonymKey.from_secret(SECRET)
    with pytest.raises(DesensitizationError, match="invalid pseudonym domain"):
        key.for_domain("a|b", "c")
    with pytest.raises(DesensitizationError, match="invalid pseudonym domain"):
        key.for_domain("a", "")
    with pytest.raises(DesensitizationError, match="both role and scope"):
        pseudonymize("x", SECRET, role="a")


def test_key_id_is_a_stable_public_fingerprint_of_the_master_key():
    import hashlib
    import hmac

    a, b = PseudonymKey.from_secret(SECRET), PseudonymKey.from_secret(SECRET[::-1])
    assert a.key_id() == PseudonymKey.from_secret(SECRET).key_id() != b.key_id()
    assert a.key_id() == hmac.new(SECRET.encode(), b"zq-key-id", hashlib.sha256).hexdigest()[:8]


def test_release_select_sql_equals_the_python_reference_per_domain():
    """Every pseudonymized field of every released dataset, in every scope: DuckDB's HMAC with the field's domain key
    (bound as its own parameters) equals pseudonymize(value, master, role=<dataset>.<field>, scope=<schema>)."""
    reg = load_registry()
    key = PseudonymKey.from_secret(SECRET)
    values = ["11010519491231002X", "", "CARD-0001", "长值" * 50, None]
    con = duckdb.connect()
    checked = 0
    for ds in (d for d in reg.datasets.values() if d.release):
        names = [f.name for f in ds.fields if f.mask.method == "pseudonymize"]
        if not names:
            continue
        con.execute(f"CREATE OR REPLACE TABLE src AS SELECT * FROM (VALUES {', '.join(['(?)'] * len(values))}) t(v)",
                    values)
        cols = ", ".join(f"v AS {n}" for n in names)
        con.execute(f"CREATE OR REPLACE TABLE t AS SELECT row_number() OVER () AS i, {cols} FROM src")
        for scope in _scopes():
            items, params = release_select(ds, names, D, key, scope, "t")
            assert set(params) == {f"zq_{p}pad_{i}" for i in range(len(names)) for p in "io"}
            assert all(isinstance(v, bytes) for v in params.values())
            sql = " ".join(items)
            assert not re.search(r"\$zq_[io]pad\b", sql) and SECRET not in sql  # never the master key's pads
            rows = con.execute(f"SELECT {', '.join(items)} FROM t ORDER BY i", params).fetchall()
            for j, name in enumerate(names):
                role = pseudonym_role(ds, ds.field(name))
                assert role == f"{ds.code}.{name}"
                assert [r[j] for r in rows] == [None if v is None else pseudonymize(v, SECRET, role=role, scope=scope)
                                                for v in values], (ds.code, name, scope)
                checked += 1
    assert checked >= 7 * len(_scopes())  # card_id, swipe_id, citizen_id, legal_rep_id, record_id, two meter_ids


def test_the_same_value_in_two_roles_or_two_scopes_gets_unrelated_pseudonyms():
    v = "441202199001011234"
    p = {(r, s): pseudonymize(v, SECRET, role=r, scope=s)
         for r in ("resident_population.citizen_id", "enterprise_registry.legal_rep_id")
         for s in ("desensitized", "scenario_sme_credit_profile")}
    assert len(set(p.values()) | {pseudonymize(v, SECRET)}) == 5


def test_the_registry_links_no_pseudonyms_today():
    """No product joins on a pseudonymized column across datasets (ops_transit_ridership counts card_id within one
    table; ops_sme_credit_profile joins on credit_code, kept): so no field declares a link_role. Adding one is a
    reviewed registry decision; update this test with it."""
    reg = load_registry()
    assert [f"{d.code}.{f.name}" for d in reg.datasets.values() for f in d.fields if f.link_role] == []


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


def _link(directory: Path, role: str, *fields: str) -> None:
    for qualified in fields:
        ds, name = qualified.split(".")
        _set_field(directory, ds, name, link_role=role)


@pytest.mark.parametrize("links,message", [
    ([("person", "resident_population.citizen_id")], "links nothing: one field only"),
    ([("person", "resident_population.citizen_id"), ("person", "resident_population.phone")],
     "link_role needs mask: pseudonymize"),
    ([("person", "resident_population.citizen_id"), ("person", "bus_card_swipes.card_id")], "share one format"),
    ([("Person", "resident_population.citizen_id"), ("Person", "enterprise_registry.legal_rep_id")], "link_role"),
    ([("a|b", "resident_population.citizen_id"), ("a|b", "enterprise_registry.legal_rep_id")], "link_role"),
])
def test_registry_refuses_an_unsound_link_role(registry_copy, links, message):
    for role, field in links:
        _link(registry_copy, role, field)
    with pytest.raises(RegistryError, match=message):
        load_registry(registry_copy)


def test_a_declared_link_role_gives_both_fields_the_same_pseudonym_in_one_scope_only(registry_copy):
    _link(registry_copy, "person", "resident_population.citizen_id", "enterprise_registry.legal_rep_id")
    reg = load_registry(registry_copy)
    rp, er = reg.datasets["resident_population"], reg.datasets["enterprise_registry"]
    assert pseudonym_role(rp, rp.field("citizen_id")) == pseudonym_role(er, er.field("legal_rep_id")) == "person"
    key, con = PseudonymKey.from_secret(SECRET), duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT '441202199001011234' AS citizen_id, '441202199001011234' AS legal_rep_id")

    def release(ds, name, scope):
        items, params = release_select(ds, [name], D, key, scope, "t")
        return con.execute(f"SELECT {items[0]} FROM t", params).fetchone()[0]

    assert release(rp, "citizen_id", "desensitized") == release(er, "legal_rep_id", "desensitized")
    assert release(rp, "citizen_id", "desensitized") != release(er, "legal_rep_id", "scenario_sme_credit_profile")


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
