"""Governance reports as documents: charts rendered offline, one self-contained HTML page, a Markdown summary and JSON
for machines, published to the object store of published snapshots under ``reports/<kind>/<period>/``.

Charts are Vega-Lite specifications built with Altair and rendered to SVG in this process by ``vl-convert`` (an
embedded JavaScript engine): the HTML carries the SVG inline and a Content-Security-Policy that forbids every fetch,
so the page shows the same thing offline, in a mail attachment or on an air-gapped desk.

Reproducible: a report's bytes depend only on its data, except the one generation timestamp (``generated_at``). The
published folder is named by the digest of everything else, so regenerating a past period reuses the folder already
there; ``CURRENT.json`` (written last, as zqdata.publish does for product snapshots) points at what is served now.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zqdata.settings import TZ
from zqdata.storage import ObjectStore

ROOT = "reports"
CURRENT_NAME = "CURRENT.json"
FILES = ("report.html", "report.md", "report.json")  # written in this order; the pointer last
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A report period closes at its end plus this much: the nightly run of the period's last day (02:00) has finished by
# then, so a report generated after it (schedules run at 06:30) is final and the same whenever it is regenerated.
SETTLE = dt.timedelta(hours=6)
STATUS_CLASS = {"passed": "ok", "failed": "bad", "gap": "bad", "not_run": "warn", "tests_only": "muted"}


# --------------------------------------------------------------------------------------------- formatting

def rate(value: float | None, digits: int = 2) -> str:
    """0.975 → '97.50%'; None → '—'."""
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def rounded(value: float | None, digits: int = 6) -> float | None:
    """Floats as stored in JSON: rounded, so the bytes do not depend on summation order noise."""
    return None if value is None else round(float(value), digits)


def iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(TZ).isoformat(timespec="seconds")


def as_of_for(cutoff: dt.datetime, now: dt.datetime | None = None) -> tuple[dt.datetime, bool]:
    """(as_of, provisional): the period's cutoff when it has passed, else now (a provisional report)."""
    now = (now or dt.datetime.now(TZ)).astimezone(TZ)
    return (cutoff, False) if now >= cutoff else (now.replace(microsecond=0), True)


# --------------------------------------------------------------------------------------------- document model

@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    row_classes: tuple[str, ...] = ()  # CSS class per row (status colours); empty: none

    @classmethod
    def of(cls, columns: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] = ()) -> "Table":
        return cls(tuple(columns), tuple(tuple(r) for r in rows), tuple(row_classes))


@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: str
    kind: str  # line | bar
    svg: str


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class Report:
    kind: str  # evaluation | quarterly | compliance
    period: str  # 2025 | 2025-Q2 | 2025-07-01
    title: str
    as_of: dt.datetime
    provisional: bool
    summary: list[str]
    sections: list[Section]
    data: dict[str, Any]
    generated_at: dt.datetime

    def _doc(self, with_generated_at: bool) -> dict[str, Any]:
        doc = {"kind": self.kind, "period": self.period, "title": self.title, "as_of": iso(self.as_of),
               "provisional": self.provisional, "summary": self.summary, "data": self.data}
        if with_generated_at:
            doc["generated_at"] = iso(self.generated_at)
        return doc

    def content_digest(self) -> str:
        """SHA-256 of everything but the generation time (the charts are a function of ``data``)."""
        return hashlib.sha256(_json(self._doc(False))).hexdigest()

    def to_json(self) -> bytes:
        return _json(self._doc(True))

    def to_markdown(self) -> str:
        out = [f"# {self.title}", "", f"- 统计期 period: **{self.period}**", f"- 数据截至 as of: {iso(self.as_of)}"]
        if self.provisional:
            out.append("- **暂定 provisional**：统计期尚未结束，期末后重新生成为正式版 (the period has not closed yet)")
        out += ["", "## 摘要 Summary", "", *[f"- {s}" for s in self.summary], ""]
        for sec in self.sections:
            out += [f"## {sec.heading}", ""]
            for p in sec.paragraphs:
                out += [p, ""]
            for c in sec.charts:
                out += [f"*图 Figure: {c.title}（见 HTML 版 see report.html）*", ""]
            for t in sec.tables:
                out += [_md_table(t), ""]
        out.append(f"_生成时间 generated at {iso(self.generated_at)}_")
        return "\n".join(out) + "\n"

    def summary_markdown(self) -> str:
        """The short Markdown summary shown in the Dagster UI."""
        head = f"**{self.title}**（截至 as of {iso(self.as_of)}{'，暂定 provisional' if self.provisional else ''}）"
        return "\n".join([head, "", *[f"- {s}" for s in self.summary]])

    def render_files(self) -> dict[str, bytes]:
        """{file name: bytes} of the three renderings, in the order of ``FILES``."""
        return {"report.html": self.to_html().encode("utf-8"), "report.md": self.to_markdown().encode("utf-8"),
                "report.json": self.to_json()}

    def to_html(self) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="zh-CN"><head><meta charset="utf-8">',
            # nothing is fetched when the page is viewed: no scripts, no external styles, fonts or images
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(self.title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<header><h1>{_e(self.title)}</h1><p class=\"meta\">统计期 period <b>{_e(self.period)}</b> · 数据截至 as of "
            f"{_e(iso(self.as_of))}</p>",
        ]
        if self.provisional:
            parts.append('<p class="provisional">暂定 provisional：统计期尚未结束，期末后重新生成为正式版</p>')
        parts.append("</header><section><h2>摘要 Summary</h2><ul>"
                     + "".join(f"<li>{_e(s)}</li>" for s in self.summary) + "</ul></section>")
        for sec in self.sections:
            parts.append(f"<section><h2>{_e(sec.heading)}</h2>")
            parts += [f"<p>{_e(p)}</p>" for p in sec.paragraphs]
            for c in sec.charts:
                parts.append(f'<figure class="chart chart-{_e(c.kind)}" id="{_e(c.chart_id)}">{c.svg}'
                             f"<figcaption>{_e(c.title)}</figcaption></figure>")
            parts += [_html_table(t) for t in sec.tables]
            parts.append("</section>")
        parts.append(f'<footer>生成时间 generated at {_e(iso(self.generated_at))} · {_e(self.kind)}/{_e(self.period)}'
                     "</footer></body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:'Noto Sans CJK SC','Source Han Sans SC','PingFang SC','Microsoft YaHei',sans-serif;"
    "margin:2em auto;max-width:1200px;color:#222;line-height:1.5;padding:0 1em}"
    "h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}"
    ".meta{color:#555}.provisional{background:#fff3cd;padding:.4em .8em;border-left:4px solid #e0a800}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;"
    "vertical-align:top}th{background:#f3f4f6;text-align:left}td.num{text-align:right;white-space:nowrap}"
    "tr.ok td.status{background:#d1fae5}tr.bad td.status{background:#fecaca}tr.bad{color:#991b1b}"
    "tr.warn td.status{background:#fef3c7}tr.muted td.status{background:#e5e7eb}"
    "figure.chart{margin:1em 0}figure.chart svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}"
    "footer{margin-top:2em;color:#777;font-size:.85em}"
)


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, str) and bool(re.fullmatch(r"[-+]?[\d,]+(\.\d+)?%?", value)))


