"""The warehouse as two DuckLakes, one per security domain (issue 16), selected by the environment only.

Embedded default (``ZQ_WAREHOUSE`` unset or ``duckdb``): the two DuckDB files of ``WarehouseResource``; nothing here
is used. Distributed mode (``ZQ_WAREHOUSE=ducklake``): each domain is a DuckLake — its catalog in a PostgreSQL
database of its own, its data files as Parquet under an S3/MinIO prefix of its own, with credentials of its own — so
several worker processes on several machines write the same domain concurrently (DuckLake retries a commit that lost
the race when the two transactions' changes do not conflict).

Per domain ``D`` in ``GOV`` / ``OPS``:

- ``ZQ_D_LAKE_CATALOG``: libpq connection string of the catalog database, *without* password
  (``dbname=gov_catalog host=db.example port=5432 user=zq_gov_lake`` or ``postgresql://zq_gov_lake@db.example/gov_catalog``);
- ``ZQ_D_LAKE_CATALOG_PASSWORD``: its password (optional: none with trust/peer/certificate authentication). Given to
  DuckDB as a named ``postgres`` secret (``META_SECRET``), never in the ATTACH string, which DuckDB shows in
  ``duckdb_databases()`` and repeats in its error messages;
- ``ZQ_D_LAKE_DATA``: ``s3://<bucket>/<prefix>/`` of the data files;
- ``ZQ_D_S3_KEY_ID`` / ``ZQ_D_S3_SECRET``: the S3 credentials of that bucket only.

Shared: ``ZQ_S3_ENDPOINT`` (``host:port`` or ``http(s)://host:port``; unset = AWS), ``ZQ_S3_SECURE``, ``ZQ_S3_REGION``
(``us-east-1``), ``ZQ_S3_URL_STYLE`` (``path`` with an endpoint, else ``vhost``), ``ZQ_DUCKDB_EXTENSION_DIR`` (where
the extension folder is laid out; default a folder under the system temp dir).

Which domains a process may hold: ``ZQ_WORKER_DOMAINS`` = ``gov``, ``ops`` or ``gov,ops`` (the boundary worker, and
the default for a one-process deployment). An ops worker is started with ``ops_environment(os.environ)``: no gov
variable, no landing-zone key, no pseudonymization key, no generic AWS credential, and no variable holding the value
of a gov secret under another name.

Extensions come from the ``duckdb-extension-{httpfs,postgres-scanner,ducklake}`` packages and are loaded by file path;
autoinstall is off and the extension repository points at the local folder, so nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import duckdb

T = TypeVar("T")

MODE_ENV = "ZQ_WAREHOUSE"
MODES = ("duckdb", "ducklake")
WORKER_DOMAINS_ENV = "ZQ_WORKER_DOMAINS"
EXTENSION_DIR_ENV = "ZQ_DUCKDB_EXTENSION_DIR"

DOMAINS = ("gov", "ops")
#: The lake of each domain is attached under the name of today's DuckDB file, so 3-part names keep working.
CATALOG_NAMES = {"gov": "gov_platform", "ops": "ops_platform"}

#: DuckDB extension name -> the Python packages that ship it (first found wins). ``duckdb-extension-postgres`` ships
#: the same binary as ``duckdb-extension-postgres-scanner`` under the file name ``postgres.duckdb_extension``, which
#: DuckDB refuses to LOAD (it looks for the entry point ``postgres_duckdb_cpp_init``); the extension folder below
#: links it under its real name.
EXTENSION_PACKAGES = {
    "httpfs": ("duckdb_extension_httpfs",),
    "postgres_scanner": ("duckdb_extension_postgres_scanner", "duckdb_extension_postgres"),
    "ducklake": ("duckdb_extension_ducklake",),
}

# Variables that belong to the gov domain although they do not start with ZQ_GOV_: the landing zone holds the
# agencies' raw deliveries (personal data), so its store key is a gov credential.
_GOV_EXTRA = ("ZQ_S3_ACCESS_KEY", "ZQ_S3_SECRET_KEY", "ZQ_LANDING_DIR")
# The ops domain's published-snapshot store.
_OPS_EXTRA = ("ZQ_S3_PUBLISHED_ACCESS_KEY", "ZQ_S3_PUBLISHED_SECRET_KEY")
# Only the boundary crossing needs these: the pseudonymization key.
_BOUNDARY_ONLY = ("ZQ_PSEUDONYM_KEY",)
# Credentials DuckDB's or boto's credential chain would pick up whatever the secret says: no worker gets them.
_AMBIENT_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                        "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                        "PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE")


class LakeSettingsError(ValueError):
    """The lake settings of the environment are missing or unsafe (the message lists every problem)."""


def _var(domain: str, name: str) -> str:
    return f"ZQ_{domain.upper()}_{name}"


def domain_variables(domain: str) -> dict[str, str]:
    """The per-domain variables: role -> environment variable name."""
    _check_domain(domain)
    return {
        "catalog": _var(domain, "LAKE_CATALOG"),
        "catalog_password": _var(domain, "LAKE_CATALOG_PASSWORD"),
        "data": _var(domain, "LAKE_DATA"),
        "key_id": _var(domain, "S3_KEY_ID"),
        "secret": _var(domain, "S3_SECRET"),
    }


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"未知的安全域 unknown domain {domain!r} (expected one of {', '.join(DOMAINS)})")


def warehouse_mode(environ: Mapping[str, str] | None = None) -> str:
    """``duckdb`` (embedded default) or ``ducklake``."""
    env = os.environ if environ is None else environ
    mode = (env.get(MODE_ENV) or "duckdb").strip().lower()
    if mode not in MODES:
        raise LakeSettingsError(f"未知的数仓模式 unknown {MODE_ENV}={mode!r} (expected {' or '.join(MODES)})")
    return mode


def worker_domains(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The domains this process may hold (``ZQ_WORKER_DOMAINS``; default both, as in a one-process deployment)."""
    env = os.environ if environ is None else environ
    raw = (env.get(WORKER_DOMAINS_ENV) or ",".join(DOMAINS)).replace(" ", "")
    domains = tuple(d for d in DOMAINS if d in raw.lower().split(","))
    unknown = [d for d in raw.lower().split(",") if d and d not in DOMAINS]
    if unknown or not domains:
        raise LakeSettingsError(f"{WORKER_DOMAINS_ENV}={raw!r}: expected gov, ops or gov,ops")
    return domains


