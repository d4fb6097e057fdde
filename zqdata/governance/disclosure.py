"""信息披露 (Art. 21): the disclosure report of a period — every authorization in force (object, content, scope, term,
public-interest or commercial per Art. 26), the operator's catalogue of products and services with their registration
codes (Art. 17), and the data use (deliveries per product and per consumer class, rows, refusals) from the delivery
audit log of the operational DB.

Yearly for year Y (national guidance: published by the end of March of Y+1), or any period on demand. The report is a
dict (JSON), rendered to Markdown and to a self-contained HTML page (inline CSS, no external URL). It holds no personal
data and no credential: organisations are named, never people; what a refused requester typed (consumer code, product,
reason text) is never shown, only counted by category. Published to the published store (zqdata.publish) as the other
governance reports are (zqdata.governance.reporting.publish_files): under ``reports/disclosure/<period>/<sha256[:16]>/``
with ``reports/disclosure/<period>/CURRENT.json`` written last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from zqdata import opdb
from zqdata.governance import registration, reporting
from zqdata.governance.reporting import PublishedReport
from zqdata.registry import Registry, Scenario
from zqdata.settings import TZ
from zqdata.storage import ObjectStore

KIND = "disclosure"  # reports/disclosure/<period>/
FILE_NAMES = reporting.FILES  # the files of every governance report, in the order they are written
TITLE = "肇庆市公共数据资源授权运营信息披露报告"
TITLE_EN = "Disclosure report on the authorized operation of public data resources (Art. 21)"
KIND_CN = {"public_interest": "公益", "commercial": "经营性"}
CONSENT_CN = {"person": "须个人授权", "enterprise": "须企业授权", None: "无需数据主体授权"}
CONSUMER_CLASSES = {
    "public_interest": "公益场景使用方 public-interest users",
    "commercial": "经营性场景使用方 commercial users",
    "unregistered": "未登记请求方 unregistered requesters",
}
# Refusal categories, matched on the English part every refusal reason of zq deliver carries (authorization.py,
# commands/deliver.py, governance/registration.py); the reason text itself is never disclosed (it may echo input).
REFUSAL_CATEGORIES = (
    ("unknown_consumer", "未登记的使用方 unknown consumer", ("unknown consumer",)),
    ("credential", "凭证错误或缺失 wrong or missing credential", ("wrong credential", "credential required")),
    ("not_authorized", "未获场景授权 not authorized for the scenario", ("not registered for the scenario",)),
    ("unknown_product", "未登记到场景的产品 unknown product", ("unknown product",)),
    ("authorization_term", "授权已撤销或不在期限内 authorization revoked or out of term", ("authorization of scenario",)),
    ("registration", "产品未登记赋码或已注销 product not registered (Art. 17)",
     ("no registration code", "registration cancelled")),
    ("not_published", "分区未发布 partition not published", ("partition not published",)),
    ("snapshot", "快照校验失败 snapshot check failed", ("snapshot",)),
    ("arguments", "请求参数错误 invalid request", ("missing arguments", "bad date", "rejected arguments")),
)
OTHER_CATEGORY = ("other", "其他 other")


@dataclass(frozen=True)
class Period:
    start: dt.date
    end: dt.date
    label: str  # "2025" for a year, else "<start>_<end>": part of the object key

    @classmethod
    def year(cls, year: int) -> "Period":
        return cls(dt.date(year, 1, 1), dt.date(year, 12, 31), f"{year:04d}")

    @classmethod
    def between(cls, start: dt.date, end: dt.date) -> "Period":
        if end < start:
            raise ValueError(f"披露期间结束日 {end} 早于开始日 {start} (period ends before it starts)")
        if (start.month, start.day, end.month, end.day) == (1, 1, 12, 31) and start.year == end.year:
            return cls.year(start.year)
        return cls(start, end, f"{start.isoformat()}_{end.isoformat()}")

    @property
    def yearly(self) -> bool:
        return self.label.isdigit()


def in_force(scenario: Scenario, period: Period) -> bool:
    """The scenario's authorization term overlaps the period (expired before it or starting after it: not)."""
    return scenario.valid_from <= period.end and scenario.valid_to >= period.start