def _md_table(t: Table) -> str:
    def esc(v: Any) -> str:
        return _cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in t.columns) + " |", "|" + "|".join("---" for _ in t.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in t.rows]
    if not t.rows:
        lines.append("| " + " | ".join(["无记录 none"] + [""] * (len(t.columns) - 1)) + " |")
    return "\n".join(lines)


def _html_table(t: Table) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in t.columns) + "</tr>"
    body = []
    for i, r in enumerate(t.rows):
        cls = t.row_classes[i] if i < len(t.row_classes) else ""
        cells = []
        for col, v in zip(t.columns, r):
            classes = [c for c in ("num" if _is_num(v) else "", "status" if "状态" in col else "") if c]
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_e(_cell(v))}</td>")
        body.append(f"<tr{' class=' + chr(34) + _e(cls) + chr(34) if cls else ''}>" + "".join(cells) + "</tr>")
    if not t.rows:
        body.append(f'<tr><td colspan="{len(t.columns)}">无记录 none</td></tr>')
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _json(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------- charts

def _vl_version() -> str:
    import altair as alt

    return ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


def render_svg(spec: Mapping[str, Any], chart_id: str) -> str:
    """A Vega-Lite spec as inline SVG (rendered here, offline), its ids prefixed with ``chart_id`` so several charts
    can share one page (Vega names its clip paths clip1, clip2 … in every SVG)."""
    import vl_convert

    svg = vl_convert.vegalite_to_svg(dict(spec), vl_version=_vl_version(), allowed_base_urls=[])
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{chart_id}-{m.group(1)}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{chart_id}-{m.group(1)})", svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{chart_id}-{m.group(1)}"', svg)
    return re.sub(r"<svg ", f'<svg data-chart="{chart_id}" role="img" ', svg, count=1)


def _base(title: str, rows: Sequence[Mapping[str, Any]]):
    import altair as alt
    import pandas as pd

    return alt.Chart(pd.DataFrame(list(rows)), title=title).properties(width=560, height=260)


def _axis(y_format: str):
    import altair as alt

    # counts: whole-number ticks only (a scale up to 1 would otherwise tick at 0.5 and print "1" twice)
    return alt.Axis(format=y_format, tickMinStep=1) if y_format == "d" else alt.Axis(format=y_format)


def line_chart(chart_id: str, title: str, rows: Sequence[Mapping[str, Any]], x: str, y: str, series: str,
               y_title: str, x_title: str, y_format: str = ".0%") -> Chart | None:
    """Trend lines: one line per ``series`` over ordinal ``x`` (None when there is nothing to draw)."""
    import altair as alt

    rows = [r for r in rows if r.get(y) is not None]
    if not rows:
        return None
    chart = _base(title, rows).mark_line(point=True).encode(
        x=alt.X(f"{x}:O", title=x_title, sort="ascending"),
        y=alt.Y(f"{y}:Q", title=y_title, axis=_axis(y_format)),
        color=alt.Color(f"{series}:N", title=None),
    )
    return Chart(chart_id, title, "line", render_svg(chart.to_dict(), chart_id))


