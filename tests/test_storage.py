"""Object store backends (local and S3 on moto) and the landing contract."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from zqdata import landing
from zqdata.settings import TZ, repo_root
from zqdata.storage import LocalObjectStore, S3ObjectStore, store_from_env

DAY = dt.date(2025, 5, 1)


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, store: LocalObjectStore):
    return store if request.param == "local" else request.getfixturevalue("s3_store")


def test_put_get_list_exists_delete(any_store) -> None:
    any_store.put_bytes("a/b/2.txt", b"two")
    any_store.put_bytes("a/b/1.txt", b"one")
    any_store.put_bytes("a/c/3.txt", b"three")
    any_store.put_bytes("ab/4.txt", b"four")
    assert any_store.get_bytes("a/b/1.txt") == b"one"
    assert [o.key for o in any_store.list("a/")] == ["a/b/1.txt", "a/b/2.txt", "a/c/3.txt"]
    assert [o.key for o in any_store.list("a")] == ["a/b/1.txt", "a/b/2.txt", "a/c/3.txt", "ab/4.txt"]
    info = any_store.list("a/c/")[0]
    assert info.size == 5 and info.last_modified.tzinfo is not None
    assert any_store.exists("a/b/1.txt") and not any_store.exists("a/b/9.txt")
    with any_store.local_copy("a/c/3.txt") as path:
        assert Path(path).read_bytes() == b"three"
    assert any_store.delete_prefix("a/b/") == 2
    assert [o.key for o in any_store.list("")] == ["a/c/3.txt", "ab/4.txt"]
    with pytest.raises(FileNotFoundError):
        any_store.get_bytes("a/b/1.txt")


def test_local_write_is_atomic_and_leaves_no_temp_files(store: LocalObjectStore) -> None:
    store.put_bytes("x/y.bin", b"old")
    store.put_bytes("x/y.bin", b"new")
    assert store.get_bytes("x/y.bin") == b"new"
    assert [p.name for p in (store.root / "x").iterdir()] == ["y.bin"]


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_local_rejects_keys_outside_root(store: LocalObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_store_from_env(data_dir: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> None:
    local = store_from_env()
    assert isinstance(local, LocalObjectStore) and local.root == data_dir.resolve() / "landing"
    monkeypatch.setenv("ZQ_STORE_BACKEND", "s3")
    monkeypatch.delenv("ZQ_S3_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="ZQ_S3_ENDPOINT"):
        store_from_env()
    monkeypatch.setenv("ZQ_S3_ENDPOINT", f"http://{moto_endpoint}")
    monkeypatch.setenv("ZQ_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("ZQ_S3_SECRET_KEY", "testing")
    monkeypatch.setenv("ZQ_S3_LANDING_BUCKET", "zq-env-bucket")
    s3 = store_from_env()
    assert isinstance(s3, S3ObjectStore) and s3.bucket == "zq-env-bucket"
    s3.put_bytes("k", b"v")
    assert s3.get_bytes("k") == b"v"
    monkeypatch.setenv("ZQ_STORE_BACKEND", "ftp")
    with pytest.raises(ValueError, match="ftp"):
        store_from_env()


def test_object_store_resource_uses_environment(data_dir: Path) -> None:
    from orchestration.resources import ObjectStoreResource

    st = ObjectStoreResource.from_env().get_store()
    assert isinstance(st, LocalObjectStore) and st.root == data_dir.resolve() / "landing"


def test_write_delivery_manifest_last_and_round_trip(any_store) -> None:
    files = [("part-0001.csv", b"a,b\n1,2\n3,4\n", "csv", "utf-8", 2), ("part-0002.csv", b"a,b\n5,6\n", "csv", "utf-8", 1)]
    extracted = dt.datetime(2025, 5, 2, 1, 0, tzinfo=TZ)
    m = landing.write_delivery(any_store, "samr", "enterprise_registry", DAY, files, extracted, None)
    prefix = landing.delivery_prefix("samr", "enterprise_registry", DAY)
    assert prefix == "samr/enterprise_registry/2025-05-01/"
    assert [f.sha256 for f in m.files] == [landing.sha256_hex(f[1]) for f in files]
    assert landing.read_manifest(any_store, "samr", "enterprise_registry", DAY) == m
    assert [o.key for o in landing.list_delivery_files(any_store, "samr", "enterprise_registry", DAY)] == [
        prefix + "part-0001.csv", prefix + "part-0002.csv"]
    raw = json.loads(any_store.get_bytes(prefix + "_manifest.json"))
    assert raw["partition_date"] == "2025-05-01" and raw["files"][0]["record_count"] == 2
    # A re-delivery replaces the folder: no stale part files.
    landing.write_delivery(any_store, "samr", "enterprise_registry", DAY, files[:1], extracted, None)
    assert len(landing.list_delivery_files(any_store, "samr", "enterprise_registry", DAY)) == 1
    assert landing.list_delivery_days(any_store, "samr", "enterprise_registry") == [DAY]
    assert landing.read_manifest(any_store, "samr", "enterprise_registry", DAY + dt.timedelta(days=1)) is None


def test_manifest_written_after_data_files(store: LocalObjectStore) -> None:
    order: list[str] = []
    original = store.put_bytes
    store.put_bytes = lambda key, data: (order.append(key), original(key, data))  # type: ignore[method-assign]
    landing.write_delivery(store, "water", "water_usage", DAY, [("part-0001.csv", b"x\n1\n", "csv", "utf-8", 1)],
                           dt.datetime(2025, 5, 2, tzinfo=TZ), dt.datetime(2025, 5, 2, 2, tzinfo=TZ))
    assert order[-1].endswith("_manifest.json") and len(order) == 2


def test_committed_landing_contract_doc_is_the_rendering(reg) -> None:
    committed = (repo_root() / "docs" / "landing_contract.md").read_text(encoding="utf-8")
    assert committed == landing.render_landing_docs(reg), "run: python -c 'from zqdata.landing import write_landing_docs; write_landing_docs()'"
    for ds in reg.datasets.values():
        assert f"`{ds.code}`" in committed and all(f"`{f}`" in committed for f in ds.field_names)
