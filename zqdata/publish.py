"""Publish (the last step of write–audit–publish): consumers read immutable snapshots, never the build database.

A product partition that passed its gates is exported once from the ops DuckDB file to an object store of the ops
domain (a local folder by default, S3/MinIO when configured), and ``zq deliver`` serves only from there, so deliveries
never wait on (or see half of) a nightly run. Layout, per product and partition day::

    products/<product>/<day>/<sha256[:16]>/data.parquet   the rows (DuckDB COPY … ORDER BY ALL: same data, same bytes)
    products/<product>/<day>/<sha256[:16]>/manifest.json  product, scenario, row count, sha256, columns, gates, run
    products/<product>/<day>/CURRENT.json                 {"snapshot": <prefix>, "sha256": …, "manifest_sha256": …}

A snapshot folder is never changed once written (its name is its content hash); publishing writes the data, then the
manifest, and last the ``CURRENT`` pointer (what is served now), so a reader sees the previous snapshot or the new one,
never a mix. Serving checks the manifest against the pointer's hash and the data against the manifest's.
``withdraw`` removes the pointer before a partition's products are rebuilt: until they pass their gates again nothing
is served for that day.

Configuration (secrets only from the environment):

- ``ZQ_PUBLISH_BACKEND``: ``local`` | ``s3`` (default: ``ZQ_STORE_BACKEND``, default ``local``);
- local: ``<ZQ_DATA_DIR>/published/snapshots``;
- s3: bucket ``ZQ_S3_PUBLISHED_BUCKET`` (default ``zq-published``, created if missing), endpoint and keys
  ``ZQ_S3_PUBLISHED_ENDPOINT`` / ``ZQ_S3_PUBLISHED_ACCESS_KEY`` / ``ZQ_S3_PUBLISHED_SECRET_KEY``, each falling back to
  ``ZQ_S3_ENDPOINT`` / ``ZQ_S3_ACCESS_KEY`` / ``ZQ_S3_SECRET_KEY``; ``ZQ_S3_SECURE``, ``ZQ_S3_REGION``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zqdata.settings import TZ, get_settings
from zqdata.storage import LocalObjectStore, ObjectStore, S3ObjectStore, _env_bool

if TYPE_CHECKING:  # publishing reads DuckDB; serving (deliveries) must not need it
    import duckdb

    from zqdata.registry import Registry

ROOT = "products"
DATA_NAME = "data.parquet"
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT.json"
_IDENT = re.compile(r"[a-z][a-z0-9_]*")


class PublishRefused(RuntimeError):
    """A partition that may not be published: gates missing or failed, or the product belongs to no scenario."""


class SnapshotCorrupt(RuntimeError):
    """A published snapshot whose bytes, manifest or pointer do not agree: never served."""


@dataclass(frozen=True)
class Snapshot:
    product: str
    scenario: str
    partition_date: dt.date
    key: str  # of the Parquet object
    sha256: str
    row_count: int
    columns: tuple[str, ...]
    gate_results: dict[str, bool] = field(hash=False)
    run_id: str
    published_at: dt.datetime
    # A snapshot derived from another without some rows (a consent revoked after it was published): the key of the
    # snapshot it was derived from, why, and how many rows it lost. Empty for a snapshot published from the product.
    derived_from: str = ""
    reason: str = ""
    removed_rows: int = 0

    @property
    def prefix(self) -> str:
        """The snapshot folder (what ``CURRENT.json`` points at)."""
        return self.key.rsplit("/", 1)[0]


def check_product_name(product: str) -> str:
    """``product`` if it is a plain identifier (it becomes a table name and an object key), else ValueError."""
    if not isinstance(product, str) or not _IDENT.fullmatch(product):
        raise ValueError(f"非法产品名 {product!r} (invalid product name)")
    return product


def _day(day: dt.date | str) -> dt.date:
    """A partition day (a date, or its ISO text); a datetime is refused rather than silently cut."""
    if isinstance(day, str):
        return dt.date.fromisoformat(day)
    if isinstance(day, dt.datetime) or not isinstance(day, dt.date):
        raise TypeError(f"partition day must be a date, got {day!r}")
    return day


def partition_prefix(product: str, day: dt.date) -> str:
    return f"{ROOT}/{check_product_name(product)}/{_day(day).isoformat()}"


def current_key(product: str, day: dt.date) -> str:
    return f"{partition_prefix(product, day)}/{CURRENT_NAME}"


# -- the store -----------------------------------------------------------------------------------------------------

def published_store() -> ObjectStore:
    """The snapshot store configured by ``ZQ_PUBLISH_BACKEND`` (see the module docstring)."""
    backend = (os.environ.get("ZQ_PUBLISH_BACKEND") or os.environ.get("ZQ_STORE_BACKEND") or "local").strip().lower()
    if backend == "local":
        return LocalObjectStore(get_settings().data_dir / "published" / "snapshots")
    if backend == "s3":
        names = {"endpoint": "ENDPOINT", "access_key": "ACCESS_KEY", "secret_key": "SECRET_KEY"}
        values = {k: os.environ.get(f"ZQ_S3_PUBLISHED_{v}") or os.environ.get(f"ZQ_S3_{v}") for k, v in names.items()}
        missing = [f"ZQ_S3_PUBLISHED_{v} / ZQ_S3_{v}" for k, v in names.items() if not values[k]]
        if missing:
            raise ValueError("发布存储 S3 后端缺少环境变量 (missing environment variables for the s3 publish backend): "
                             + ", ".join(missing))
        return S3ObjectStore(  # creates the bucket when missing
            endpoint=values["endpoint"],
            access_key=values["access_key"],
            secret_key=values["secret_key"],
            bucket=os.environ.get("ZQ_S3_PUBLISHED_BUCKET") or "zq-published",
            secure=_env_bool("ZQ_S3_SECURE", False),
            region=os.environ.get("ZQ_S3_REGION") or None,
        )
    raise ValueError(f"未知的发布存储后端 unknown ZQ_PUBLISH_BACKEND={backend!r} (expected 'local' or 's3')")


# -- publishing ----------------------------------------------------------------------------------------------------

def publish_partition(ops_con: duckdb.DuckDBPyConnection, store: ObjectStore, registry: Registry, product: str,
                      day: dt.date, gate_results: Mapping[str, bool], run_id: str,
                      now: dt.datetime | None = None) -> Snapshot:
    """Publish ``products.<product>`` rows of partition ``day`` as an immutable snapshot and point ``CURRENT`` at it.

    Refused (PublishRefused) unless every gate in ``gate_results`` passed (``True``; none at all is a refusal) and the
    product is registered to a scenario. Publishing the same rows again reuses the existing snapshot (same key, nothing
    rewritten); changed rows give a new snapshot and ``CURRENT`` moves to it.
    """
    check_product_name(product)
    day = _day(day)
    failed = sorted(name for name, ok in gate_results.items() if ok is not True)
    if not gate_results:
        raise PublishRefused(f"产品 {product} 的 {day} 分区没有门禁结果，不予发布 "
                             f"(no gate results for {product} {day}: nothing is published unchecked)")
    if failed:
        raise PublishRefused(f"产品 {product} 的 {day} 分区未通过门禁 {', '.join(failed)}，不予发布 "
                             f"(gates failed for {product} {day}: {', '.join(failed)})")
    try:
        scenario = registry.scenario_for_product(product)
    except KeyError:
        raise PublishRefused(f"产品 {product} 未在任何场景登记，不予发布 (product not registered to a scenario)") from None
    now = (now or dt.datetime.now(TZ)).astimezone(TZ).replace(microsecond=0)  # as the manifest keeps it

    data, row_count, columns = _export(ops_con, product, day)
    sha = hashlib.sha256(data).hexdigest()
    prefix = f"{partition_prefix(product, day)}/{sha[:16]}"
    data_key, manifest_key = f"{prefix}/{DATA_NAME}", f"{prefix}/{MANIFEST_NAME}"

    if not (store.exists(data_key) and hashlib.sha256(store.get_bytes(data_key)).hexdigest() == sha):
        store.put_bytes(data_key, data)  # new (or a damaged copy restored to the bytes its name promises)
    fresh = Snapshot(product=product, scenario=scenario.code, partition_date=day, key=data_key, sha256=sha,
                     row_count=row_count, columns=tuple(columns),
                     gate_results={k: bool(v) for k, v in sorted(gate_results.items())}, run_id=str(run_id),
                     published_at=now)
    snapshot, manifest = _existing_manifest(store, manifest_key, fresh)
    if snapshot is None:
        snapshot, manifest = fresh, _manifest_bytes(fresh)
        store.put_bytes(manifest_key, manifest)
    pointer = _json_bytes({"snapshot": prefix, "sha256": sha,
                           "manifest_sha256": hashlib.sha256(manifest).hexdigest()})
    ckey = current_key(product, day)
    if not (store.exists(ckey) and store.get_bytes(ckey) == pointer):
        store.put_bytes(ckey, pointer)  # last: readers switch to a complete snapshot
    return snapshot


def _export(ops_con: duckdb.DuckDBPyConnection, product: str, day: dt.date) -> tuple[bytes, int, list[str]]:
    """The partition's rows as Parquet bytes (deterministic: sorted by every column), their count and column names."""
    table = f"products.{check_product_name(product)}"
    where = f"_partition_date = DATE '{day.isoformat()}'"  # COPY takes no bound parameters; day is a parsed dt.date
    (preserve,) = ops_con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()
    with tempfile.TemporaryDirectory(prefix="zq-publish-") as tmp:
        path = Path(tmp) / DATA_NAME
        ops_con.execute("SET preserve_insertion_order = true")  # the ORDER BY must reach the file as is
        try:
            ops_con.execute(f"COPY (SELECT * FROM {table} WHERE {where} ORDER BY ALL) "
                            f"TO '{str(path).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        finally:
            if not preserve:
                ops_con.execute("SET preserve_insertion_order = false")
        read = f"read_parquet('{str(path).replace(chr(39), chr(39) * 2)}')"
        (row_count,) = ops_con.execute(f"SELECT count(*) FROM {read}").fetchone()
        columns = [d[0] for d in ops_con.execute(f"SELECT * FROM {read} LIMIT 0").description]
        return path.read_bytes(), int(row_count), columns


_WRITER: dict[int, "duckdb.DuckDBPyConnection"] = {}  # pid -> an in-memory connection that only writes Parquet
_WRITER_LOCK = threading.Lock()


def _parquet_bytes(table: "pa.Table") -> bytes:
    """``table`` as Parquet bytes written by DuckDB (`_export`'s writer), in row order, on one in-memory connection
    per process (opening one took ~10 ms a snapshot)."""
    import duckdb

    with _WRITER_LOCK, tempfile.TemporaryDirectory(prefix="zq-derive-") as tmp:
        con = _WRITER.get(os.getpid())
        if con is None:  # first use in this process (a forked child does not reuse its parent's connection)
            _WRITER.clear()
            con = _WRITER[os.getpid()] = duckdb.connect()
            con.execute("SET preserve_insertion_order = true")
        out = Path(tmp) / DATA_NAME
        con.register("_zq_rows", table)
        try:
            con.execute(f"COPY (SELECT * FROM _zq_rows) TO '{str(out).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        finally:
            con.unregister("_zq_rows")
        return out.read_bytes()


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _manifest_bytes(s: Snapshot) -> bytes:
    doc = {
        "product": s.product, "scenario": s.scenario, "partition_date": s.partition_date.isoformat(),
        "key": s.key, "row_count": s.row_count, "sha256": s.sha256, "columns": list(s.columns),
        "gate_results": s.gate_results, "run_id": s.run_id,
        "published_at": s.published_at.astimezone(TZ).isoformat(timespec="seconds"),
    }
    if s.derived_from:
        doc.update(derived_from=s.derived_from, reason=s.reason, removed_rows=s.removed_rows)
    return _json_bytes(doc)


def _snapshot_from_manifest(raw: bytes, manifest_key: str) -> Snapshot:
    try:
        doc = json.loads(raw.decode("utf-8"))
        return Snapshot(product=doc["product"], scenario=doc["scenario"],
                        partition_date=dt.date.fromisoformat(doc["partition_date"]),
                        key=manifest_key.rsplit("/", 1)[0] + "/" + DATA_NAME, sha256=doc["sha256"],
                        row_count=int(doc["row_count"]), columns=tuple(doc["columns"]),
                        gate_results={str(k): v for k, v in doc["gate_results"].items()}, run_id=str(doc["run_id"]),
                        published_at=dt.datetime.fromisoformat(doc["published_at"]).astimezone(TZ),
                        derived_from=str(doc.get("derived_from", "")), reason=str(doc.get("reason", "")),
                        removed_rows=int(doc.get("removed_rows", 0)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotCorrupt(f"发布清单损坏 {manifest_key} (corrupt manifest): {exc}") from None


def _facts(s: Snapshot) -> tuple:
    """What a snapshot's data determines (not who published it, when, or after which gates)."""
    return s.product, s.scenario, s.partition_date, s.key, s.sha256, s.row_count, s.columns


def _existing_manifest(store: ObjectStore, manifest_key: str, fresh: Snapshot) -> tuple[Snapshot | None, bytes]:
    """The manifest already published for these bytes and its raw form: kept as is (the snapshot is immutable) when
    it states what this run found; (None, b"") when there is none, or it is unreadable or altered (then rewritten)."""
    try:
        raw = store.get_bytes(manifest_key)
        snapshot = _snapshot_from_manifest(raw, manifest_key)
    except (FileNotFoundError, SnapshotCorrupt):
        return None, b""
    return (snapshot, raw) if _facts(snapshot) == _facts(fresh) else (None, b"")


def derive_without(store: ObjectStore, product: str, day: dt.date, lineage_ids: Iterable[str], reason: str,
                   run_id: str, now: dt.datetime | None = None) -> Snapshot:
    """Replace the current snapshot of ``product``/``day`` by one derived from it without the rows whose
    ``_source_lineage_ids`` hold any of ``lineage_ids`` (e.g. rows of a subject whose consent was revoked).

    No gate is re-run and none is needed for what is removed: the new data is a subset of rows that passed the gates
    recorded in the old manifest, which the new manifest repeats together with ``derived_from`` (the old snapshot's
    key), ``reason`` and ``removed_rows``. Returns the current snapshot unchanged when no row matches. PublishRefused
    when nothing is published for the day or the snapshot has no ``_source_lineage_ids`` (withdraw it instead).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    day = _day(day)
    old = current_snapshot(store, product, day)
    if old is None:
        raise PublishRefused(f"产品 {product} 的 {day} 分区未发布 (nothing published to derive from)")
    if "_source_lineage_ids" not in old.columns:
        raise PublishRefused(f"快照 {old.key} 无 _source_lineage_ids，无法逐行删除 (no row lineage: withdraw it)")
    table = pq.read_table(pa.BufferReader(read_snapshot(store, old)))
    now = (now or dt.datetime.now(TZ)).astimezone(TZ).replace(microsecond=0)
    # the rows holding a removed id, in Arrow (a purge follows every published day a revoked subject is in: a DuckDB
    # connection, a temporary table and four statements per snapshot took ~40 ms, and a year holds 365 of them)
    ids = table.column("_source_lineage_ids").combine_chunks()
    hit = pc.is_in(pc.list_flatten(ids), value_set=pa.array(sorted(set(lineage_ids)), pa.string()))
    drop = np.unique(pc.list_parent_indices(ids).filter(hit).to_numpy(zero_copy_only=False))
    removed = len(drop)
    if not removed:
        return old
    keep = np.ones(table.num_rows, dtype=bool)
    keep[drop] = False
    rest = table.filter(pa.array(keep))
    row_count = rest.num_rows
    # written by DuckDB as `_export` writes: the same rows give the same bytes, so publishing them again later reuses
    # this snapshot (the snapshot is sorted by every column; a subset kept in order stays sorted)
    new_data = _parquet_bytes(rest)
    sha = hashlib.sha256(new_data).hexdigest()
    prefix = f"{partition_prefix(product, day)}/{sha[:16]}"
    data_key, manifest_key = f"{prefix}/{DATA_NAME}", f"{prefix}/{MANIFEST_NAME}"
    if not (store.exists(data_key) and hashlib.sha256(store.get_bytes(data_key)).hexdigest() == sha):
        store.put_bytes(data_key, new_data)
    snapshot = Snapshot(product=product, scenario=old.scenario, partition_date=day, key=data_key, sha256=sha,
                        row_count=int(row_count), columns=old.columns, gate_results=dict(old.gate_results),
                        run_id=str(run_id), published_at=now, derived_from=old.key, reason=reason,
                        removed_rows=int(removed))
    existing, manifest = _existing_manifest(store, manifest_key, snapshot)
    if existing is None:  # a snapshot folder is never rewritten: the same rows published before keep their manifest
        manifest = _manifest_bytes(snapshot)
        store.put_bytes(manifest_key, manifest)
    else:
        snapshot = existing
    store.put_bytes(current_key(product, day), _json_bytes({
        "snapshot": prefix, "sha256": sha, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}))  # last
    return snapshot


def published_days(store: ObjectStore, product: str) -> list[dt.date]:
    """The partition days of ``product`` that have a ``CURRENT`` pointer (what is served now)."""
    days = set()
    for info in store.list(f"{ROOT}/{check_product_name(product)}/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == CURRENT_NAME:
            try:
                days.add(dt.date.fromisoformat(parts[2]))
            except ValueError:
                continue
    return sorted(days)


# -- serving -------------------------------------------------------------------------------------------------------

def withdraw(store: ObjectStore, product: str, day: dt.date) -> bool:
    """Stop serving partition ``day`` of ``product`` (its ``CURRENT`` pointer is deleted); True when one was there.

    Called before the partition's products are rebuilt; the snapshots themselves stay (history, reuse on republish).
    """
    key = current_key(product, _day(day))
    if not store.exists(key):
        return False
    store.delete_prefix(key)
    return True


def withdraw_partition(registry: Registry, day: dt.date, products: Iterable[str] | None = None,
                       store: ObjectStore | None = None) -> list[str]:
    """Withdraw partition ``day`` of the given products (default: every registered scenario product); returns
    those that were published.

    Called when the partition's source data changed: before its products are rebuilt, and when a redelivery fails the
    quality gate (what was published came from a delivery the agency has since replaced).
    """
    store = store or published_store()
    names = sorted(set(products) if products is not None else {s.product for s in registry.scenarios.values()})
    return [p for p in names if withdraw(store, p, day)]


def products_reading(registry: Registry, datasets: Iterable[str]) -> list[str]:
    """The scenario products that read any of ``datasets`` (their scenario is authorized fields of it), sorted: what
    may not be published for a partition in which the quality gate held those datasets back."""
    held = set(datasets)
    return sorted({s.product for s in registry.scenarios.values() if held & set(s.authorized_fields)})


def current_snapshot(store: ObjectStore, product: str, day: dt.date) -> Snapshot | None:
    """The snapshot served for partition ``day`` of ``product``; None when none is published (or it was withdrawn).

    SnapshotCorrupt when the pointer or the manifest it names is unreadable or disagrees with the other.
    """
    day = _day(day)
    ckey = current_key(product, day)
    try:
        raw = store.get_bytes(ckey)
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(raw.decode("utf-8"))
        prefix, sha = str(pointer["snapshot"]), str(pointer["sha256"])
        manifest_sha = pointer.get("manifest_sha256")
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotCorrupt(f"发布指针损坏 {ckey} (corrupt CURRENT pointer): {exc}") from None
    if not re.fullmatch(r"[0-9a-f]{64}", sha) or prefix != f"{partition_prefix(product, day)}/{sha[:16]}":
        raise SnapshotCorrupt(f"发布指针 {ckey} 无效 (CURRENT does not name a snapshot of its partition): {prefix!r}")
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    try:
        raw = store.get_bytes(manifest_key)
    except FileNotFoundError:
        raise SnapshotCorrupt(f"发布清单缺失 {manifest_key} (manifest missing)") from None
    if manifest_sha is not None and hashlib.sha256(raw).hexdigest() != manifest_sha:
        raise SnapshotCorrupt(f"发布清单 {manifest_key} 校验和不符，可能被篡改 (manifest sha256 mismatch)")
    snapshot = _snapshot_from_manifest(raw, manifest_key)
    if (snapshot.sha256, snapshot.product, snapshot.partition_date) != (sha, product, day):
        raise SnapshotCorrupt(f"发布清单 {manifest_key} 与指针不符 (manifest does not match the CURRENT pointer)")
    return snapshot


def read_snapshot(store: ObjectStore, snapshot: Snapshot) -> bytes:
    """The snapshot's Parquet bytes, checked against its sha256 (SnapshotCorrupt when missing or altered)."""
    try:
        data = store.get_bytes(snapshot.key)
    except FileNotFoundError:
        raise SnapshotCorrupt(f"快照文件缺失 {snapshot.key} (snapshot data missing)") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != snapshot.sha256:
        raise SnapshotCorrupt(f"快照 {snapshot.key} 校验和不符，可能被篡改 (sha256 mismatch: expected "
                              f"{snapshot.sha256[:16]}…, found {actual[:16]}…)")
    return data
