"""一场景一授权 (Art. 23) and product-user identity (Art. 25): scenario validity, authorized fields, consumer credentials,
and the audited delivery of a scenario product to a registered consumer.

Consumer credentials are stored in ``registry/consumers.yaml`` only as ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``
(PBKDF2-HMAC-SHA256 of the UTF-8 credential) and compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import duckdb

from zqdata import audit
from zqdata.registry import Registry, Scenario
from zqdata.settings import TZ

PBKDF2_ITERATIONS = 600_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256
_HASH_RE = re.compile(r"^pbkdf2_sha256\$(\d+)\$([0-9a-f]+)\$([0-9a-f]{64})$")
# Verifying an unknown consumer still costs one PBKDF2 run, so timing does not reveal which codes exist.
_DUMMY_HASH = "pbkdf2_sha256$600000$00000000000000000000000000000000$" + "0" * 64


class AuthorizationError(PermissionError):
    """Use outside the scenario's authorization: expired, revoked, or an unauthorized dataset/field."""


class UnauthorizedFieldError(AuthorizationError):
    """A field the scenario is not authorized to read."""


class AccessDenied(PermissionError):
    """A delivery refused to the requester (unknown consumer, wrong credential, product not theirs)."""


def check_scenario_active(scenario: Scenario, day: dt.date) -> None:
    """Raise AuthorizationError unless the scenario is active and ``day`` lies in valid_from..valid_to."""
    if scenario.status != "active":
        raise AuthorizationError(
            f"场景 {scenario.code} 的授权已撤销，禁止使用 (authorization of scenario {scenario.code} is {scenario.status})"
        )
    if not scenario.valid_from <= day <= scenario.valid_to:
        raise AuthorizationError(
            f"场景 {scenario.code} 的授权期限为 {scenario.valid_from} 至 {scenario.valid_to}，{day} 不在期限内 "
            f"(authorization of scenario {scenario.code} is not valid on {day}: expired or not yet in force)"
        )


def authorized_fields(registry: Registry, scenario_code: str, dataset: str) -> list[str]:
    """The fields of ``dataset`` that scenario ``scenario_code`` may read (registry ``authorized_fields``)."""
    scenario = registry.scenarios.get(scenario_code)
    if scenario is None:
        raise AuthorizationError(f"未登记的场景 {scenario_code} (unknown scenario)")
    if dataset not in scenario.authorized_fields:
        raise UnauthorizedFieldError(f"场景 {scenario_code} 未授权数据集 {dataset} (unauthorized dataset)")
    return list(scenario.authorized_fields[dataset])


def check_fields_authorized(registry: Registry, scenario_code: str, dataset: str, fields: list[str]) -> None:
    """Raise UnauthorizedFieldError naming the first field the scenario may not read."""
    allowed = set(authorized_fields(registry, scenario_code, dataset))
    for name in fields:
        if name not in allowed:
            raise UnauthorizedFieldError(f"场景 {scenario_code} 未授权字段 {dataset}.{name} (unauthorized field)")


def check_product_authorized(registry: Registry, product: str, partition_date: dt.date) -> Scenario:
    """The scenario owning ``product`` if it may be built/delivered for ``partition_date``; else AuthorizationError."""
    try:
        scenario = registry.scenario_for_product(product)
    except KeyError as exc:
        raise AuthorizationError(f"产品 {product} 未在任何场景登记 (product not registered to a scenario)") from exc
    check_scenario_active(scenario, partition_date)
    return scenario