# -- settings ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LakeSettings:
    """One domain's lake, from the environment. Secrets are kept out of ``repr``."""

    domain: str
    catalog_dsn: str
    data_path: str
    key_id: str = field(repr=False)
    secret: str = field(repr=False)
    catalog_password: str = field(default="", repr=False)
    endpoint: str = ""  # host:port, empty = AWS
    use_ssl: bool = True
    region: str = "us-east-1"
    url_style: str = "vhost"

    @property
    def catalog(self) -> str:
        return CATALOG_NAMES[self.domain]

    @property
    def bucket(self) -> str:
        return urlparse(self.data_path).netloc

    @property
    def attach_path(self) -> str:
        return f"ducklake:postgres:{self.catalog_dsn}"


def _s3_endpoint(env: Mapping[str, str]) -> tuple[str, bool]:
    """``ZQ_S3_ENDPOINT`` as DuckDB wants it (host:port) and whether to use TLS."""
    raw = (env.get("ZQ_S3_ENDPOINT") or "").strip().rstrip("/")
    secure = (env.get("ZQ_S3_SECURE") or "").strip().lower() in ("1", "true", "yes", "on")
    if "://" in raw:
        scheme, raw = raw.split("://", 1)
        secure = scheme.lower() == "https"
    elif not raw:
        secure = True  # AWS
    return raw, secure


def _normalize_dsn(dsn: str) -> str:
    # SQLAlchemy URLs as in ZQ_OPDB_URL (postgresql+psycopg2://...) are accepted: libpq wants postgresql://
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", dsn.strip())


