"""Settings from the environment: one place that says where data lives and which backend is used.

Every variable is documented in the README. Nothing secret has a default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

TZ = ZoneInfo("Asia/Shanghai")
PARTITION_START = "2025-05-01"  # the measures took effect
# Per DuckDB instance (a step may hold two: the boundary reads gov and writes ops). DuckDB spills to <db>.tmp beyond it,
# so the nightly job's memory stays bounded whatever the day's volume (docs/benchmark.md). DuckDB's own default is 80 %
# of RAM, and its buffer pool keeps what a step wrote until the connection closes.
DEFAULT_DUCKDB_MEMORY_LIMIT = "1GB"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    gov_db: Path
    ops_db: Path
    store_backend: str  # "local" | "s3"
    landing_root: Path  # local backend: the landing zone's root folder
    duckdb_memory_limit: str = DEFAULT_DUCKDB_MEMORY_LIMIT  # ZQ_DUCKDB_MEMORY_LIMIT, e.g. "1GB", "1536MB"
    # ZQ_AUDIT_ANCHOR: the delivery audit log's anchor (count, head hash), outside the operational DB and the ops side.
    # Its HMAC key, ZQ_AUDIT_KEY, is a secret: read by zqdata.audit from the environment only, never kept here.
    audit_anchor: Path | None = None
    # ZQ_DOCS_BASE_URL: where docs_dir is served over HTTP (`make ui` serves it on 127.0.0.1:3001): the Dagster UI's
    # links to Data Docs and the column-lineage page then open with one click (browsers refuse file:// from http://)
    docs_base_url: str | None = None

    @property
    def docs_dir(self) -> Path:
        """Published artefacts: GX Data Docs, quality reports, trace files."""
        return self.data_dir / "published"


def get_settings() -> Settings:
    data_dir = Path(os.environ.get("ZQ_DATA_DIR", repo_root() / ".data")).resolve()
    warehouse = data_dir / "warehouse"
    return Settings(
        data_dir=data_dir,
        gov_db=Path(os.environ.get("ZQ_GOV_DB", warehouse / "gov_platform.duckdb")),
        ops_db=Path(os.environ.get("ZQ_OPS_DB", warehouse / "ops_platform.duckdb")),
        store_backend=os.environ.get("ZQ_STORE_BACKEND", "local"),
        landing_root=Path(os.environ.get("ZQ_LANDING_DIR", data_dir / "landing")),
        duckdb_memory_limit=memory_size(os.environ.get("ZQ_DUCKDB_MEMORY_LIMIT", "").strip() or DEFAULT_DUCKDB_MEMORY_LIMIT),
        audit_anchor=Path(os.environ.get("ZQ_AUDIT_ANCHOR", "").strip() or data_dir / "gov" / "audit_anchor.json"),
        docs_base_url=os.environ.get("ZQ_DOCS_BASE_URL", "").strip() or None,
    )


def memory_size(value: str) -> str:
    """A DuckDB memory size such as `1GB`, `1536MB`, `2GiB`; anything else is a clear configuration error."""
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", value):
        raise ValueError(f"ZQ_DUCKDB_MEMORY_LIMIT must be a size such as 1GB or 1536MB, got {value!r}")
    return value


def env_number(name: str, default: float, *, kind: type = float, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False) -> float:
    """A number from the environment (`default` when unset or blank); a clear error naming the variable otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} 不是有效数值 (not a number)") from None
    low_bad = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if low_bad or (maximum is not None and value > maximum):
        bounds = f"{'(' if exclusive_minimum else '['}{'' if minimum is None else minimum}, {'' if maximum is None else maximum}]"
        raise ValueError(f"{name}={raw!r} 超出允许范围 {bounds} (out of range)")
    return value


MIN_SECRET_BYTES = 32  # HMAC-SHA256 keys: no shorter than the hash's output (a 1-byte key was brute-forced)


def secret_bytes(secret: bytes | str, *, env: str, what_cn: str, what_en: str, error: type[Exception] = ValueError,
                 why: str = "") -> bytes:
    """An HMAC key from the environment as bytes, refused with a clear message when empty or shorter than
    MIN_SECRET_BYTES (the one rule for the pseudonymization key and the audit key)."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not raw:
        raise error(f"{what_cn}为空 (empty {what_en}): set {env}")
    if len(raw) < MIN_SECRET_BYTES:
        raise error(
            f"{what_cn} {env} 太短：{len(raw)} 字节，至少需要 {MIN_SECRET_BYTES} 字节{why}；"
            f"可用 `python -c \"import secrets; print(secrets.token_hex(32))\"` 生成 "
            f"(the {what_en} must be at least {MIN_SECRET_BYTES} bytes)")
    return raw


PRIVATE_UMASK = 0o077  # files 0600, folders 0700: only the platform's own account reads the data


def restrict_permissions() -> None:
    """Make every file and folder this process creates private to its user (umask 077), and the data folder 0700.

    Called where a platform process starts (the `zq` CLI, the code location's loader, which runs in the code server and
    every run): the data folder holds personal data (landing files, gov DuckDB, the operational DB, outbox).
    """
    os.umask(PRIVATE_UMASK)
    data_dir = get_settings().data_dir
    if data_dir.is_dir() and data_dir.stat().st_uid == os.getuid():
        data_dir.chmod(0o700)
