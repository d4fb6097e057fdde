"""Masking by classification wherever a record value is shown (issue 11, finding 4).

A field marked personal in the registry is masked whatever its value looks like — a malformed phone (11637533767), a
10-digit number, a raw birth date, a name — in check metadata (trace markdown and trace_json), traces (text, markdown,
JSON), alert mails and webhooks, `zq trace` / `zq issues` output and log lines; a non-personal field's value (a route
id, an amount) is still shown so the message stays useful. Reuses the hand-built gov DB of test_lineage.py.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import logging
import mailbox

import duckdb
import pytest
import sqlalchemy as sa
from test_lineage import DAY, build_gov_db, lid

from zqdata import alerting, display, issues, lineage
from zqdata import opdb as opdb_module
from zqdata.desensitize import mask_expression
from zqdata.registry import load_registry
from zqdata.settings import TZ

T0 = dt.datetime(2025, 5, 2, 3, 0, tzinfo=TZ)
RP = f"psb/resident_population/{DAY}/part-0001.jsonl"
BUS = f"transport/bus_card_swipes/{DAY}/part-0001.parquet"

MALFORMED_PHONE = "11637533767"  # 11 digits but second digit 1: no mobile pattern matches it
TEN_DIGITS = "1163753376"
BIRTH = "1990-03-15"
BIRTH_COMPACT = "19900315"
NAME = "欧阳修文"
ROW3_NAME = "王五"  # the ODS name of resident row 3 (test_lineage.RESIDENTS)
PERSONAL = (MALFORMED_PHONE, TEN_DIGITS, BIRTH, BIRTH_COMPACT, NAME, ROW3_NAME)
ROUTE, AMOUNT = "R999", "9999.50"  # bus_card_swipes.route_id / fare_yuan: not personal, shown as is


def rp_finding(rule: str, row: int, field: str, detail: str) -> tuple:
    return ("psb", "resident_population", "dbt", rule, "accuracy", "error", RP, row,
            lid("resident_population", "part-0001.jsonl", row), field, detail)


FINDINGS = [
    rp_finding("accuracy.mobile", 1, "phone", f"手机号码格式错误：phone = {MALFORMED_PHONE}"),  # dbt shape
    rp_finding("accuracy.mobile", 2, "phone", f"手机号码格式错误：phone = {TEN_DIGITS}"),
    rp_finding("consistency.birth_date", 3, "birth_date", f"出生日期与公民身份号码不一致：birth_date = {BIRTH}"),
    rp_finding("standardization.birth_date", 1, "birth_date",
               f"字段「出生日期」(birth_date) 的值无法解析为日期：'{BIRTH_COMPACT}'"),  # pandera shape
    rp_finding("accuracy.name", 2, "name", f"姓名含非法字符：name = {NAME}"),
    rp_finding("accuracy.name_match", 3, "name", f"姓名 {ROW3_NAME} 与户籍登记不符"),  # free text: row's raw value
    ("transport", "bus_card_swipes", "dbt", "validity.route_id", "validity", "warn", BUS, 1,
     lid("bus_card_swipes", "part-0001.parquet", 1), "route_id", f"代码值不在登记的代码表内：route_id = {ROUTE}"),
    ("transport", "bus_card_swipes", "dbt", "validity.fare_yuan", "validity", "warn", BUS, 2,
     lid("bus_card_swipes", "part-0001.parquet", 2), "fare_yuan", f"数值超出登记的取值范围：fare_yuan = {AMOUNT}"),
]


def assert_no_personal(text: str, extra: tuple[str, ...] = ()) -> None:
    for raw in (*PERSONAL, *extra):
        assert raw not in text, f"personal value {raw!r} shown"


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture
def gov_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    path = tmp_path / "gov.duckdb"
    build_gov_db(path, findings=FINDINGS).close()
    monkeypatch.setenv("ZQ_GOV_DB", str(path))
    monkeypatch.setenv("ZQ_OPS_DB", str(tmp_path / "no-ops.duckdb"))
    return path


@pytest.fixture
def gov(gov_path):
    con = duckdb.connect(str(gov_path))
    yield con
    con.close()


@pytest.fixture
def op_db(tmp_path, monkeypatch):
    """The operational DB on SQLite (the register and outbox), ``ZQ_OPDB_URL`` pointing at it for the CLI."""
    url = f"sqlite:///{tmp_path / 'opdb' / 'operational.sqlite'}"
    monkeypatch.setenv(opdb_module.URL_ENV, url)
    return opdb_module.get_engine(url)


# --------------------------------------------------------------------------- the one masking function


@pytest.mark.parametrize(
    ("dataset", "field", "value", "shown"),
    [
        ("resident_population", "phone", MALFORMED_PHONE, "116****3767"),  # mask keep_first 3 / keep_last 4
        ("resident_population", "phone", TEN_DIGITS, "116***3376"),
        ("resident_population", "phone", "garbage", "*******"),  # not longer than what is kept: masked whole
        ("resident_population", "birth_date", BIRTH, "30-39"),  # age band at the partition date
        ("resident_population", "birth_date", BIRTH_COMPACT, display.MASKED),  # not a date: no band, masked
        ("resident_population", "birth_date", "1990/13/45", display.MASKED),
        ("resident_population", "birth_date", "2031-01-01", display.MASKED),  # after the partition date
        ("resident_population", "name", NAME, display.HIDDEN["suppress"]),
        ("resident_population", "citizen_id", "11010519491231002", display.HIDDEN["pseudonymize"]),
        ("resident_population", "case_flag", "X", display.HIDDEN["suppress"]),  # confidential
        ("resident_population", "gender", "1", "*"),  # keep, but personal: masked for display
        ("enterprise_registry", "legal_rep_name", "赵六", "赵*"),
        ("bus_card_swipes", "route_id", ROUTE, ROUTE),  # not personal: shown as is
        ("bus_card_swipes", "fare_yuan", AMOUNT, AMOUNT),
    ],
)
def test_mask_value_goes_by_classification_not_by_shape(registry, dataset, field, value, shown):
    assert display.mask_value(registry.datasets[dataset], field, value, dt.date.fromisoformat(DAY)) == shown


def test_mask_value_agrees_with_the_boundary_sql_on_well_formed_values(registry):
    """Display masking (Python) shows what the boundary (zqdata.desensitize SQL) would release, on real values."""
    samples = {"string": "ABCDEFGHIJ12", "date": "1987-11-30", "timestamp": "2025-05-01 08:00:00",
               "integer": "42", "decimal": "12.50"}
    con = duckdb.connect()
    day = dt.date.fromisoformat(DAY)
    for ds in registry.datasets.values():
        for f in ds.fields:
            if f.mask.method not in ("mask", "age_band", "keep") or display.is_personal(f) and f.mask.method == "keep":
                continue
            value = samples[f.type]
            (sql,) = con.execute(f"select {mask_expression(ds, f, day, '$v')}", {"v": value}).fetchone()
            assert display.mask_value(ds, f, value, day) == str(sql), f"{ds.code}.{f.name}"


def test_finding_detail_masks_the_value_by_the_findings_field(registry):
    d = {"partition_date": DAY, "dataset": "resident_population", "row_number": 1, "lineage_id": "x", "field": "phone",
         "detail": f"手机号码格式错误：phone = {MALFORMED_PHONE}"}
    assert display.finding(registry, d)["detail"] == "手机号码格式错误：phone = 116****3767"
    d.update(field="birth_date", detail=f"字段「出生日期」(birth_date) 的值无法解析为日期：'{BIRTH}'")
    assert display.finding(registry, d)["detail"].endswith("：'30-39'")
    d.update(field="phone", detail=f"手机号码有误 {TEN_DIGITS} 请核实")  # free text on a personal field, no row at hand
    assert TEN_DIGITS not in display.finding(registry, d)["detail"]
    # masking is idempotent (stored register rows are masked again before they are shown)
    once = display.finding(registry, {**d, "detail": f"手机号码格式错误：phone = {MALFORMED_PHONE}"})
    assert display.finding(registry, once) == once


# --------------------------------------------------------------------------- traces and check metadata


def test_trace_text_markdown_and_json_never_show_personal_values(gov, registry):
    found = lineage.fetch_dicts(gov, "select * from quality.findings order by dataset, rule, row_number")
    t = lineage.trace(gov, None, registry, "gov/quality/findings", finding=found, manifest={})
    assert_no_personal(t.to_text() + t.to_markdown() + t.to_json())
    details = {(f["field"], f["row_number"]): f["detail"] for f in t.findings}
    assert details[("phone", 1)] == "手机号码格式错误：phone = 116****3767"
    assert details[("phone", 2)] == "手机号码格式错误：phone = 116***3376"
    assert details[("birth_date", 3)].endswith("birth_date = 30-39")
    assert details[("name", 3)] == f"姓名 {display.HIDDEN['suppress']} 与户籍登记不符"  # the row's own name, found
    assert details[("route_id", 1)].endswith(f"route_id = {ROUTE}")  # not personal: still useful
    assert details[("fare_yuan", 2)].endswith(f"fare_yuan = {AMOUNT}")
    assert ROUTE in t.to_text() and AMOUNT in t.to_markdown()


def test_check_metadata_trace_markdown_and_trace_json_never_show_personal_values(gov, registry):
    from orchestration.sensors import trace_metadata

    meta = trace_metadata(gov, None, registry, partition_date=DAY, dataset="resident_population")
    assert {"逐级溯源 trace", "trace_json"} <= set(meta)
    assert_no_personal(json.dumps({k: v.value for k, v in meta.items()}, ensure_ascii=False, default=str))
    assert "116****3767" in meta["逐级溯源 trace"].value
    bus = trace_metadata(gov, None, registry, partition_date=DAY, dataset="bus_card_swipes")
    assert ROUTE in bus["逐级溯源 trace"].value and AMOUNT in json.dumps(bus["trace_json"].value, ensure_ascii=False)


def test_quarantine_reason_and_row_values_are_masked_by_field(gov, registry):
    raw = {"citizen_id": "", "name": NAME, "gender": "1", "birth_date": "1990/03/15", "phone": MALFORMED_PHONE,
           "address": "端州区某路9号", "district_code": "441202", "case_flag": "", "updated_at": f"{DAY} 08:00:00"}
    qid = lid("resident_population", "part-0001.jsonl", 4)
    gov.execute(
        "insert into quarantine.rows values (?, 'psb', 'resident_population', ?, 4, 'b1', now(), ?, ?, ?, "
        "'contract.type.date', 'standardization', 'birth_date')",
        [qid, RP, DAY, json.dumps(raw, ensure_ascii=False),
         "字段「出生日期」(birth_date) 的值无法解析为日期：'1990/03/15'；必填字段「公民身份号码」(citizen_id) 为空；"
         f"联系电话 {MALFORMED_PHONE} 无法核实"])
    t = lineage.trace(gov, None, registry, "gov/ods/ods_resident_population", lineage_ids=[qid], manifest={})
    assert_no_personal(t.to_text() + t.to_json(), extra=("1990/03/15", "端州区某路9号"))
    (row,) = t.rows
    assert row.values["phone"] == "116****3767" and row.values["birth_date"] == "30-39"  # a date DuckDB reads
    assert row.values["gender"] == "*" and row.values["district_code"] == "441202"
    assert "(birth_date) 的值无法解析为日期：'30-39'" in row.quarantine_reason
    assert "(citizen_id) 为空" in row.quarantine_reason


def test_quality_gate_failures_mask_dataset_level_details(gov, registry):
    from zqdata.quality.scores import evaluate_gate

    gov.execute("insert into quality.findings values (?, 'psb', 'resident_population', 'dbt', 'accuracy.mobile_share', "
                "'accuracy', 'error', ?, null, null, 'phone', ?)", [DAY, RP, f"手机号码格式错误：phone = {MALFORMED_PHONE}"])
    gate = evaluate_gate(gov, registry, dt.date.fromisoformat(DAY))
    assert not gate.passed
    assert_no_personal(gate.description() + "\n".join(gate.failures))
    assert any("phone = 116****3767" in f for f in gate.failures)


# --------------------------------------------------------------------------- alerts: mail, webhook, logs


@pytest.fixture
def alert_env(tmp_path, monkeypatch, http_server):
    url, hooks = http_server
    monkeypatch.delenv("ZQ_SMTP_HOST", raising=False)  # e-mail goes to the local Maildir outbox
    monkeypatch.setenv("ZQ_ALERT_MAILDIR", str(tmp_path / "maildir"))
    monkeypatch.setenv("ZQ_ALERT_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("ZQ_ALERT_TIMEOUT_SECONDS", "5")
    for code in ("PSB", "TRANSPORT"):
        monkeypatch.setenv(f"ZQ_WEBHOOK_{code}", f"{url}/hook/{code.lower()}")
    for other in ("SAMR", "POWER", "WATER", "HRSS", "DATA_BUREAU"):
        monkeypatch.delenv(f"ZQ_WEBHOOK_{other}", raising=False)
    return tmp_path / "maildir", hooks


def _mails(maildir) -> list[email.message.EmailMessage]:
    box = mailbox.Maildir(maildir, create=False)
    return [email.message_from_bytes(box.get_bytes(k), policy=email.policy.default) for k in box.keys()]


def test_alert_mail_and_webhook_never_carry_personal_values(gov, op_db, registry, alert_env, caplog):
    maildir, hooks = alert_env
    caplog.set_level(logging.DEBUG)
    issues.sync_issues(gov, op_db, registry, DAY, now=T0)
    rep = alerting.notify_issues(op_db, registry, now=T0)
    assert rep.failed == [] and rep.sent
    mails = _mails(maildir)
    psb = [m.get_content() for m in mails if m["X-ZQ-Agency"] == "psb"]
    assert psb and all("问题示例（个人信息已遮蔽）" in body for body in psb)
    for body in psb:
        assert_no_personal(body)
    assert any("phone = 116****3767" in body for body in psb)
    psb_hooks = [p for path, p in hooks if path == "/hook/psb"]
    assert psb_hooks
    for p in psb_hooks:
        assert_no_personal(json.dumps(p, ensure_ascii=False))
    transport = "\n".join(m.get_content() for m in mails if m["X-ZQ-Agency"] == "transport")
    assert ROUTE in transport and AMOUNT in transport  # not personal: the agency sees what to fix
    transport_hooks = json.dumps([p for path, p in hooks if path == "/hook/transport"], ensure_ascii=False)
    assert ROUTE in transport_hooks and AMOUNT in transport_hooks
    assert_no_personal(caplog.text)  # log lines
    with op_db.connect() as conn:  # the outbox rows (body, payload) too
        stored = conn.execute(sa.select(opdb_module.notifications.c.body, opdb_module.notifications.c.payload)).all()
    assert_no_personal(json.dumps([tuple(r) for r in stored], ensure_ascii=False))


def test_register_rows_filed_before_the_fix_are_masked_when_sent_and_shown(gov, op_db, registry, capsys):
    """A register row holding raw values (filed by the old pattern scrub) is masked again when a message is built."""
    issues.sync_issues(gov, op_db, registry, DAY, now=T0)
    issue = next(i for i in issues.list_issues(op_db) if i.rule == "accuracy.mobile")
    raw_samples = [{"row_number": 1, "field": "phone", "dataset": "resident_population", "partition_date": DAY,
                    "lineage_id": "x", "detail": f"手机号码格式错误：phone = {MALFORMED_PHONE}"}]
    trace = dict(issue.trace)
    trace["findings"] = [{**f, "detail": f"手机号码格式错误：phone = {MALFORMED_PHONE}"} for f in trace["findings"]]
    with op_db.begin() as conn:
        conn.execute(sa.update(opdb_module.quality_issues).where(opdb_module.quality_issues.c.fingerprint == issue.fingerprint)
                     .values(sample_rows=json.dumps(raw_samples, ensure_ascii=False), trace=json.dumps(trace, ensure_ascii=False)))
    legacy = issues.get_issue(op_db, issue.issue_id)
    assert MALFORMED_PHONE in json.dumps(legacy.sample_rows)  # the stored row really holds the raw value
    subject, body, payload = alerting.build_message(registry, legacy, "opened")
    assert_no_personal(subject + body + json.dumps(payload, ensure_ascii=False))
    assert "phone = 116****3767" in body

    from zqdata import cli

    for argv in (["issues", "show", issue.issue_id], ["issues", "show", issue.issue_id, "--json"],
                 ["issues", "list", "--json"]):
        assert cli.main(argv) == 0
        assert_no_personal(capsys.readouterr().out)


# --------------------------------------------------------------------------- CLI


def test_cli_trace_and_issues_output_never_show_personal_values(gov_path, op_db, registry, capsys):
    from zqdata import cli

    with duckdb.connect(str(gov_path)) as con:
        issues.sync_issues(con, op_db, registry, DAY, now=T0)
    outputs = {}
    for argv in (
        ["trace", "gov/quality/findings", "--partition", DAY, "--dataset", "resident_population"],
        ["trace", "gov/quality/findings", "--partition", DAY, "--dataset", "resident_population", "--json"],
        ["trace", "gov/quality/findings", "--partition", DAY, "--dataset", "bus_card_swipes"],
        ["issues", "list", "--json"],
        *[["issues", "show", i.issue_id] for i in issues.list_issues(op_db)],
    ):
        assert cli.main(argv) == 0, argv
        outputs[" ".join(argv)] = out = capsys.readouterr().out
        assert_no_personal(out)
    assert "116****3767" in outputs[f"trace gov/quality/findings --partition {DAY} --dataset resident_population"]
    bus = outputs[f"trace gov/quality/findings --partition {DAY} --dataset bus_card_swipes"]
    assert ROUTE in bus and AMOUNT in bus


def test_gx_results_and_data_docs_carry_no_record_values(tmp_path):
    """GX validations keep counts and percentages only: an unexpected value of a code-table field never reaches the
    validation result or the rendered Data Docs."""
    import great_expectations as gx
    import great_expectations.expectations as ex
    import pandas as pd

    from zqdata.quality.gx_runner import GX_RESULT_FORMAT

    ctx = gx.get_context(mode="ephemeral")
    batch = (ctx.data_sources.add_pandas("t").add_dataframe_asset("a").add_batch_definition_whole_dataframe("b")
             .get_batch(batch_parameters={"dataframe": pd.DataFrame({"gender": ["1", "2", "13912345678"]})}))
    suite = gx.ExpectationSuite(name="s", expectations=[ex.ExpectColumnValuesToBeInSet(column="gender", value_set=["1", "2"])])
    result = batch.validate(suite, result_format=GX_RESULT_FORMAT)
    assert not result.success and result.results[0].result["unexpected_count"] == 1
    assert "13912345678" not in str(result.to_json_dict())


def test_a_delivered_value_in_the_placeholders_brackets_is_masked_like_any_other():
    """〔…〕 is text an agency can deliver: only the display's own placeholders are shown as they are (found in review:
    `〔13812345678〕` on a personal phone field was shown whole)."""
    reg = load_registry()
    shown = []
    for ds in reg.datasets.values():
        for f in ds.fields:
            if display.is_personal(f) and f.mask.method in ("mask", "keep", "age_band"):
                raw = "〔1990-05-17〕" if f.mask.method == "age_band" else "〔13812345678〕"
                out = display.mask_value(ds, f, raw), display.mask_row(ds, {f.name: raw}, DAY)[f.name]
                shown.append((f"{ds.code}.{f.name}", out))
    assert shown
    leaked = [(name, out) for name, out in shown if any("13812345678" in o or "1990-05-17" in o for o in out)]
    assert leaked == []
    phone = reg.datasets["resident_population"].field("phone")
    for placeholder in (display.MASKED, *display.HIDDEN.values()):
        assert display.mask_value(reg.datasets["resident_population"], phone, placeholder) == placeholder