def _dsn_parts(dsn: str) -> dict[str, str]:
    """host, port, dbname, user and password of a libpq keyword string or URI (enough to compare two DSNs)."""
    dsn = _normalize_dsn(dsn)
    if re.match(r"^postgres(?:ql)?://", dsn):
        u = urlparse(dsn)
        parts = {"host": u.hostname or "", "port": str(u.port or ""), "dbname": u.path.lstrip("/"),
                 "user": u.username or "", "password": u.password or ""}
        for kv in (u.query or "").split("&"):
            if "=" in kv:
                k, v = kv.split("=", 1)
                parts[k] = v
        return parts
    parts = {}
    for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
        value = m.group(2)
        parts[m.group(1)] = value[1:-1] if value.startswith("'") else value
    return parts


def _domain_problems(domain: str, env: Mapping[str, str]) -> list[str]:
    names = domain_variables(domain)
    problems = [f"{names[k]} 未设置 not set" for k in ("catalog", "data", "key_id", "secret") if not env.get(names[k])]
    dsn = env.get(names["catalog"]) or ""
    if dsn:
        parts = _dsn_parts(dsn)
        if parts.get("password"):
            problems.append(f"{names['catalog']} 含密码 holds a password: put it in {names['catalog_password']} "
                            "(DuckDB shows the ATTACH string in duckdb_databases() and in its error messages)")
        if not parts.get("dbname"):
            problems.append(f"{names['catalog']} names no database (dbname=...)")
    data = env.get(names["data"]) or ""
    if data:
        u = urlparse(data)
        if u.scheme != "s3" or not u.netloc:
            problems.append(f"{names['data']}={data!r}: expected s3://<bucket>/<prefix>/")
    return problems


def lake_settings_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Everything wrong with this process's lake settings (empty: fine). Nothing to check in the embedded mode.

    - every domain the process may hold (``ZQ_WORKER_DOMAINS``) has its catalog, data path and S3 key;
    - a process that may not hold a domain sees none of its variables (an ops worker: no ``ZQ_GOV_*``, no landing
      key, no pseudonymization key), and no generic AWS/libpq credential is set at all;
    - gov and ops never share a credential, a bucket or a catalog database.
    """
    env = os.environ if environ is None else environ
    try:
        if warehouse_mode(env) != "ducklake":
            return []
        held = worker_domains(env)
    except LakeSettingsError as exc:
        return [str(exc)]
    problems: list[str] = []
    for domain in held:
        problems += _domain_problems(domain, env)
    for domain in DOMAINS:
        if domain not in held:
            leaked = sorted(name for name in _domain_owned(domain, env) if env.get(name))
            if leaked:
                problems.append(f"{WORKER_DOMAINS_ENV}={','.join(held)} but {domain} variables are set: "
                                + ", ".join(leaked))
    if held != DOMAINS:
        leaked = sorted(name for name in _BOUNDARY_ONLY if env.get(name))
        if leaked:
            problems.append(f"only the boundary worker ({WORKER_DOMAINS_ENV}=gov,ops) may hold " + ", ".join(leaked))
    ambient = sorted(name for name in _AMBIENT_CREDENTIALS if env.get(name))
    if ambient:
        problems.append("generic credentials set (a credential chain would use them whatever the domain): "
                        + ", ".join(ambient))
    if held == DOMAINS:
        gov, ops = domain_variables("gov"), domain_variables("ops")
        for role, what in (("key_id", "S3 key"), ("secret", "S3 secret"), ("catalog_password", "catalog password")):
            if env.get(gov[role]) and env.get(gov[role]) == env.get(ops[role]):
                problems.append(f"gov 与 ops 共用{what} gov and ops share one {what} ({gov[role]} = {ops[role]})")
        gdata, odata = urlparse(env.get(gov["data"]) or ""), urlparse(env.get(ops["data"]) or "")
        if gdata.netloc and gdata.netloc == odata.netloc:
            problems.append(f"gov 与 ops 共用存储桶 gov and ops share the bucket {gdata.netloc!r}: one bucket each, "
                            "each key allowed on its own bucket only")
        gdsn, odsn = env.get(gov["catalog"]), env.get(ops["catalog"])
        if gdsn and odsn:
            g, o = _dsn_parts(gdsn), _dsn_parts(odsn)
            if (g.get("host"), g.get("port"), g.get("dbname")) == (o.get("host"), o.get("port"), o.get("dbname")):
                problems.append("gov 与 ops 共用目录库 gov and ops share one catalog database "
                                f"({g.get('dbname')!r}): one database each, each role allowed on its own only")
            if g.get("user") and g.get("user") == o.get("user"):
                problems.append(f"gov 与 ops 共用目录库用户 gov and ops catalogs use the same role {g.get('user')!r}")
    return problems


def lake_settings(domain: str, environ: Mapping[str, str] | None = None) -> LakeSettings:
    """One domain's settings; ``LakeSettingsError`` naming every problem of that domain (or of the whole env)."""
    _check_domain(domain)
    env = os.environ if environ is None else environ
    problems = _domain_problems(domain, env)
    if not problems and domain not in worker_domains(env):
        problems.append(f"{WORKER_DOMAINS_ENV}={env.get(WORKER_DOMAINS_ENV)!r} does not allow the {domain} domain")
    if problems:
        raise LakeSettingsError(f"{domain} 湖配置有误 lake settings of {domain}: " + "; ".join(problems))
    names = domain_variables(domain)
    endpoint, use_ssl = _s3_endpoint(env)
    data = env[names["data"]].strip()
    return LakeSettings(
        domain=domain,
        catalog_dsn=_normalize_dsn(env[names["catalog"]]),
        data_path=data if data.endswith("/") else data + "/",
        key_id=env[names["key_id"]],
        secret=env[names["secret"]],
        catalog_password=env.get(names["catalog_password"]) or "",
        endpoint=endpoint,
        use_ssl=use_ssl,
        region=(env.get("ZQ_S3_REGION") or "us-east-1").strip(),
        url_style=(env.get("ZQ_S3_URL_STYLE") or ("path" if endpoint else "vhost")).strip().lower(),
    )


