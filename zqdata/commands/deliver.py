"""`zq deliver` (export a scenario product to a registered consumer) and `zq audit verify|list|hash-credential|classification`."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

CREDENTIAL_ENV = "ZQ_CONSUMER_CREDENTIAL"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliver", help="向登记的使用方交付场景产品 deliver a product partition to a registered consumer")
    p.add_argument("--consumer", required=True, help="consumer code (registry/consumers.yaml)")
    p.add_argument("--product", required=True, help="product, e.g. ops_sme_credit_profile")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True, help="partition, YYYY-MM-DD")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <ZQ_DATA_DIR>/published/deliveries)")
    p.add_argument("--credential-env", default=CREDENTIAL_ENV,
                   help=f"environment variable holding the consumer credential (default {CREDENTIAL_ENV})")
    p.set_defaults(func=_deliver)

    a = sub.add_parser("audit", help="交付审计日志 the delivery audit log (Art. 25)")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="校验哈希链 verify the hash chain of audit.deliveries")
    v.set_defaults(func=_verify)
    ls = asub.add_parser("list", help="列出交付记录 list delivery records")
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=_list)
    h = asub.add_parser("hash-credential", help="生成凭证哈希 hash a credential read from stdin for consumers.yaml")
    h.set_defaults(func=_hash)
    c = asub.add_parser("classification", help="分类分级表 print (or --write into docs/security.md) the classification table")
    c.add_argument("--write", action="store_true")
    c.set_defaults(func=_classification)


def _deliver(args: argparse.Namespace) -> int:
    import duckdb

    from zqdata.authorization import AccessDenied, deliver_product
    from zqdata.registry import registry
    from zqdata.settings import get_settings

    credential = os.environ.get(args.credential_env, "")
    if not credential:
        print(f"缺少凭证：请设置环境变量 {args.credential_env} (credential required in the environment)", file=sys.stderr)
        return 2
    settings = get_settings()
    out = args.out or settings.docs_dir / "deliveries"
    con = duckdb.connect(str(settings.ops_db))
    try:
        receipt = deliver_product(con, registry(), args.consumer, credential, args.product, args.date, out)
    except AccessDenied as exc:
        print(str(exc), file=sys.stderr)
        return 3
    finally:
        con.close()
    print(f"已交付 delivered: {receipt.path}\n  rows={receipt.row_count} sha256={receipt.sha256}\n"
          f"  scenario={receipt.scenario} at={receipt.delivered_at.isoformat()} audit_hash={receipt.record_hash}")
    return 0


def _ops_read_only():
    import duckdb

    from zqdata.settings import get_settings

    path = get_settings().ops_db
    if not path.exists():
        print(f"运营平台数据库不存在 (ops DB not found): {path}", file=sys.stderr)
        return None
    return duckdb.connect(str(path), read_only=True)


def _verify(args: argparse.Namespace) -> int:
    from zqdata.audit import read_chain, verify_chain

    con = _ops_read_only()
    if con is None:
        return 2
    try:
        has_table = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'audit' "
                                "AND table_name = 'deliveries'").fetchone()[0]
        if not has_table:
            print("审计日志为空 (no audit log yet): OK")
            return 0
        problems = verify_chain(con)
        chain = read_chain(con)
    finally:
        con.close()
    if problems:
        print(f"审计日志哈希链校验失败 (audit chain BROKEN), {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    head = chain[-1].record_hash if chain else "-"
    print(f"审计日志完整 (audit chain intact): {len(chain)} records, head {head}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from zqdata.audit import read_chain

    con = _ops_read_only()
    if con is None:
        return 2
    try:
        chain = read_chain(con) if con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'audit'").fetchone()[0] else []
    finally:
        con.close()
    for r in chain[-args.limit:]:
        print(f"{r.seq:>5} {r.delivered_at} {r.outcome:<9} {r.consumer:<22} {r.product:<26} {r.partition_date} "
              f"rows={r.row_count} {r.reason}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    from zqdata.authorization import hash_credential

    credential = sys.stdin.read().rstrip("\n")
    if not credential:
        print("标准输入为空 (empty credential on stdin)", file=sys.stderr)
        return 2
    print(hash_credential(credential))
    return 0


def _classification(args: argparse.Namespace) -> int:
    from zqdata.desensitize import classification_table, render_security_doc
    from zqdata.registry import registry
    from zqdata.settings import repo_root

    if not args.write:
        print(classification_table(registry()))
        return 0
    path = repo_root() / "docs" / "security.md"
    path.write_text(render_security_doc(path.read_text(encoding="utf-8"), registry()), encoding="utf-8")
    print(f"updated {path}")
    return 0
