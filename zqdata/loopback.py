"""Throwaway services on loopback for the distributed mode on one machine (issue 16): `make distributed` and the tests.

- ``postgres_server``: a PostgreSQL cluster of Debian's ``postgresql`` package (initdb refuses root: as root the
  cluster belongs to the package's ``postgres`` user), trust for the admin role ``zq`` on loopback only;
- ``moto_server``: the S3-protocol stand-in for MinIO (``moto_server`` from the venv);
- ``redis_server``: the Celery broker (Debian's ``redis-server``), no persistence;
- ``provision_lakes``: the two lakes of ``zqdata.lakes`` on them — one catalog database and one password-
  authenticated role per domain, one bucket and one IAM user per domain allowed on its own bucket only, IAM enforced —
  and the environment variables that describe them.

Each context manager stops what it started, also when the block raises.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUCKETS = {"gov": "zq-gov-lake", "ops": "zq-ops-lake"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL ----------------------------------------------------------------------------------------------------

def pg_bin() -> str | None:
    """The newest PostgreSQL server's bin folder, or None when no server is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@contextmanager
def postgres_server(timeout: float = 120.0) -> Iterator[str]:
    """Start a PostgreSQL server; yields the SQLAlchemy URL of its database `zq`."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server not installed (apt-get install postgresql; `make test` does it as root)")
    owner = "postgres" if os.geteuid() == 0 else None
    base = tempfile.mkdtemp(prefix="zq-pg-")
    data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
    os.makedirs(sock)
    if owner:
        shutil.chown(base, owner)
        shutil.chown(sock, owner)
    port = free_port()
    try:
        subprocess.run(_as_owner([f"{bindir}/initdb", "-D", data, "-U", "zq", "--auth=trust", "-E", "UTF8",
                                  "--no-instructions"], owner), check=True, capture_output=True)
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=300"
        subprocess.run(_as_owner([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(base, "log"), "-w",
                                  "-t", str(int(timeout)), "start"], owner), check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while subprocess.run(_as_owner([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "zq", "zq"],
                                       owner), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {port} did not accept connections")
            time.sleep(0.5)
        yield f"postgresql+psycopg2://zq@127.0.0.1:{port}/zq"
    finally:
        if os.path.isdir(data):
            subprocess.run(_as_owner([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], owner),
                           capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def pg_admin(url: str):
    """An autocommit psycopg2 connection as the admin role of ``postgres_server``; (connection, port)."""
    import psycopg2

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    con = psycopg2.connect(host="127.0.0.1", port=port, user="zq", dbname="zq")
    con.autocommit = True
    return con, port


def require_password_auth(cur) -> None:
    """The server trusts loopback for the admin; every other role (the lake roles) authenticates with its password
    (scram), as in production."""
    cur.execute("SHOW hba_file")
    hba = Path(cur.fetchone()[0])
    hba.write_text("local all zq trust\nhost all zq 127.0.0.1/32 trust\n"
                   "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n")
    cur.execute("SELECT pg_reload_conf()")


# -- S3 (moto) -----------------------------------------------------------------------------------------------------

def moto_executable() -> Path | None:
    exe = Path(sys.executable).parent / "moto_server"
    return exe if exe.exists() else None


@contextmanager
def moto_server(start_timeout: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``moto_server`` on a free loopback port; yields (``host:port``, process); killed on exit."""
    exe = moto_executable()
    if exe is None:
        raise RuntimeError("moto_server not installed in the venv (make setup installs moto[server])")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def moto_iam(endpoint: str, buckets: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Buckets and IAM users (each allowed on its own bucket only), then IAM enforced from the next request on.
    -> {domain: (key id, secret)}."""
    import boto3

    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    iam, s3 = boto3.client("iam", **admin), boto3.client("s3", **admin)
    keys = {}
    for domain, bucket in (buckets or BUCKETS).items():
        s3.create_bucket(Bucket=bucket)
        iam.create_user(UserName=f"zq-{domain}")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
            f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        iam.put_user_policy(UserName=f"zq-{domain}", PolicyName="own-bucket", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=f"zq-{domain}")["AccessKey"]
        keys[domain] = (key["AccessKeyId"], key["SecretAccessKey"])
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if json.loads(resp.read())["status"] != "ok":
            raise RuntimeError("moto_server did not enforce IAM")
    return keys


# -- Redis ---------------------------------------------------------------------------------------------------------

def redis_executable() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


@contextmanager
def redis_server(timeout: float = 60) -> Iterator[str]:
    """Start ``redis-server`` on a free loopback port, no persistence; yields its ``redis://`` URL; stopped on exit."""
    exe = redis_executable()
    if exe is None:
        raise RuntimeError("redis-server not installed (apt-get install redis-server)")
    port = free_port()
    base = tempfile.mkdtemp(prefix="zq-redis-")
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", base, "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


# -- the two lakes -------------------------------------------------------------------------------------------------

def provision_lakes(pg_url: str, s3_hostport: str, ext_dir: Path, spill_dir: Path) -> dict[str, str]:
    """Catalog databases, roles, buckets and IAM users of the two lakes; the environment of a boundary worker (both
    domains). The lake roles get random passwords and must authenticate with them."""
    from zqdata import lakes

    con, port = pg_admin(pg_url)
    cur = con.cursor()
    passwords = {}
    for domain in lakes.DOMAINS:
        passwords[domain] = f"{domain}-catalog-{os.urandom(6).hex()}"
        cur.execute(f"CREATE ROLE zq_{domain}_lake LOGIN PASSWORD '{passwords[domain]}'")
        cur.execute(f"CREATE DATABASE {domain}_catalog OWNER zq_{domain}_lake")
        cur.execute(f"REVOKE ALL ON DATABASE {domain}_catalog FROM PUBLIC")
    require_password_auth(cur)
    con.close()
    keys = moto_iam(f"http://{s3_hostport}")
    env = {
        "ZQ_WAREHOUSE": "ducklake",
        "ZQ_S3_ENDPOINT": f"http://{s3_hostport}",
        "ZQ_S3_REGION": "us-east-1",
        "ZQ_DUCKDB_EXTENSION_DIR": str(ext_dir),
        "ZQ_DUCKDB_TEMP_DIR": str(spill_dir),
    }
    for domain, bucket in BUCKETS.items():
        d = domain.upper()
        env[f"ZQ_{d}_LAKE_CATALOG"] = f"dbname={domain}_catalog host=127.0.0.1 port={port} user=zq_{domain}_lake"
        env[f"ZQ_{d}_LAKE_CATALOG_PASSWORD"] = passwords[domain]
        env[f"ZQ_{d}_LAKE_DATA"] = f"s3://{bucket}/warehouse/"
        env[f"ZQ_{d}_S3_KEY_ID"], env[f"ZQ_{d}_S3_SECRET"] = keys[domain]
    problems = lakes.lake_settings_problems(env)
    if problems:
        raise RuntimeError("; ".join(problems))
    return env
