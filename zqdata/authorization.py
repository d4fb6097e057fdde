"""一场景一授权 (Art. 23) and product-user identity (Art. 25): scenario validity, authorized fields, consumer credentials,
and the audited delivery of a scenario product to a registered consumer.

Consumer credentials are stored in ``registry/consumers.yaml`` only as ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``
(PBKDF2-HMAC-SHA256 of the UTF-8 credential) and compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from zqdata import audit, publish
from zqdata.governance import registration
from zqdata.registry import Registry, Scenario
from zqdata.settings import TZ
from zqdata.storage import ObjectStore

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
    """What a consumer was handed: the Parquet file, its row count and checksum, the published snapshot it is a copy
    of, and the audit record's hash."""

    consumer: str
    scenario: str
    product: str
    partition_date: dt.date
    path: Path
    row_count: int
    sha256: str
    delivered_at: dt.datetime
    record_hash: str
    snapshot: str  # key of the published Parquet object (publish.Snapshot.key)


def _deny(db: sa.Engine, consumer_code: str, product: str, partition: dt.date, scenario: str, reason: str,
          now: dt.datetime, snapshot: str = "") -> AccessDenied:
    audit.append_delivery(db, consumer=consumer_code, scenario=scenario, product=product, partition_date=partition,
                          outcome="denied", reason=reason, row_count=0, file_sha256="", snapshot=snapshot,
                          delivered_at=now)
    return AccessDenied(f"拒绝交付 (delivery denied): {reason}")


def deliver_product(db: sa.Engine, store: ObjectStore, registry: Registry, consumer_code: str, credential: str,
                    product: str, partition: dt.date | str, out_dir: Path | str,
                    now: dt.datetime | None = None) -> DeliveryReceipt:
    """Hand the published snapshot of ``product`` for one partition to a verified consumer of its scenario; log every
    attempt in the audit log of the operational DB ``db``.

    Served only from ``store`` (publish.published_store()): the build database is never opened. Unknown consumer, wrong
    credential, a product outside the consumer's scenarios, an inactive authorization, a product without a registration
    code or whose registration is cancelled (Art. 17), a partition not published (gates
    not passed, or withdrawn for a rebuild) or a snapshot failing its checksum: no file is written, the attempt is
    recorded as ``denied``, and AccessDenied is raised.
    """
    partition = dt.date.fromisoformat(partition) if isinstance(partition, str) else partition
    now = (now or dt.datetime.now(TZ)).astimezone(TZ)
    consumer = registry.consumers.get(consumer_code)
    credential_ok = verify_credential(credential, consumer.credential_hash if consumer else _DUMMY_HASH)
    if consumer is None:
        raise _deny(db, consumer_code, product, partition, "", f"未登记的使用方 {consumer_code} (unknown consumer)", now)
    if not credential_ok:
        raise _deny(db, consumer_code, product, partition, "", f"使用方 {consumer_code} 凭证错误 (wrong credential)", now)
    try:
        scenario = registry.scenario_for_product(product)
        publish.check_product_name(product)
    except (KeyError, ValueError):
        raise _deny(db, consumer_code, product, partition, "", f"产品 {product} 未登记 (unknown product)", now) from None
    if scenario.code not in consumer.scenarios:
        raise _deny(db, consumer_code, product, partition, scenario.code,
                    f"使用方 {consumer_code} 未获场景 {scenario.code} 授权 (consumer not registered for the scenario)", now)
    try:
        check_scenario_active(scenario, partition)
        check_scenario_active(scenario, now.date())
    except AuthorizationError as exc:
        raise _deny(db, consumer_code, product, partition, scenario.code, str(exc), now) from None
    unregistered = registration.delivery_refusal(db, registry, product)  # 登记 (Art. 17): a code, not cancelled
    if unregistered:
        raise _deny(db, consumer_code, product, partition, scenario.code, unregistered, now)

    try:
        snap = publish.current_snapshot(store, product, partition)
        if snap is None:
            raise _deny(db, consumer_code, product, partition, scenario.code,
                        f"产品 {product} 的 {partition} 分区尚未发布（未通过门禁或正在重建） (partition not published)", now)
        if snap.scenario != scenario.code:
            raise _deny(db, consumer_code, product, partition, scenario.code,
                        f"快照 {snap.key} 属于场景 {snap.scenario}，不属于 {scenario.code} "
                        f"(snapshot published under another scenario)", now, snapshot=snap.key)
        data = publish.read_snapshot(store, snap)
    except publish.SnapshotCorrupt as exc:
        raise _deny(db, consumer_code, product, partition, scenario.code,
                    f"产品 {product} 的 {partition} 分区快照校验失败，不予交付 (published snapshot failed its check): {exc}",
                    now) from None

    out = Path(out_dir) / product / partition.isoformat()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{product}_{partition.isoformat()}_{consumer_code}.parquet"
    tmp = out / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        tmp.write_bytes(data)
        # Logged before the file appears under its name: there is no delivered file without its audit record.
        record = audit.append_delivery(db, consumer=consumer_code, scenario=scenario.code, product=product,
                                       partition_date=partition, outcome="delivered", reason="",
                                       row_count=snap.row_count, file_sha256=snap.sha256, snapshot=snap.key,
                                       delivered_at=now)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return DeliveryReceipt(consumer=consumer_code, scenario=scenario.code, product=product, partition_date=partition,
                           path=path, row_count=snap.row_count, sha256=snap.sha256, delivered_at=now,
                           record_hash=record.record_hash, snapshot=snap.key)
