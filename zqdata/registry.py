"""The registry (登记, Art. 17): agencies, datasets and their fields, code tables, scenarios, consumers.

Kept as YAML under ``registry/`` and validated when loaded; every other module reads it from here.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from zqdata.settings import repo_root

FieldType = Literal["string", "integer", "decimal", "date", "timestamp"]
FieldFormat = Literal["uscc", "citizen_id", "mobile", "district_code", "year_month"]
Level = Literal["一般", "重要", "核心"]  # GB/T 43697-2024
PersonalInfo = Literal["none", "personal", "sensitive"]
Openness = Literal["open", "conditional", "not_open"]
MaskMethod = Literal["keep", "pseudonymize", "mask", "age_band", "suppress"]
SubjectType = Literal["person", "enterprise"]


class RegistryError(ValueError):
    """The registry files are inconsistent or incomplete."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contact(_Strict):
    person: str
    email: str
    webhook: str = ""

    def webhook_url(self) -> str:
        """The webhook with ``${VAR:-default}`` references resolved from the environment."""

        def sub(m: re.Match) -> str:
            return os.environ.get(m.group(1)) or (m.group(2) or "")

        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", sub, self.webhook)


class Agency(_Strict):
    code: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    name: str
    name_en: str
    contact: Contact


class Classification(_Strict):
    level: Level
    pi: PersonalInfo
    openness: Openness
    confidential: bool


class MaskRule(_Strict):
    method: MaskMethod
    keep_first: int | None = None
    keep_last: int | None = None
    band_years: int | None = None


class Range(_Strict):
    min: float | None = None
    max: float | None = None


class DatasetField(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    type: FieldType
    cn_name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    required: bool
    format: FieldFormat | None = None
    code_table: str | None = None
    range: Range | None = None
    class_: Classification = Field(alias="class")
    mask: MaskRule
    # Pseudonym linkage (issue 11, finding 6): pseudonymized fields sharing a link_role get equal pseudonyms within one
    # ops schema; without it every field is its own role <dataset>.<field>. A link is a reviewed registry decision.
    link_role: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$")


class Delivery(_Strict):
    format: Literal["csv", "jsonl", "parquet"]
    encoding: Literal["utf-8", "gbk"] = "utf-8"
    sla_hours: int = Field(gt=0, description="hours after the end of the partition day")
    volume_share: float = Field(gt=0, le=1)


class Consent(_Strict):
    subject_type: SubjectType
    subject_field: str


class Registration(_Strict):
    """A registration (登记, Art. 17) made before the operational DB kept the procedure: its code and date. Imported by
    zqdata.governance.registration as the subject's first record, in state code_assigned (赋码)."""

    code: str = Field(pattern=r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$", max_length=64)
    registered_on: dt.date


class Dataset(_Strict):
    code: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    name: str
    name_en: str
    agency: str
    description: str
    delivery: Delivery
    primary_key: list[str]
    event_time_field: str
    consent: Consent | None = None
    release: bool = True
    registration: Registration | None = None  # the resource's registration code (Art. 17); None: not registered yet
    fields: list[DatasetField]

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> DatasetField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.code} has no field {name!r}")

    @model_validator(mode="after")
    def _fields_consistent(self) -> "Dataset":
        names = self.field_names
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.code}: duplicate field names")
        for key in [*self.primary_key, self.event_time_field] + ([self.consent.subject_field] if self.consent else []):
            if key not in names:
                raise ValueError(f"dataset {self.code}: {key!r} is not one of its fields")
        return self


class Scenario(_Strict):
    code: str
    name: str
    purpose: str
    kind: Literal["public_interest", "commercial"]
    operator: str
    developer: str
    status: Literal["active", "revoked"]
    valid_from: dt.date
    valid_to: dt.date
    consent_required: SubjectType | None = None
    k_anonymity: int | None = Field(default=None, ge=2)
    product: str
    product_registration: Registration | None = None  # the product's registration code (Art. 17); None: not yet
    authorized_fields: dict[str, list[str]]


class Consumer(_Strict):
    code: str
    name: str
    scenarios: list[str]
    credential_hash: str


