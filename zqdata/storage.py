"""The landing zone's object store: a local folder by default, S3/MinIO (``minio`` client) when configured.

Keys are ``/``-separated paths such as ``samr/enterprise_registry/2025-05-01/part-0001.csv``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol, runtime_checkable

from zqdata.settings import TZ, get_settings

_TMP_MARK = ".zq-tmp-"  # partial writes of the local backend; never listed


class ObjectStoreUnavailable(OSError):
    """The object store did not answer within its timeouts, after its retries (one line naming store and operation)."""


@dataclass(frozen=True)
class S3Timeouts:
    """Bounded waits of every S3 request (the ``minio`` client's defaults allow ~30 min per request when a server
    hangs): connect and read timeouts in seconds, and retries with exponential backoff (connection errors, read
    timeouts, HTTP 500/502/503/504). From ``ZQ_S3_CONNECT_TIMEOUT`` (5), ``ZQ_S3_READ_TIMEOUT`` (60), ``ZQ_S3_RETRIES``
    (3), ``ZQ_S3_BACKOFF`` (0.5: waits 0.5, 1, 2 s ...)."""

    connect: float = 5.0
    read: float = 60.0
    retries: int = 3
    backoff: float = 0.5

    @classmethod
    def from_env(cls) -> "S3Timeouts":
        from zqdata.settings import env_number

        def seconds(name: str, default: float) -> float:
            return env_number(name, default, minimum=0, exclusive_minimum=True)

        return cls(connect=seconds("ZQ_S3_CONNECT_TIMEOUT", cls.connect), read=seconds("ZQ_S3_READ_TIMEOUT", cls.read),
                   retries=int(env_number("ZQ_S3_RETRIES", cls.retries, kind=int, minimum=0)),
                   backoff=seconds("ZQ_S3_BACKOFF", cls.backoff))

    def http_client(self, cert_check: bool = True):
        import certifi
        import urllib3

        return urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.connect, read=self.read),
            maxsize=10,
            cert_reqs="CERT_REQUIRED" if cert_check else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # every S3 call here is idempotent (whole-object PUT, GET, HEAD, LIST, DELETE): retry them all
            retries=urllib3.Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                                  backoff_factor=self.backoff, status_forcelist=[500, 502, 503, 504],
                                  allowed_methods=None, raise_on_status=False),
        )


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: dt.datetime


@runtime_checkable
class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def local_copy(self, key: str) -> ContextManager[Path]: ...


def _check_key(key: str) -> str:
    """Refuse keys that could escape the store root or are not plain relative paths."""
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"非法对象键 invalid object key: {key!r}")
    return key


class LocalObjectStore:
    """Objects as files under ``root``; writes go to a temp file then ``os.replace`` so readers never see half a file."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"对象不存在 object not found: {key}")
        return path.read_bytes()

    def list(self, prefix: str) -> list[ObjectInfo]:
        if not self.root.exists():
            return []
        # Walk only the deepest folder the prefix names, then filter by the full prefix string.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    out.append(ObjectInfo(key, st.st_size, dt.datetime.fromtimestamp(st.st_mtime, TZ)))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for obj in objects:
            (self.root / obj.key).unlink(missing_ok=True)
        return len(objects)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"对象不存在 object not found: {key}")
        yield path


class S3ObjectStore:
    """Objects in one S3/MinIO bucket through the ``minio`` client; the bucket is created if missing."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        timeouts: S3Timeouts | None = None,
    ) -> None:
        from minio import Minio  # imported here so the local backend never needs it

        # Accept "http://host:port" as well as "host:port"; minio wants the bare host.
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
            secure = scheme == "https"
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.timeouts = timeouts or S3Timeouts.from_env()
        self.client = Minio(self.endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                            http_client=self.timeouts.http_client())
        with self._guard("bucket_exists/make_bucket", bucket):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket, location=region)

    @contextlib.contextmanager
    def _guard(self, operation: str, key: str) -> Iterator[None]:
        """Transport failures (after the retries) as one clear ObjectStoreUnavailable naming the store and the call."""
        import urllib3

        try:
            yield
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ObjectStoreUnavailable(
                f"对象存储不可用 object store unavailable: {operation} {key!r} on {self.endpoint}/{self.bucket} failed "
                f"after {self.timeouts.retries} retries (connect {self.timeouts.connect:g}s, read "
                f"{self.timeouts.read:g}s): {type(reason).__name__}: {str(reason).splitlines()[0][:200]}") from exc

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.endpoint!r}, bucket={self.bucket!r})"

    def put_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: the object appears whole or not at all.
        with self._guard("put_object", key):
            self.client.put_object(self.bucket, _check_key(key), io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        with self._guard("get_object", key):
            try:
                resp = self.client.get_object(self.bucket, _check_key(key))
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    raise FileNotFoundError(f"对象不存在 object not found: {key}") from exc
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def list(self, prefix: str) -> list[ObjectInfo]:
        with self._guard("list_objects", prefix):
            objs = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            out = [
                ObjectInfo(o.object_name, int(o.size or 0), (o.last_modified or dt.datetime.now(TZ)).astimezone(TZ))
                for o in objs
                if not o.is_dir
            ]
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        with self._guard("stat_object", key):
            try:
                self.client.stat_object(self.bucket, _check_key(key))
                return True
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = [o.key for o in self.list(prefix)]
        if keys:
            with self._guard("remove_objects", prefix):
                errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            if errors:
                raise OSError(f"删除对象失败 failed to delete objects: {errors[:3]}")
        return len(keys)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        if not self.exists(key):
            raise FileNotFoundError(f"对象不存在 object not found: {key}")
        with tempfile.TemporaryDirectory(prefix="zq-s3-") as tmp:
            path = Path(tmp) / key.rsplit("/", 1)[-1]
            with self._guard("fget_object", key):
                self.client.fget_object(self.bucket, key, str(path))
            yield path


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def store_from_env() -> ObjectStore:
    """The landing store configured by ``ZQ_STORE_BACKEND`` (``local`` default, or ``s3`` with ``ZQ_S3_*``)."""
    backend = os.environ.get("ZQ_STORE_BACKEND", "local").strip().lower()
    if backend == "local":
        return LocalObjectStore(get_settings().landing_root)
    if backend == "s3":
        missing = [v for v in ("ZQ_S3_ENDPOINT", "ZQ_S3_ACCESS_KEY", "ZQ_S3_SECRET_KEY") if not os.environ.get(v)]
        if missing:
            raise ValueError(f"S3 后端缺少环境变量 missing environment variables for the s3 backend: {', '.join(missing)}")
        return S3ObjectStore(
            endpoint=os.environ["ZQ_S3_ENDPOINT"],
            access_key=os.environ["ZQ_S3_ACCESS_KEY"],
            secret_key=os.environ["ZQ_S3_SECRET_KEY"],
            bucket=os.environ.get("ZQ_S3_LANDING_BUCKET") or "zq-landing",
            secure=_env_bool("ZQ_S3_SECURE", False),
            region=os.environ.get("ZQ_S3_REGION") or None,
        )
    raise ValueError(f"未知的存储后端 unknown ZQ_STORE_BACKEND={backend!r} (expected 'local' or 's3')")
