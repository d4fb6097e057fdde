"""Resources, configured from the environment (one class each; no per-environment dicts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb

from zqdata import warehouse
from zqdata.settings import get_settings


class WarehouseResource(dg.ConfigurableResource):
    """The two security domains: the gov big-data platform DB and the operations platform DB (separate files).

    Every connection gets DuckDB's `memory_limit` (``ZQ_DUCKDB_MEMORY_LIMIT``, settings): beyond it DuckDB spills to
    `<db>.tmp`, so a step's memory does not grow with the day's volume.

    ``ZQ_WAREHOUSE=ducklake`` (issue 16): the two domains are DuckLakes instead (``zqdata.lakes``), attached as
    ``gov_platform`` / ``ops_platform``; the environment alone decides (``zqdata.warehouse.connect``).
    """

    gov_db: str = ""
    ops_db: str = ""

    def gov_path(self) -> Path:
        return Path(self.gov_db) if self.gov_db else get_settings().gov_db

    def ops_path(self) -> Path:
        return Path(self.ops_db) if self.ops_db else get_settings().ops_db

    def gov_exists(self) -> bool:
        return warehouse.exists("gov", self.gov_path())

    @contextlib.contextmanager
    def gov(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        yield from _connect("gov", self.gov_path(), read_only)

    @contextlib.contextmanager
    def ops(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        yield from _connect("ops", self.ops_path(), read_only)


def _connect(domain: str, path: Path, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    con = warehouse.connect(domain, path, read_only)
    try:
        yield con
    finally:
        con.close()


class ObjectStoreResource(dg.ConfigurableResource):
    """The landing zone's object store. Empty fields fall back to the environment (``ZQ_STORE_BACKEND``, ``ZQ_S3_*``)."""

    backend: str = ""  # "local" | "s3"; empty: ZQ_STORE_BACKEND, default local
    local_root: str = ""  # local backend; empty: settings.landing_root (ZQ_LANDING_DIR or <ZQ_DATA_DIR>/landing)
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = ""
    s3_secure: bool = False

    @classmethod
    def from_env(cls) -> "ObjectStoreResource":
        """Fields bound to ``dg.EnvVar`` for the variables that are set (secrets stay out of run config)."""
        import os

        names = {
            "backend": "ZQ_STORE_BACKEND",
            "s3_endpoint": "ZQ_S3_ENDPOINT",
            "s3_access_key": "ZQ_S3_ACCESS_KEY",
            "s3_secret_key": "ZQ_S3_SECRET_KEY",
            "s3_bucket": "ZQ_S3_LANDING_BUCKET",
        }
        kwargs = {field: dg.EnvVar(var) for field, var in names.items() if os.environ.get(var)}
        if os.environ.get("ZQ_S3_SECURE"):
            kwargs["s3_secure"] = os.environ["ZQ_S3_SECURE"].strip().lower() in ("1", "true", "yes", "on")
        return cls(**kwargs)

    def get_store(self):  # -> zqdata.storage.ObjectStore
        """The configured ObjectStore (built per call; cheap for local, one client for S3)."""
        import os

        from zqdata import storage

        backend = (self.backend or os.environ.get("ZQ_STORE_BACKEND") or "local").strip().lower()
        if backend == "local":
            return storage.LocalObjectStore(Path(self.local_root) if self.local_root else get_settings().landing_root)
        if backend == "s3" and (self.s3_endpoint or os.environ.get("ZQ_S3_ENDPOINT")):
            return storage.S3ObjectStore(
                endpoint=self.s3_endpoint or os.environ["ZQ_S3_ENDPOINT"],
                access_key=self.s3_access_key or os.environ.get("ZQ_S3_ACCESS_KEY", ""),
                secret_key=self.s3_secret_key or os.environ.get("ZQ_S3_SECRET_KEY", ""),
                bucket=self.s3_bucket or os.environ.get("ZQ_S3_LANDING_BUCKET") or "zq-landing",
                secure=self.s3_secure or os.environ.get("ZQ_S3_SECURE", "").strip().lower() in ("1", "true", "yes", "on"),
            )
        return storage.store_from_env()  # raises the clear error for a bad backend / missing settings


STORE_STEP_RETRIES_ENV = "ZQ_STORE_STEP_RETRIES"  # step-level retries after the client's own (default 2)
STORE_STEP_WAIT_ENV = "ZQ_STORE_STEP_WAIT_SECONDS"  # first step retry after this (default 15 s), then doubled


@contextlib.contextmanager
def store_step_retries(context: dg.OpExecutionContext) -> Iterator[None]:
    """An object-store outage (after the client's timeouts and retries) retries the step with backoff, up to
    ``ZQ_STORE_STEP_RETRIES`` times; then the step fails with the store's one-line message. Other errors fail at once.

    The step's writes are one transaction, so a retried step starts from the state before it."""
    import os

    from zqdata.storage import ObjectStoreUnavailable

    try:
        yield
    except ObjectStoreUnavailable as exc:
        retries = int(os.environ.get(STORE_STEP_RETRIES_ENV) or 2)
        attempt = context.retry_number
        if attempt < retries:
            wait = float(os.environ.get(STORE_STEP_WAIT_ENV) or 15) * 2 ** attempt
            context.log.warning(f"对象存储不可用，{wait} 秒后重试第 {attempt + 1}/{retries} 次 "
                                f"(object store unavailable, step retry in {wait}s): {exc}")
            raise dg.RetryRequested(max_retries=retries, seconds_to_wait=wait) from exc
        raise dg.Failure(description=str(exc)) from exc


def default_resources() -> dict[str, object]:
    """The resources of the code location: the landing zone's store and the two warehouses, from the environment."""
    return {"store": ObjectStoreResource.from_env(), "warehouse": WarehouseResource()}
