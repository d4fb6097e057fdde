"""数据需求 (Art. 18): an unmet need is routed to the agency holding the data, tracked submitted → coordinating →
agreed / declined → fulfilled with who and when, and closed by the registration change record it led to."""

from __future__ import annotations

import datetime as dt

import pytest

from zqdata.governance import demand as dm
from zqdata.governance import registration as r
from zqdata.settings import TZ

NOW = dt.datetime(2025, 7, 1, 9, 0, tzinfo=TZ)


def _water_change(opdb, reg):
    """The water company added a field: the registration sync files a change record of water_usage."""
    columns = r.product_columns_from_manifest()
    r.sync_registrations(opdb, reg, columns, now=NOW)
    ds = reg.datasets["water_usage"]
    field = ds.fields[-1].model_copy(update={"name": "meter_type", "cn_name": "水表类型"})
    wider = reg.model_copy(update={"datasets": {**reg.datasets, "water_usage": ds.model_copy(
        update={"fields": [*ds.fields, field]})}})
    [change] = r.sync_registrations(opdb, wider, columns, now=NOW).changed
    return change


def test_demand_lifecycle_is_routed_tracked_and_linked_to_the_registration_change(opdb, reg):
    [req] = dm.add_demand(opdb, reg, "sme_credit_profile", ["water_usage"], ["meter_type"],
                          "信贷审批需区分生产用水与生活用水", actor="运营机构张工", now=NOW)
    assert (req.agency, req.state, req.datasets, req.fields) == ("water", "submitted", ["water_usage"],
                                                                 ["water_usage.meter_type"])
    req = dm.advance_demand(opdb, req.demand_id, actor="实施机构", note="已转供水公司", now=NOW + dt.timedelta(days=1))
    assert req.state == "coordinating"
    with pytest.raises(dm.DemandError, match="--to"):
        dm.advance_demand(opdb, req.demand_id)  # two ways out: agreed or declined
    req = dm.advance_demand(opdb, req.demand_id, "agreed", actor="供水公司", now=NOW + dt.timedelta(days=5))
    with pytest.raises(dm.DemandError, match="--registration"):
        dm.advance_demand(opdb, req.demand_id, "fulfilled")
    change = _water_change(opdb, reg)
    req = dm.advance_demand(opdb, req.demand_id, "fulfilled", registration_id=change.registration_id,
                            actor="实施机构", now=NOW + dt.timedelta(days=9))
    assert (req.state, req.registration_id) == ("fulfilled", change.registration_id)
    assert dm.get_demand(opdb, req.demand_id).registration_id == change.registration_id
    history = dm.demand_events(opdb, req.demand_id)
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in history] == [
        (None, "submitted", "运营机构张工"), ("submitted", "coordinating", "实施机构"),
        ("coordinating", "agreed", "供水公司"), ("agreed", "fulfilled", "实施机构")]
    assert [e["event_at"] for e in history] == [NOW + dt.timedelta(days=d) for d in (0, 1, 5, 9)]
    with pytest.raises(dm.DemandError, match="终态「已满足」"):
        dm.advance_demand(opdb, req.demand_id)


def test_fulfilled_needs_a_registration_of_one_of_the_requested_datasets(opdb, reg):
    change = _water_change(opdb, reg)
    [req] = dm.add_demand(opdb, reg, "sme_credit_profile", ["electricity_usage"], [], "需要峰谷电量")
    dm.advance_demand(opdb, req.demand_id)
    dm.advance_demand(opdb, req.demand_id, "agreed")
    with pytest.raises(dm.DemandError, match="registration of another subject"):
        dm.advance_demand(opdb, req.demand_id, "fulfilled", registration_id=change.registration_id)
    with pytest.raises(dm.DemandError, match="unknown registration record"):
        dm.advance_demand(opdb, req.demand_id, "fulfilled", registration_id="RG-000000000000")
    assert dm.get_demand(opdb, req.demand_id).state == "agreed"