def _authorization(registry: Registry, sc: Scenario) -> dict[str, Any]:
    datasets = []
    for code, fields in sorted(sc.authorized_fields.items()):
        ds = registry.datasets[code]
        datasets.append({"code": code, "name": ds.name, "agency": ds.agency, "agency_name": registry.agencies[ds.agency].name,
                         "fields": [{"name": f, "cn_name": ds.field(f).cn_name} for f in fields]})
    consumers = [{"code": c.code, "name": c.name} for c in sorted(registry.consumers.values(), key=lambda c: c.code)
                 if sc.code in c.scenarios]
    return {
        "scenario": sc.code, "name": sc.name, "kind": sc.kind, "kind_cn": KIND_CN[sc.kind],
        "operator": sc.operator, "developer": sc.developer, "status": sc.status,
        "valid_from": sc.valid_from.isoformat(), "valid_to": sc.valid_to.isoformat(),
        "purpose": sc.purpose, "product": sc.product, "consent_required": sc.consent_required,
        "consent_cn": CONSENT_CN[sc.consent_required], "k_anonymity": sc.k_anonymity,
        "datasets": datasets, "consumers": consumers,
    }


def _catalogue(engine: sa.Engine, registry: Registry) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"products": [], "services": [], "resources": []}
    for st in registration.catalogue(engine, registry):
        entry: dict[str, Any] = {"subject": st.subject, "code": st.code,
                                 "registered_on": st.registered_on.isoformat() if st.registered_on else None,
                                 "status": st.label, "cancelled": st.cancelled}
        if st.kind == "product":
            try:
                sc = registry.scenario_for_product(st.subject)
                entry.update(scenario=sc.code, name=sc.name, kind=sc.kind, kind_cn=KIND_CN[sc.kind])
            except KeyError:
                entry.update(scenario=None, name=st.subject, kind=None, kind_cn="")
            out["products"].append(entry)
        elif st.kind == "service":
            out["services"].append({**entry, "name": st.subject})
        else:
            ds = registry.datasets.get(st.subject)
            entry.update(name=ds.name if ds else st.subject,
                         agency_name=registry.agencies[ds.agency].name if ds else "")
            out["resources"].append(entry)
    return out


def refusal_category(reason: str) -> tuple[str, str]:
    """(key, label) of a refusal reason."""
    for key, label, tags in REFUSAL_CATEGORIES:
        if any(tag in reason for tag in tags):
            return key, label
    return OTHER_CATEGORY


def consumer_class(registry: Registry, consumer: str, product: str) -> str:
    """public_interest | commercial (the kind of the scenario a registered consumer asked a product of) | unregistered."""
    c = registry.consumers.get(consumer)
    if c is None:
        return "unregistered"
    try:
        return registry.scenario_for_product(product).kind
    except KeyError:  # a product no scenario registers: the kind of the consumer's own scenarios
        kinds = sorted({registry.scenarios[s].kind for s in c.scenarios})
        return "commercial" if "commercial" in kinds else kinds[0] if kinds else "unregistered"


def _audit_rows(engine: sa.Engine, period: Period) -> list[Mapping[str, Any]]:
    t = opdb.audit_deliveries
    # delivered_at is ISO 8601 text in +08:00 (zqdata.audit): text order is time order, days are Shanghai days
    lo, hi = period.start.isoformat(), (period.end + dt.timedelta(days=1)).isoformat()
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(t.name):
            return []
        return conn.execute(sa.select(t.c.consumer, t.c.product, t.c.outcome, t.c.reason, t.c.row_count)
                            .where(t.c.delivered_at >= lo, t.c.delivered_at < hi)).mappings().all()