def hash_credential(credential: str, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The registry form of a consumer credential: ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", credential.encode("utf-8"), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_credential(credential: str, stored_hash: str) -> bool:
    """True when ``credential`` matches ``stored_hash``; constant-time comparison, False on a malformed hash."""
    m = _HASH_RE.match(stored_hash or "")
    if not m:
        m = _HASH_RE.match(_DUMMY_HASH)
        ok_format = False
    else:
        ok_format = True
    iterations, salt, expected = int(m.group(1)), bytes.fromhex(m.group(2)), bytes.fromhex(m.group(3))
    digest = hashlib.pbkdf2_hmac("sha256", credential.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected) and ok_format


@dataclass(frozen=True)
class DeliveryReceipt:
    """What a consumer was handed: the Parquet file, its row count and checksum, and the audit record's hash."""

    consumer: str
    scenario: str
    product: str
    partition_date: dt.date
    path: Path
    row_count: int
    sha256: str
    delivered_at: dt.datetime
    record_hash: str


def _deny(ops_con: duckdb.DuckDBPyConnection, consumer_code: str, product: str, partition: dt.date,
          scenario: str, reason: str, now: dt.datetime) -> AccessDenied:
    audit.append_delivery(ops_con, consumer=consumer_code, scenario=scenario, product=product, partition_date=partition,
                          outcome="denied", reason=reason, row_count=0, file_sha256="", delivered_at=now)
    return AccessDenied(f"拒绝交付 (delivery denied): {reason}")


def deliver_product(ops_con: duckdb.DuckDBPyConnection, registry: Registry, consumer_code: str, credential: str,
                    product: str, partition: dt.date | str, out_dir: Path | str,
                    now: dt.datetime | None = None) -> DeliveryReceipt:
    """Export ``products.<product>`` for one partition as Parquet to a verified consumer of its scenario; log every attempt.

    Unknown consumer, wrong credential, a product outside the consumer's scenarios or an inactive authorization:
    no file is written, the attempt is recorded as ``denied`` in ``audit.deliveries``, and AccessDenied is raised.
    """
    partition = dt.date.fromisoformat(partition) if isinstance(partition, str) else partition
    now = (now or dt.datetime.now(TZ)).astimezone(TZ)
    consumer = registry.consumers.get(consumer_code)
    credential_ok = verify_credential(credential, consumer.credential_hash if consumer else _DUMMY_HASH)
    if consumer is None:
        raise _deny(ops_con, consumer_code, product, partition, "", f"未登记的使用方 {consumer_code} (unknown consumer)", now)
    if not credential_ok:
        raise _deny(ops_con, consumer_code, product, partition, "", f"使用方 {consumer_code} 凭证错误 (wrong credential)", now)
    try:
        scenario = registry.scenario_for_product(product)
    except KeyError:
        raise _deny(ops_con, consumer_code, product, partition, "", f"产品 {product} 未登记 (unknown product)", now) from None
    if scenario.code not in consumer.scenarios:
        raise _deny(ops_con, consumer_code, product, partition, scenario.code,
                    f"使用方 {consumer_code} 未获场景 {scenario.code} 授权 (consumer not registered for the scenario)", now)
    try:
        check_scenario_active(scenario, partition)
        check_scenario_active(scenario, now.date())
    except AuthorizationError as exc:
        raise _deny(ops_con, consumer_code, product, partition, scenario.code, str(exc), now) from None

    out = Path(out_dir) / product / partition.isoformat()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{product}_{partition.isoformat()}_{consumer_code}.parquet"
    table = f"products.{_ident(product)}"
    # COPY does not take bound parameters; the date literal comes from a parsed dt.date.
    ops_con.execute(
        f"COPY (SELECT * FROM {table} WHERE _partition_date = DATE '{partition.isoformat()}') "
        f"TO '{_sql_str(str(path))}' (FORMAT parquet)"
    )
    row_count = ops_con.execute(f"SELECT count(*) FROM {table} WHERE _partition_date = ?", [partition]).fetchone()[0]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    record = audit.append_delivery(ops_con, consumer=consumer_code, scenario=scenario.code, product=product,
                                   partition_date=partition, outcome="delivered", reason="", row_count=row_count,
                                   file_sha256=sha, delivered_at=now)
    return DeliveryReceipt(consumer=consumer_code, scenario=scenario.code, product=product, partition_date=partition,
                           path=path, row_count=row_count, sha256=sha, delivered_at=now, record_hash=record.record_hash)


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise AccessDenied(f"非法产品名 {name!r} (invalid product name)")
    return name


def _sql_str(text: str) -> str:
    return text.replace("'", "''")