@pytest.mark.parametrize("steps,to,kwargs,message", [
    (0, "agreed", {}, r"invalid transition submitted → agreed"),
    (0, "fulfilled", {}, r"invalid transition submitted → fulfilled"),
    (1, "declined", {}, r"declining needs the reason"),
    (1, "agreed", {"registration_id": "RG-x"}, r"a registration is linked on fulfilled"),
])
def test_invalid_demand_transitions_are_refused(opdb, reg, steps, to, kwargs, message):
    [req] = dm.add_demand(opdb, reg, "transit_ridership", ["bus_card_swipes"], ["stop_id"], "需要站点客流")
    for _ in range(steps):
        req = dm.advance_demand(opdb, req.demand_id)
    with pytest.raises(dm.DemandError, match=message):
        dm.advance_demand(opdb, req.demand_id, to, **kwargs)
    assert dm.get_demand(opdb, req.demand_id).state == req.state


def test_declined_is_final_with_the_agencys_reason(opdb, reg):
    [req] = dm.add_demand(opdb, reg, "transit_ridership", ["bus_card_swipes"], [], "需要乘客年龄段")
    dm.advance_demand(opdb, req.demand_id)
    req = dm.advance_demand(opdb, req.demand_id, "declined", actor="交通运输局", note="涉及个人信息，不予提供")
    assert req.state == "declined"
    assert dm.demand_events(opdb, req.demand_id)[-1]["note"] == "涉及个人信息，不予提供"
    with pytest.raises(dm.DemandError, match="终态"):
        dm.advance_demand(opdb, req.demand_id, "agreed")


def test_a_need_across_agencies_gives_one_request_per_agency(opdb, reg):
    made = dm.add_demand(opdb, reg, "sme_credit_profile", ["water_usage", "electricity_usage"],
                         ["water_usage.meter_type", "electricity_usage.peak_kwh"], "区分峰谷与用水类型")
    assert sorted((d.agency, tuple(d.datasets), tuple(d.fields)) for d in made) == [
        ("power", ("electricity_usage",), ("electricity_usage.peak_kwh",)),
        ("water", ("water_usage",), ("water_usage.meter_type",))]
    assert {d.demand_id for d in dm.list_demands(opdb, agency="water")} == {made[1].demand_id}


@pytest.mark.parametrize("datasets,fields,message", [
    (["no_such"], [], "unknown dataset"),
    ([], [], "--dataset is required"),
    (["water_usage", "electricity_usage"], ["kwh"], "write dataset.field"),
    (["water_usage"], ["bus_card_swipes.card_id"], "field of a dataset not requested"),
    (["water_usage"], ["Bad-Name"], "invalid field name"),
])
def test_invalid_requests_are_refused(opdb, reg, datasets, fields, message):
    with pytest.raises(dm.DemandError, match=message):
        dm.add_demand(opdb, reg, "sme_credit_profile", datasets, fields, "理由")
    assert dm.list_demands(opdb) == []


def test_cli_demand_add_list_advance(opdb, capsys):
    from zqdata.cli import main

    assert main(["demand", "add", "--scenario", "transit_ridership", "--dataset", "bus_card_swipes",
                 "--field", "stop_id", "--reason", "需要站点客流", "--actor", "运营机构"]) == 0
    out = capsys.readouterr().out
    assert "肇庆市交通运输局" in out
    demand_id = out.split()[2]  # "已登记 recorded: DR-…"
    assert main(["demand", "advance", demand_id, "--to", "agreed"]) == 2
    assert "invalid transition submitted → agreed" in capsys.readouterr().err
    assert main(["demand", "advance", demand_id, "--actor", "实施机构"]) == 0
    assert main(["demand", "list", "--state", "coordinating"]) == 0
    assert demand_id in capsys.readouterr().out
    assert main(["demand", "show", demand_id]) == 0
    assert "已提交 → 协调中  实施机构" in capsys.readouterr().out