def _data_use(engine: sa.Engine, registry: Registry, period: Period) -> dict[str, Any]:
    products = sorted({s.product for s in registry.scenarios.values()})
    unregistered_product = "（未登记产品 unregistered product）"
    by_product = {p: {"product": p, "deliveries": 0, "rows": 0, "consumers": set(), "refusals": 0} for p in products}
    by_class = {k: {"class": k, "class_cn": v, "deliveries": 0, "rows": 0, "refusals": 0}
                for k, v in CONSUMER_CLASSES.items()}
    by_reason: dict[str, dict[str, Any]] = {}
    for r in _audit_rows(engine, period):
        product = r["product"] if r["product"] in by_product else None
        p = by_product.setdefault(product or unregistered_product,
                                  {"product": unregistered_product, "deliveries": 0, "rows": 0, "consumers": set(),
                                   "refusals": 0})
        c = by_class[consumer_class(registry, r["consumer"], r["product"])]
        if r["outcome"] == "delivered":
            p["deliveries"] += 1
            p["rows"] += int(r["row_count"])
            p["consumers"].add(r["consumer"])
            c["deliveries"] += 1
            c["rows"] += int(r["row_count"])
        else:
            p["refusals"] += 1
            c["refusals"] += 1
            key, label = refusal_category(r["reason"] or "")
            by_reason.setdefault(key, {"category": key, "category_cn": label, "count": 0})["count"] += 1
    rows = [{**v, "consumers": len(v["consumers"])} for v in by_product.values()]
    return {
        "totals": {"deliveries": sum(v["deliveries"] for v in rows), "rows": sum(v["rows"] for v in rows),
                   "refusals": sum(v["refusals"] for v in rows)},
        "by_product": rows,
        "by_consumer_class": list(by_class.values()),
        "refusals_by_reason": sorted(by_reason.values(), key=lambda v: (-v["count"], v["category"])),
    }


def build_disclosure(engine: sa.Engine, registry: Registry, period: Period,
                     now: dt.datetime | None = None) -> dict[str, Any]:
    """The disclosure report of ``period`` as a JSON-ready dict."""
    at = (now or dt.datetime.now(TZ)).astimezone(TZ)
    authorizations = [_authorization(registry, sc) for sc in sorted(registry.scenarios.values(), key=lambda s: s.code)
                      if in_force(sc, period)]
    return {
        "title": TITLE, "title_en": TITLE_EN,
        "basis": "《肇庆市公共数据资源授权运营管理办法（试行）》第二十一条、第十七条、第二十六条",
        "period": {"label": period.label, "start": period.start.isoformat(), "end": period.end.isoformat(),
                   "yearly": period.yearly},
        "generated_at": at.isoformat(timespec="seconds"),
        "authorizations": authorizations,
        "catalogue": _catalogue(engine, registry),
        "data_use": _data_use(engine, registry, period),
    }


# --------------------------------------------------------------------------- rendering