def mask_rule_problems(dataset: "Dataset", f: DatasetField) -> list[str]:
    """Classification → mask consistency (Arts. 2, 24): what may never leave the gov platform as delivered."""
    where = f"{dataset.code}.{f.name}"
    problems: list[str] = []
    if f.class_.confidential and f.mask.method != "suppress":
        problems.append(f"{where}: 涉密字段必须 suppress (confidential field must be suppressed, Art. 2)")
    if dataset.release and f.mask.method == "keep":
        if f.class_.openness == "not_open":
            problems.append(f"{where}: 不予开放字段不得原样发布 (not_open field cannot be released with mask: keep)")
        if f.class_.pi == "sensitive":
            problems.append(f"{where}: 敏感个人信息不得原样发布 (sensitive personal field cannot use mask: keep)")
        # 一般-level personal attributes (e.g. gender) are quasi-identifiers kept for statistics;
        # 重要/核心 personal information must be masked, generalized, pseudonymized or suppressed.
        if f.class_.pi == "personal" and f.class_.level != "一般":
            problems.append(f"{where}: {f.class_.level}级个人信息不得原样发布 (personal field of level "
                            f"{f.class_.level} cannot use mask: keep)")
    return problems


def _link_role_problems(datasets) -> list[str]:
    """A link_role links pseudonyms: only on pseudonymized fields, of one format, and shared by at least two fields."""
    problems: list[str] = []
    roles: dict[str, list[tuple[str, DatasetField]]] = {}
    for ds in datasets:
        for f in ds.fields:
            if f.link_role is None:
                continue
            if f.mask.method != "pseudonymize":
                problems.append(f"{ds.code}.{f.name}: link_role 仅用于假名化字段 (link_role needs mask: pseudonymize)")
            roles.setdefault(f.link_role, []).append((f"{ds.code}.{f.name}", f))
    for role, fields in roles.items():
        names = [n for n, _ in fields]
        if len(fields) < 2:
            problems.append(f"link_role {role!r} 只有一个字段 {names[0]}，未关联任何字段 (links nothing: one field only)")
        if len({f.format for _, f in fields}) > 1:
            problems.append(f"link_role {role!r}: 字段格式不一致 {names} (linked fields must share one format)")
    return problems


def _registration_code_problems(reg: "Registry") -> list[str]:
    """A registration code names one subject: never two datasets or products with the same code."""
    holders: dict[str, list[str]] = {}
    for ds in reg.datasets.values():
        if ds.registration:
            holders.setdefault(ds.registration.code, []).append(f"dataset {ds.code}")
    for sc in reg.scenarios.values():
        if sc.product_registration:
            holders.setdefault(sc.product_registration.code, []).append(f"product {sc.product}")
    return [f"登记编码 {code} 重复 (registration code used twice): {', '.join(who)}"
            for code, who in sorted(holders.items()) if len(who) > 1]


PolicyAction = Literal["normalize", "trim", "null_value", "quarantine_record"]
PolicySeverity = Literal["none", "warn", "error"]
POLICY_CASES = ("accepted_form", "whitespace", "invalid_optional", "invalid_required")
_POLICY_KINDS = ("integer", "decimal", "date", "timestamp", "year_month")


class PolicyCase(_Strict):
    """One kind of delivered value and what ingestion does with it (issue 12, finding 9)."""

    case: Literal["accepted_form", "whitespace", "invalid_optional", "invalid_required"]
    cn: str
    en: str
    action: PolicyAction
    severity: PolicySeverity  # none: no finding, nothing filed with the agency; counted in quality.normalizations
    recorded_in: Literal["quality.normalizations", "quality.findings"]

    @model_validator(mode="after")
    def _consistent(self) -> "PolicyCase":
        kept = self.action in ("normalize", "trim")
        if kept != (self.severity == "none") or kept != (self.recorded_in == "quality.normalizations"):
            raise ValueError(f"quality_policy {self.case}: 规范化/去空白（值保留）才可无发现，记入 quality.normalizations；"
                             "置空或隔离须有 warn/error 发现 (kept values: severity none; nulled/quarantined: a finding)")
        if self.action == "quarantine_record" and self.severity != "error":
            raise ValueError(f"quality_policy {self.case}: 隔离记录须为 error (a quarantined record is an error)")
        return self


class QualityPolicy(_Strict):
    """The severity policy (registry/quality_policy.yaml): accepted spellings per kind and the handling of each case."""

    accepted_forms: dict[str, list[str]]
    cases: list[PolicyCase]

    def case(self, name: str) -> PolicyCase:
        for c in self.cases:
            if c.case == name:
                return c
        raise KeyError(name)

    @model_validator(mode="after")
    def _complete(self) -> "QualityPolicy":
        names = [c.case for c in self.cases]
        if sorted(names) != sorted(POLICY_CASES):
            raise ValueError(f"quality_policy: cases must be exactly {', '.join(POLICY_CASES)} once each, got {names}")
        if sorted(self.accepted_forms) != sorted(_POLICY_KINDS) or not all(self.accepted_forms.values()):
            raise ValueError(f"quality_policy: accepted_forms must list {', '.join(_POLICY_KINDS)} (standard form first)")
        if self.case("invalid_optional").action != "null_value":
            raise ValueError("quality_policy invalid_optional: 可选字段无效时置空、保留记录 (action must be null_value)")
        return self