def bar_chart(chart_id: str, title: str, rows: Sequence[Mapping[str, Any]], x: str, y: str, y_title: str,
              x_title: str, group: str | None = None, y_format: str = ".0%",
              sort: Sequence[str] | None = None) -> Chart | None:
    """Bars of ``y`` per ``x`` (grouped side by side by ``group`` when given); None when there is nothing to draw."""
    import altair as alt

    rows = [r for r in rows if r.get(y) is not None]
    if not rows:
        return None
    enc: dict[str, Any] = {
        "x": alt.X(f"{x}:N", title=x_title, sort=list(sort) if sort else None, axis=alt.Axis(labelAngle=0)),
        "y": alt.Y(f"{y}:Q", title=y_title, axis=_axis(y_format)),
    }
    if group:
        enc["xOffset"] = alt.XOffset(f"{group}:N")
        enc["color"] = alt.Color(f"{group}:N", title=None)
    chart = _base(title, rows).mark_bar().encode(**enc)
    return Chart(chart_id, title, "bar", render_svg(chart.to_dict(), chart_id))


# --------------------------------------------------------------------------------------------- publishing

@dataclass(frozen=True)
class PublishedReport:
    prefix: str  # reports/<kind>/<period>/<digest[:16]>
    digest: str
    reused: bool  # the same content was published before: its folder (and its generation time) kept
    files: dict[str, str]  # name -> sha256

    @property
    def keys(self) -> dict[str, str]:
        """name -> object key in the store."""
        return {name: f"{self.prefix}/{name}" for name in self.files}


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"非法的报告{what} invalid report {what}: {value!r}")
    return value


def report_prefix(kind: str, period: str) -> str:
    return f"{ROOT}/{check_name(kind, 'kind')}/{check_name(period, 'period')}"


def current_key(kind: str, period: str) -> str:
    """The key of the pointer at the report served now for ``kind``/``period``."""
    return f"{report_prefix(kind, period)}/{CURRENT_NAME}"


def publish_files(store: ObjectStore, kind: str, period: str, digest: str,
                  render: Callable[[], Mapping[str, bytes]]) -> PublishedReport:
    """Write the files ``render()`` gives ({name: bytes} of every name in ``FILES``) into
    ``reports/<kind>/<period>/<digest[:16]>/`` and then point ``CURRENT.json`` at them: readers see the previous report
    or the new one, never a mix. ``digest``: SHA-256 of the content without its generation time. A folder is never
    rewritten: the same content published again keeps the first copy (and is not rendered again). Every governance
    report is published by it: the ``Report`` documents here, and the disclosure report (zqdata.governance.disclosure,
    renderings of its own)."""
    base = report_prefix(kind, period)
    prefix = f"{base}/{digest[:16]}"
    reused = all(store.exists(f"{prefix}/{name}") for name in FILES)
    if reused:
        files = {name: hashlib.sha256(store.get_bytes(f"{prefix}/{name}")).hexdigest() for name in FILES}
    else:
        payload = render()
        files = {}
        for name in FILES:  # JSON last: a folder with its JSON is complete
            store.put_bytes(f"{prefix}/{name}", payload[name])
            files[name] = hashlib.sha256(payload[name]).hexdigest()
    pointer = _json({"snapshot": prefix, "digest": digest, "files": files})
    key = current_key(kind, period)
    if not (store.exists(key) and store.get_bytes(key) == pointer):
        store.put_bytes(key, pointer)  # last: readers switch to a complete report
    return PublishedReport(prefix, digest, reused, files)


def publish_report(store: ObjectStore, report: Report) -> PublishedReport:
    """Publish the report's HTML, Markdown and JSON (``publish_files``)."""
    return publish_files(store, report.kind, report.period, report.content_digest(), report.render_files)


def current_files(store: ObjectStore, kind: str, period: str,
                  names: Sequence[str] = FILES) -> dict[str, bytes] | None:
    """{name: bytes} of the files of the report served now for ``kind``/``period``, each checked against the
    pointer's SHA-256; None when nothing is published."""
    try:
        pointer = json.loads(store.get_bytes(current_key(kind, period)).decode("utf-8"))
    except FileNotFoundError:
        return None
    # "report": a disclosure pointer written before the disclosure report was published by this code
    folder = pointer["snapshot"] if "snapshot" in pointer else pointer["report"]
    out = {}
    for name in names:
        data = store.get_bytes(f"{folder}/{name}")
        if hashlib.sha256(data).hexdigest() != pointer["files"][name]:
            raise ValueError(f"报告文件校验和不符 report file altered: {folder}/{name}")
        out[name] = data
    return out


def current_report(store: ObjectStore, kind: str, period: str, name: str = "report.json") -> bytes | None:
    """The bytes of one file of the report served now for ``kind``/``period`` (checked against the pointer's
    SHA-256); None when nothing is published."""
    files = current_files(store, kind, period, (name,))
    return None if files is None else files[name]
