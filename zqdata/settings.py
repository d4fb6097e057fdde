"""Settings from the environment: one place that says where data lives and which backend is used.

Every variable is documented in the README. Nothing secret has a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

TZ = ZoneInfo("Asia/Shanghai")
PARTITION_START = "2025-05-01"  # the measures took effect


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    gov_db: Path
    ops_db: Path
    store_backend: str  # "local" | "s3"
    landing_root: Path  # local backend: the landing zone's root folder

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
    )