class Registry(_Strict):
    agencies: dict[str, Agency]
    datasets: dict[str, Dataset]
    code_tables: dict[str, dict[str, str]]
    scenarios: dict[str, Scenario]
    consumers: dict[str, Consumer]
    quality_policy: QualityPolicy = Field(default_factory=lambda: load_quality_policy())

    def agency_of(self, dataset: str) -> Agency:
        return self.agencies[self.datasets[dataset].agency]

    def scenario_for_product(self, product: str) -> Scenario:
        for s in self.scenarios.values():
            if s.product == product:
                return s
        raise KeyError(f"no scenario registers product {product!r}")

    @model_validator(mode="after")
    def _references_resolve(self) -> "Registry":
        problems: list[str] = []
        for ds in self.datasets.values():
            if ds.agency not in self.agencies:
                problems.append(f"dataset {ds.code}: unknown agency {ds.agency!r}")
            for f in ds.fields:
                if f.code_table and f.code_table not in self.code_tables:
                    problems.append(f"{ds.code}.{f.name}: unknown code table {f.code_table!r}")
                if f.mask.method == "mask" and (f.mask.keep_first is None or f.mask.keep_last is None):
                    problems.append(f"{ds.code}.{f.name}: mask needs keep_first and keep_last")
                if f.mask.method == "age_band" and (f.type != "date" or not f.mask.band_years):
                    problems.append(f"{ds.code}.{f.name}: age_band needs a date field and band_years")
                problems.extend(mask_rule_problems(ds, f))
        problems.extend(_link_role_problems(self.datasets.values()))
        for sc in self.scenarios.values():
            for ds_code, fields in sc.authorized_fields.items():
                if ds_code not in self.datasets:
                    problems.append(f"scenario {sc.code}: unknown dataset {ds_code!r}")
                    continue
                ds = self.datasets[ds_code]
                if not ds.release:
                    problems.append(f"scenario {sc.code}: dataset {ds_code} is release: false (never released)")
                for name in fields:
                    if name not in ds.field_names:
                        problems.append(f"scenario {sc.code}: {ds_code} has no field {name!r}")
                    elif ds.field(name).mask.method == "suppress":
                        problems.append(f"scenario {sc.code}: {ds_code}.{name} is suppressed and cannot be authorized")
            if sc.valid_to < sc.valid_from:
                problems.append(f"scenario {sc.code}: valid_to before valid_from")
        problems.extend(_registration_code_problems(self))
        for c in self.consumers.values():
            for s in c.scenarios:
                if s not in self.scenarios:
                    problems.append(f"consumer {c.code}: unknown scenario {s!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def registry_dir() -> Path:
    return Path(os.environ.get("ZQ_REGISTRY_DIR", repo_root() / "registry"))


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def load_quality_policy(directory: Path | None = None) -> QualityPolicy:
    """The severity policy of ``registry/quality_policy.yaml`` (validated)."""
    d = Path(directory) if directory else registry_dir()
    return QualityPolicy.model_validate(_read_yaml(d / "quality_policy.yaml")["quality_policy"])


def load_registry(directory: Path | None = None) -> Registry:
    """Read and validate the registry; raises RegistryError naming every problem found."""
    d = Path(directory) if directory else registry_dir()
    try:
        agencies = _read_yaml(d / "agencies.yaml")["agencies"]
        code_tables = {
            name: {str(k): str(v) for k, v in table.items()}
            for name, table in _read_yaml(d / "code_tables.yaml")["code_tables"].items()
        }
        datasets = [_read_yaml(p) for p in sorted((d / "datasets").glob("*.yaml"))]
        scenarios = _read_yaml(d / "scenarios.yaml")["scenarios"]
        consumers = _read_yaml(d / "consumers.yaml")["consumers"]
        return Registry(
            agencies={a["code"]: a for a in agencies},
            datasets={ds["code"]: ds for ds in datasets},
            code_tables=code_tables,
            scenarios={s["code"]: s for s in scenarios},
            consumers={c["code"]: c for c in consumers},
            quality_policy=load_quality_policy(d),
        )
    except (OSError, KeyError, TypeError, yaml.YAMLError, ValueError) as exc:
        raise RegistryError(f"registry at {d} is invalid: {exc}") from exc


@functools.cache
def registry() -> Registry:
    """The process-wide registry, loaded once on first use (never at import)."""
    return load_registry()