def render_json(report: Mapping[str, Any]) -> bytes:
    return (json.dumps(report, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _md_cell(value: Any) -> str:
    text = "-" if value in (None, "") else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def _sections(report: Mapping[str, Any]) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    """(heading, intro, headers, rows) of every table: the one layout both renderings follow."""
    auths = report["authorizations"]
    cat = report["catalogue"]
    use = report["data_use"]
    auth_rows = [[a["name"] + f" ({a['scenario']})", a["kind_cn"], a["operator"], a["developer"],
                  f"{a['valid_from']} 至 {a['valid_to']}", "有效 active" if a["status"] == "active" else "已撤销 revoked",
                  "；".join(c["name"] for c in a["consumers"]) or "-"] for a in auths]
    content_rows = [[a["name"], d["name"] + f" ({d['code']})", d["agency_name"],
                     "、".join(f["cn_name"] for f in d["fields"]), a["purpose"], a["consent_cn"],
                     a["k_anonymity"] or "-"] for a in auths for d in a["datasets"]]
    product_rows = [[p["name"], p["subject"], p["kind_cn"], p["code"], p["registered_on"], p["status"]]
                    for p in cat["products"]]
    service_rows = [[s["name"], s["code"], s["registered_on"], s["status"]] for s in cat["services"]]
    resource_rows = [[r["name"] + f" ({r['subject']})", r["agency_name"], r["code"], r["registered_on"], r["status"]]
                     for r in cat["resources"]]
    t = use["totals"]
    return [
        ("一、授权对象、期限与性质 Authorizations in force",
         f"期间内有效的授权共 {len(auths)} 项（一场景一授权；公益/经营性依第二十六条）。",
         ["场景 scenario", "性质 kind", "运营机构 operator", "开发机构 developer", "授权期限 term", "状态 status",
          "产品使用方 consumers"], auth_rows),
        ("二、授权内容与范围 Content and scope", "各场景授权使用的数据集与字段（仅限所列字段，仅用于所列用途）。",
         ["场景 scenario", "数据集 dataset", "数源机构 agency", "授权字段 fields", "用途 purpose",
          "数据主体授权 consent", "k-匿名 k"], content_rows),
        ("三、数据产品目录 Product catalogue", "运营机构提供的数据产品及其登记编码（第十七条）。",
         ["产品 product", "产品标识 identifier", "性质 kind", "登记编码 code", "赋码日期 registered", "登记状态 status"], product_rows),
        ("四、数据服务目录 Service catalogue", "登记的数据服务（无则为空）。",
         ["服务 service", "登记编码 code", "赋码日期 registered", "登记状态 status"], service_rows),
        ("五、数据资源登记 Registered data resources", "公共数据资源（数据集）的登记情况。",
         ["数据资源 resource", "数源机构 agency", "登记编码 code", "赋码日期 registered", "登记状态 status"],
         resource_rows),
        ("六、数据使用情况：按产品 Data use by product",
         f"期间内交付 {t['deliveries']} 次，共 {t['rows']} 行；拒绝 {t['refusals']} 次（来自交付审计日志）。",
         ["产品 product", "交付次数 deliveries", "交付行数 rows", "使用方数 consumers", "拒绝次数 refusals"],
         [[p["product"], p["deliveries"], p["rows"], p["consumers"], p["refusals"]] for p in use["by_product"]]),
        ("七、数据使用情况：按使用方类别 Data use by consumer class", "使用方按其获授权场景的性质分类。",
         ["使用方类别 class", "交付次数 deliveries", "交付行数 rows", "拒绝次数 refusals"],
         [[c["class_cn"], c["deliveries"], c["rows"], c["refusals"]] for c in use["by_consumer_class"]]),
        ("八、拒绝交付原因 Refusals by reason", "仅按类别计数，不披露请求内容。",
         ["原因 reason", "次数 count"], [[r["category_cn"], r["count"]] for r in use["refusals_by_reason"]]),
    ]


def _period_text(report: Mapping[str, Any]) -> str:
    p = report["period"]
    return (f"{p['label']} 年度" if p["yearly"] else "专项") + f"（{p['start']} 至 {p['end']}）"


def render_markdown(report: Mapping[str, Any]) -> bytes:
    """The report as Markdown (UTF-8 bytes)."""
    lines = [f"# {report['title']}", "", f"*{report['title_en']}*", "",
             f"- 披露期间 period: {_period_text(report)}", f"- 依据 basis: {report['basis']}",
             f"- 生成时间 generated: {report['generated_at']}（北京时间 Asia/Shanghai）", ""]
    for heading, intro, headers, rows in _sections(report):
        lines += [f"## {heading}", "", intro, ""]
        lines += _md_table(headers, rows) if rows else ["（无 none）"]
        lines.append("")
    return ("\n".join(lines)).encode("utf-8")


_CSS = """figure.chart{margin:1em 0}figure.chart svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}

body{font-family:"Noto Sans CJK SC","Microsoft YaHei","PingFang SC",sans-serif;margin:2rem auto;max-width:72rem;
color:#1f2328;line-height:1.5;padding:0 1rem}
h1{font-size:1.6rem;border-bottom:2px solid #8c1c13;padding-bottom:.4rem}h2{font-size:1.2rem;margin-top:2rem}
.en{color:#57606a}.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.35rem .5rem;
text-align:left;vertical-align:top}th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfbfb}
td.num{text-align:right;font-variant-numeric:tabular-nums}
""".strip()


def data_use_charts(report: Mapping[str, Any]) -> list:
    """Bars of the period's data use: deliveries and refusals per product and per consumer class (counts only)."""
    from zqdata.governance.reporting import bar_chart

    use = report["data_use"]
    rows = ([{"对象 of": f"产品 {r['product']}", "类别 kind": "交付 deliveries", "次数 count": r["deliveries"]}
             for r in use["by_product"]]
            + [{"对象 of": f"产品 {r['product']}", "类别 kind": "拒绝 refusals", "次数 count": r["refusals"]}
               for r in use["by_product"]]
            + [{"对象 of": r["class_cn"], "类别 kind": "交付 deliveries", "次数 count": r["deliveries"]}
               for r in use["by_consumer_class"]]
            + [{"对象 of": r["class_cn"], "类别 kind": "拒绝 refusals", "次数 count": r["refusals"]}
               for r in use["by_consumer_class"]])
    chart = bar_chart("data-use", "数据使用：按产品与使用者类别的交付与拒绝次数 data use", rows, x="对象 of",
                      y="次数 count", y_title="次数 count", x_title="产品 / 使用者类别", group="类别 kind", y_format="d")
    return [chart] if chart is not None else []


def render_html(report: Mapping[str, Any]) -> bytes:
    """The report as one self-contained HTML page (inline CSS, no script, no external URL), UTF-8 bytes."""
    e = html.escape
    parts = ['<!DOCTYPE html>', '<html lang="zh-CN">', '<head>', '<meta charset="utf-8">',
             f"<title>{e(report['title'])} {e(report['period']['label'])}</title>", f"<style>{_CSS}</style>",
             '</head>', '<body>', f"<h1>{e(report['title'])}</h1>", f"<p class=\"en\">{e(report['title_en'])}</p>",
             f"<p class=\"meta\">披露期间 period: {e(_period_text(report))}<br>依据 basis: {e(report['basis'])}<br>"
             f"生成时间 generated: {e(report['generated_at'])}（北京时间 Asia/Shanghai）</p>"]
    for chart in data_use_charts(report):  # offline SVG (zqdata.governance.reporting), like the other reports
        parts.append(f'<figure class="chart chart-{e(chart.kind)}" id="{e(chart.chart_id)}">{chart.svg}'
                     f"<figcaption>{e(chart.title)}</figcaption></figure>")
    for heading, intro, headers, rows in _sections(report):
        parts += [f"<h2>{e(heading)}</h2>", f"<p>{e(intro)}</p>"]
        if not rows:
            parts.append("<p>（无 none）</p>")
            continue
        parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
        for row in rows:
            cells = "".join(
                f'<td class="num">{v}</td>' if isinstance(v, int) and not isinstance(v, bool)
                else f"<td>{e('-' if v in (None, '') else str(v))}</td>" for v in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts).encode("utf-8")


def render_files(report: Mapping[str, Any]) -> dict[str, bytes]:
    """{file name: bytes} of the three renderings."""
    return dict(zip(FILE_NAMES, (render_html(report), render_markdown(report), render_json(report))))


# --------------------------------------------------------------------------- publishing


def current_key(period_label: str) -> str:
    return reporting.current_key(KIND, period_label)


def content_digest(report: Mapping[str, Any]) -> str:
    """SHA-256 of the report without its generation time: the same data gives the same digest."""
    return hashlib.sha256(render_json({**report, "generated_at": ""})).hexdigest()


def publish_disclosure(store: ObjectStore, report: Mapping[str, Any]) -> PublishedReport:
    """Publish the three files as every governance report is (zqdata.governance.reporting.publish_files): to
    ``reports/disclosure/<period>/<digest[:16]>/``, then ``CURRENT.json`` pointing at them. The folder is named by the
    content (generation time left out) and never rewritten: regenerating a period whose data did not change reuses it."""
    return reporting.publish_files(store, KIND, report["period"]["label"], content_digest(report),
                                   lambda: render_files(report))


def current_disclosure(store: ObjectStore, period_label: str) -> dict[str, bytes] | None:
    """{file name: bytes} of the published report of a period (None when none), each checked against the pointer."""
    return reporting.current_files(store, KIND, period_label)
