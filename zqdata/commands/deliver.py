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
    # Checked by _deliver, not by argparse: a request with a missing or malformed argument is refused *and logged*.
    p.add_argument("--consumer", help="consumer code (registry/consumers.yaml); required")
    p.add_argument("--product", help="product, e.g. ops_sme_credit_profile; required")
    p.add_argument("--date", help="partition, YYYY-MM-DD; required")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <ZQ_DATA_DIR>/published/deliveries)")
    p.add_argument("--credential-env", default=CREDENTIAL_ENV,
                   help=f"environment variable holding the consumer credential (default {CREDENTIAL_ENV})")
    p.set_defaults(func=_deliver)
    # What argparse itself still refuses (e.g. `--date` without a value) is logged too, with what the request named.
    seen: list[str] = []
    parse_known_args, usage_error = p.parse_known_args, p.error

    def remembering_parse_known_args(args=None, namespace=None):
        seen[:] = list(sys.argv[1:] if args is None else args)
        namespace, extras = parse_known_args(args, namespace)
        if extras:  # refused here rather than by the top-level parser, so that it is logged
            p.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def logged_usage_error(message: str):
        _log_refusal(argv_value(seen, "--consumer"), argv_value(seen, "--product"), None,
                     f"参数错误 (rejected arguments): {message}")
        usage_error(message)

    p.parse_known_args, p.error = remembering_parse_known_args, logged_usage_error

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


def argv_value(argv: list[str], option: str) -> str:
    """The value given to ``option`` (``--opt v`` or ``--opt=v``) in a command line argparse refused; "" if none."""
    for i, arg in enumerate(argv):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            return argv[i + 1]
    return ""


def _log_refusal(consumer: str, product: str, partition: dt.date | None, reason: str) -> bool:
    """Log a refused request before anything is served; False (and said on stderr) when it cannot be logged."""
    from zqdata import audit, opdb

    try:
        audit.append_delivery(opdb.get_engine(), consumer=consumer or "", scenario="", product=product or "",
                              partition_date=partition, outcome="denied", reason=reason, row_count=0, file_sha256="")
    except (ValueError, audit.AuditError) as exc:
        print(f"无法记录审计日志 (the refusal could not be logged): {exc}", file=sys.stderr)
        return False
    return True


def _deliver(args: argparse.Namespace) -> int:
    from zqdata import audit, opdb
    from zqdata.authorization import AccessDenied, deliver_product
    from zqdata.publish import published_store
    from zqdata.registry import registry
    from zqdata.settings import get_settings

    credential = os.environ.get(args.credential_env, "")
    out = args.out or get_settings().docs_dir / "deliveries"
    try:  # served from the published snapshots and logged in the operational DB: no warehouse file is opened
        engine, store = opdb.get_engine(), published_store()
        audit.key_from_env()  # nothing is served that could not be logged
    except ValueError as exc:
        print(f"配置错误 (configuration error): {exc}", file=sys.stderr)
        return 2

    def refuse(reason: str, partition: dt.date | None = None) -> int:  # a refusal like any other: in the audit log
        _log_refusal(args.consumer, args.product, partition, reason)
        print(f"拒绝交付 (delivery denied): {reason}", file=sys.stderr)
        return 2

    missing = [f"--{name}" for name in ("consumer", "product", "date") if not getattr(args, name)]
    if missing:
        return refuse(f"缺少参数 {' '.join(missing)} (missing arguments)")
    try:
        partition = dt.date.fromisoformat(args.date)
    except ValueError:
        return refuse(f"日期无效 {args.date!r}，应为 YYYY-MM-DD (bad date)")
    if not credential:
        return refuse(f"缺少凭证：请设置环境变量 {args.credential_env} (credential required in the environment)",
                      partition)
    try:
        receipt = deliver_product(engine, store, registry(), args.consumer, credential, args.product, partition, out)
    except AccessDenied as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except audit.AuditLogTampered as exc:
        print(f"审计日志与锚点不符，停止交付 (audit log tampered: deliveries stop): {exc}", file=sys.stderr)
        return 1
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
    from zqdata.audit import AuditKeyError, anchor_path, verify

    engine = _opdb()
    if engine is None:
        return 2
    try:
        result = verify(engine)
    except AuditKeyError as exc:
        print(f"配置错误 (configuration error): {exc}", file=sys.stderr)
        return 2
    if result.problems:
        print(f"审计日志校验失败 (audit log BROKEN), {len(result.problems)} problem(s):")
        for p in result.problems:
            print(f"  - {p}")
        return 1
    if not result.records:
        print("审计日志为空，无锚点 (no audit log yet, no anchor): OK")
        return 0
    print(f"审计日志完整 (audit chain intact): {result.records} records, head {result.head_hash}")
    if result.anchor is not None:
        print(f"  anchor {anchor_path()}: count {result.anchor.count}, updated {result.anchor.updated_at}")
    for note in result.notes:
        print(f"  note: {note}")
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
