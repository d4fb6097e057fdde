"""`zq deliver` (hand a published product snapshot to a registered consumer) and `zq audit verify|list|hash-credential|classification`.

Deliveries and the audit log use only the published snapshots (zqdata.publish) and the operational DB (zqdata.opdb),
never a DuckDB file, so they work while the nightly run holds the warehouse.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

CREDENTIAL_ENV = "ZQ_CONSUMER_CREDENTIAL"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliver", help="向登记的使用方交付已发布的场景产品 deliver a published product partition to a registered consumer")
    p.add_argument("--consumer", required=True, help="consumer code (registry/consumers.yaml)")
    p.add_argument("--product", required=True, help="product, e.g. ops_sme_credit_profile")
    p.add_argument("--date", type=dt.date.fromisoformat, required=True, help="partition, YYYY-MM-DD")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <ZQ_DATA_DIR>/published/deliveries)")
    p.add_argument("--credential-env", default=CREDENTIAL_ENV,
                   help=f"environment variable holding the consumer credential (default {CREDENTIAL_ENV})")
    p.set_defaults(func=_deliver)

    a = sub.add_parser("audit", help="交付审计日志 the delivery audit log (Art. 25)")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="校验哈希链 verify the hash chain of the delivery audit log (operational DB)")
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
    from zqdata import opdb
    from zqdata.audit import append_delivery
    from zqdata.authorization import AccessDenied, deliver_product
    from zqdata.publish import published_store
    from zqdata.registry import registry
    from zqdata.settings import get_settings

    credential = os.environ.get(args.credential_env, "")
    out = args.out or get_settings().docs_dir / "deliveries"
    try:  # served from the published snapshots and logged in the operational DB: no warehouse file is opened
        engine, store = opdb.get_engine(), published_store()
    except ValueError as exc:
        print(f"配置错误 (configuration error): {exc}", file=sys.stderr)
        return 2
    if not credential:  # a refusal like any other: in the audit log
        reason = f"缺少凭证：请设置环境变量 {args.credential_env} (credential required in the environment)"
        append_delivery(engine, consumer=args.consumer, scenario="", product=args.product, partition_date=args.date,
                        outcome="denied", reason=reason, row_count=0, file_sha256="")
        print(reason, file=sys.stderr)
        return 2
    try:
        receipt = deliver_product(engine, store, registry(), args.consumer, credential, args.product, args.date, out)
    except AccessDenied as exc:
        print(str(exc), file=sys.stderr)
        return 3
    print(f"已交付 delivered: {receipt.path}\n  rows={receipt.row_count} sha256={receipt.sha256}\n"
          f"  snapshot={receipt.snapshot}\n"
          f"  scenario={receipt.scenario} at={receipt.delivered_at.isoformat()} audit_hash={receipt.record_hash}")
    return 0


def _opdb():
    from zqdata import opdb

    try:
        return opdb.get_engine()
    except ValueError as exc:
        print(f"配置错误 (configuration error): {exc}", file=sys.stderr)
        return None


def _verify(args: argparse.Namespace) -> int:
    from zqdata.audit import read_chain, verify_chain

    engine = _opdb()
    if engine is None:
        return 2
    problems = verify_chain(engine)
    chain = read_chain(engine)
    if problems:
        print(f"审计日志哈希链校验失败 (audit chain BROKEN), {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    if not chain:
        print("审计日志为空 (no audit log yet): OK")
        return 0
    print(f"审计日志完整 (audit chain intact): {len(chain)} records, head {chain[-1].record_hash}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from zqdata.audit import printable, read_chain

    engine = _opdb()
    if engine is None:
        return 2
    for r in read_chain(engine)[-args.limit:]:  # logged values come from requesters: control characters escaped
        print(f"{r.seq:>5} {r.delivered_at} {r.outcome:<9} {printable(r.consumer):<22} {printable(r.product):<26} "
              f"{r.partition_date} rows={r.row_count} {printable(r.snapshot) or '-'} {printable(r.reason)}")
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
