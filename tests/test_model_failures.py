"""A failing gov dbt model is confined to its own dataset (issue 12): which failures can be confined, what is kept of
the error message, and what the gov DB records (the e2e night is in tests/test_nightly_e2e.py)."""

from __future__ import annotations

import datetime as dt

import duckdb

from zqdata.quality.model_failures import (UnbuiltModel, isolable, model_failure_reasons, record_model_failures,
                                           scrub_message, unbuilt_models)
from zqdata.quality.scores import evaluate_gate, ensure_quality_tables
from zqdata.registry import registry

DAY = dt.date(2025, 6, 1)

RUN_RESULTS = {"results": [
    {"unique_id": "model.zhaoqing.stg_water__water_usage", "status": "error",
     "message": "Runtime Error in model stg_water__water_usage\n  Conversion Error: Could not convert string '4412021990' to INT32"},
    {"unique_id": "model.zhaoqing.int_water_usage", "status": "skipped", "message": None},
    {"unique_id": "model.zhaoqing.stg_power__electricity_usage", "status": "success", "message": "OK"},
    {"unique_id": "test.zhaoqing.not_null_x", "status": "skipped", "message": None},
]}
MANIFEST = {"nodes": {
    "model.zhaoqing.stg_water__water_usage": {"schema": "staging", "name": "stg_water__water_usage"},
    "model.zhaoqing.int_water_usage": {"schema": "intermediate", "name": "int_water_usage"},
}}


def test_unbuilt_models_are_the_errored_and_skipped_models_only():
    unbuilt = unbuilt_models(RUN_RESULTS, MANIFEST)
    assert [(u.model, u.relation, u.status) for u in unbuilt] == [
        ("stg_water__water_usage", "staging.stg_water__water_usage", "error"),
        ("int_water_usage", "intermediate.int_water_usage", "skipped")]


def test_the_error_message_keeps_its_first_line_without_delivered_values():
    msg = scrub_message(RUN_RESULTS["results"][0]["message"])
    assert msg == "Runtime Error in model stg_water__water_usage"
    assert "4412021990" not in scrub_message("Conversion Error: Could not convert string '4412021990' to INT32")


def test_only_failures_of_registered_datasets_with_something_built_are_confined():
    unbuilt = unbuilt_models(RUN_RESULTS, MANIFEST)
    assert isolable(unbuilt, registry(), models_selected=14) == {
        "stg_water__water_usage": "water_usage", "int_water_usage": "water_usage"}
    assert isolable(unbuilt, registry(), models_selected=2) is None  # nothing built: the step fails
    shared = [UnbuiltModel("model.zhaoqing.int_shared", "int_shared", "intermediate.int_shared", "error", "x")]
    assert isolable(shared, registry(), models_selected=14) is None  # not one dataset's model: the step fails
    assert isolable([], registry(), models_selected=14) is None


def test_recorded_failures_empty_the_partition_and_hold_back_only_that_dataset():
    con = duckdb.connect()
    ensure_quality_tables(con)
    con.execute("create schema staging")
    con.execute("create table staging.stg_water__water_usage as select * from (values "
                "(date '2025-06-01', 'a'), (date '2025-06-01', 'b'), (date '2025-05-31', 'c')) t(_partition_date, v)")
    unbuilt = unbuilt_models(RUN_RESULTS, MANIFEST)
    removed = record_model_failures(con, DAY, unbuilt, isolable(unbuilt, registry(), 14), "run-1")
    assert removed == {"staging.stg_water__water_usage": 2}  # the other day is untouched; int does not exist
    assert con.execute("select count(*) from staging.stg_water__water_usage").fetchone()[0] == 1
    reasons = model_failure_reasons(con, DAY)
    assert set(reasons) == {"water_usage"} and "stg_water__water_usage" in reasons["water_usage"]
    gate = evaluate_gate(con, registry(), DAY)
    assert set(gate.held_back) == {"water_usage"} and "模型未构建" in gate.held_back["water_usage"]
    # a later build of the partition that succeeds decides afresh
    record_model_failures(con, DAY, [], {}, "run-2")
    assert model_failure_reasons(con, DAY) == {}
    assert evaluate_gate(con, registry(), DAY).held_back == {}