# -- environments of the workers -----------------------------------------------------------------------------------

def _domain_owned(domain: str, env: Mapping[str, str]) -> list[str]:
    prefix = f"ZQ_{domain.upper()}_"
    extra = _GOV_EXTRA if domain == "gov" else _OPS_EXTRA
    return [name for name in env if name.startswith(prefix) or name in extra]


def domain_environment(domains: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker holding only ``domains`` may get: the other domain's variables, the boundary-only
    key (unless both domains), generic AWS/libpq credentials, and any variable whose value is one of the other
    domain's secrets (whatever its name) are left out; ``ZQ_WORKER_DOMAINS`` is set."""
    env = dict(os.environ if environ is None else environ)
    held = tuple(d for d in DOMAINS if d in set(domains))
    if not held:
        raise ValueError("a worker holds at least one domain")
    drop: set[str] = set(_AMBIENT_CREDENTIALS)
    secret_values: set[str] = set()
    for other in DOMAINS:
        if other in held:
            continue
        owned = _domain_owned(other, env)
        drop.update(owned)
        names = domain_variables(other)
        secret_names = {names["key_id"], names["secret"], names["catalog_password"],
                        *(_GOV_EXTRA[:2] if other == "gov" else _OPS_EXTRA)}
        secret_values.update(env[n] for n in secret_names if env.get(n))
    if held != DOMAINS:
        drop.update(_BOUNDARY_ONLY)
    out = {k: v for k, v in env.items()
           if k not in drop and not any(v == s or (len(s) >= 8 and s in v) for s in secret_values)}
    out[WORKER_DOMAINS_ENV] = ",".join(held)
    return out


def ops_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an ops-only worker (Celery queue ``ops``): no gov credential of any kind."""
    return domain_environment(("ops",), environ)


def gov_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a gov-only worker: no ops credential, no pseudonymization key."""
    return domain_environment(("gov",), environ)


def dbt_environment(domain: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The lake variables a sealed dbt step of ``domain`` gets (domain-neutral names, read by the ``*_lake`` targets
    of profiles.yml): only that domain's catalog, data path and key, and the extension folder."""
    s = lake_settings(domain, environ)
    return {
        "ZQ_LAKE_CATALOG": s.catalog_dsn,
        "ZQ_LAKE_CATALOG_PASSWORD": s.catalog_password,
        "ZQ_LAKE_DATA": s.data_path,
        "ZQ_LAKE_S3_KEY_ID": s.key_id,
        "ZQ_LAKE_S3_SECRET": s.secret,
        "ZQ_LAKE_S3_ENDPOINT": s.endpoint or "s3.amazonaws.com",
        "ZQ_LAKE_S3_USE_SSL": "true" if s.use_ssl else "false",
        "ZQ_LAKE_S3_URL_STYLE": s.url_style,
        "ZQ_LAKE_S3_REGION": s.region,
        EXTENSION_DIR_ENV: str(extension_directory(environ=environ)),
    }


# -- extensions ----------------------------------------------------------------------------------------------------

def extension_file(name: str) -> Path:
    """The ``.duckdb_extension`` file of ``name`` for this DuckDB version, from its Python package."""
    version = f"v{duckdb.__version__}"
    for package in EXTENSION_PACKAGES[name]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(next(iter(spec.submodule_search_locations))) / "extensions" / version
        files = sorted(folder.glob("*.duckdb_extension"))
        if files:
            return files[0]
    wanted = " or ".join(p.replace("_", "-") for p in EXTENSION_PACKAGES[name])
    raise FileNotFoundError(f"DuckDB 扩展缺失 extension {name} for duckdb {duckdb.__version__} not installed: "
                            f"pip install {wanted}=={duckdb.__version__} (pyproject.toml dependencies)")


def _platform() -> str:
    with duckdb.connect() as con:
        return con.execute("PRAGMA platform").fetchone()[0]


def extension_directory(root: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """A DuckDB extension folder (``<root>/v<version>/<platform>/<name>.duckdb_extension``) of symlinks to the
    packaged files, made once per machine and idempotently. dbt-duckdb points ``extension_directory`` (and the
    extension repository) here, so ATTACH and CREATE SECRET autoload from it and never download."""
    env = os.environ if environ is None else environ
    base = Path(root or env.get(EXTENSION_DIR_ENV) or Path(tempfile.gettempdir()) / f"zq-duckdb-extensions-{os.getuid()}")
    folder = base / f"v{duckdb.__version__}" / _platform()
    folder.mkdir(parents=True, exist_ok=True)
    for name in EXTENSION_PACKAGES:
        target, link = extension_file(name), folder / f"{name}.duckdb_extension"
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: a concurrent reader sees the old link or the new one
    return base


# -- connections ---------------------------------------------------------------------------------------------------

def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect_lake(domain: str, read_only: bool = False, *, environ: Mapping[str, str] | None = None,
                 memory_limit: str | None = None, lock_configuration: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the domain's lake attached as ``gov_platform`` / ``ops_platform`` and in USE.

    Extensions loaded by file path (no autoinstall, no autoload, local extension repository); one S3 secret scoped
    to the domain's data path; S3 requests outside it go to the same endpoint unsigned (refused by the store, never
    to AWS); the catalog password as a named postgres secret (``META_SECRET``). ``lock_configuration`` locks every
    setting afterwards (as the sealed dbt steps do)."""
    s = lake_settings(domain, environ)
    env = os.environ if environ is None else environ
    ext_dir = extension_directory(environ=environ)
    if memory_limit is None:
        from zqdata.settings import get_settings

        memory_limit = get_settings().duckdb_memory_limit
    con = duckdb.connect(":memory:", config={
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "extension_directory": str(ext_dir),
        "custom_extension_repository": str(ext_dir),
        "autoinstall_extension_repository": str(ext_dir),
    })
    try:
        con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
        spill = env.get("ZQ_DUCKDB_TEMP_DIR") or str(Path(tempfile.gettempdir()) / f"zq-duckdb-spill-{os.getuid()}")
        con.execute(f"SET temp_directory = {_sql_str(spill)}")
        folder = ext_dir / f"v{duckdb.__version__}" / _platform()
        for name in EXTENSION_PACKAGES:  # httpfs, postgres_scanner, ducklake: by path, in dependency order
            con.execute(f"LOAD {_sql_str(str(folder / f'{name}.duckdb_extension'))}")
        # Unscoped S3 requests (a path outside the domain's data) go unsigned to the same store, which refuses them.
        con.execute(f"SET s3_endpoint = {_sql_str(s.endpoint or 's3.amazonaws.com')}")
        con.execute(f"SET s3_use_ssl = {str(s.use_ssl).lower()}")
        con.execute(f"SET s3_url_style = {_sql_str(s.url_style)}")
        con.execute(f"SET s3_region = {_sql_str(s.region)}")
        con.execute(
            f"CREATE SECRET zq_{domain}_s3 (TYPE s3, KEY_ID {_sql_str(s.key_id)}, SECRET {_sql_str(s.secret)}, "
            f"ENDPOINT {_sql_str(s.endpoint or 's3.amazonaws.com')}, URL_STYLE {_sql_str(s.url_style)}, "
            f"USE_SSL {str(s.use_ssl).lower()}, REGION {_sql_str(s.region)}, SCOPE {_sql_str(s.data_path)})")
        con.execute(f"CREATE SECRET zq_{domain}_catalog (TYPE postgres, PASSWORD {_sql_str(s.catalog_password)})")
        options = [f"DATA_PATH {_sql_str(s.data_path)}", f"META_SECRET 'zq_{domain}_catalog'"]
        if read_only:
            options.append("READ_ONLY")
        con.execute(f"ATTACH {_sql_str(s.attach_path)} AS {s.catalog} ({', '.join(options)})")
        con.execute(f"USE {s.catalog}")
        if lock_configuration:
            con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def is_transaction_conflict(exc: BaseException) -> bool:
    """DuckLake refused the commit because a transaction committed meanwhile changed the same table in a way it does
    not merge (see ``run_in_transaction``). Nothing of the refused transaction is visible (its Parquet files are
    orphans for ``ducklake_delete_orphaned_files``); running it again is safe when it is idempotent."""
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


def run_in_transaction(con: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection, int], T], *,
                       attempts: int = 6, wait_seconds: float = 0.2, backoff: float = 2.0) -> tuple[T, int]:
    """``work(con, attempt)`` in one transaction, committed; run again from BEGIN when DuckLake reports a
    conflict with a concurrent commit (``is_transaction_conflict``), up to ``attempts`` times with jittered backoff.
    Returns (work's result, attempts used). ``work`` must be idempotent (delete-then-insert of its partition is).

    What DuckLake (format 1.0, DuckDB 1.5.5) merges by itself and what it refuses, per table, whatever the partitions
    (``tests/test_lakes.py::test_ducklake_conflict_rules``): two transactions that only insert, or only delete, merge;
    a transaction that deletes rows (DELETE or UPDATE) and one that inserts conflict, in either order. The
    replace-a-partition pattern (delete the day, insert it anew) therefore merges on a first load (the delete finds
    nothing) and conflicts when two days of one table are *re*built at once: the later commit runs again here.
    Keep the transaction short: compute the rows first (a temp table, as dbt-duckdb's incremental does), then
    delete + insert from it inside ``work``."""
    for attempt in range(1, attempts + 1):
        con.execute("BEGIN")
        try:
            result = work(con, attempt)
            con.execute("COMMIT")
            return result, attempt
        except duckdb.Error as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT already ended the transaction
            if not is_transaction_conflict(exc) or attempt == attempts:
                raise
            time.sleep(wait_seconds * backoff ** (attempt - 1) * (1 + random.random()))
    raise AssertionError("unreachable")


def table_checksum(con: duckdb.DuckDBPyConnection, table: str,
                   columns: Iterable[str] | None = None) -> tuple[int, int, int]:
    """Order-independent checksum of a table: (rows, sum of row hashes mod 2^64, xor of row hashes). Two tables with
    the same rows in any order, in any storage (DuckDB file or DuckLake), give the same triple. ``columns``: only
    these (default all), e.g. without the columns that record when a row was written."""
    cols = list(columns) if columns is not None else [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
    row = "hash(" + ", ".join(f'"{c}"' for c in cols) + ")"
    n, total, xor = con.execute(
        f"SELECT count(*), coalesce(sum({row}::HUGEINT) % 18446744073709551616, 0), coalesce(bit_xor({row}), 0) "
        f"FROM {table}").fetchone()
    return int(n), int(total), int(xor)
