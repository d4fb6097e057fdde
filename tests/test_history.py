"""History dependencies are explicit (issue 17, finding 3): a day materialized again marks every later day that reads
it stale, until that later day is recomputed; unrelated assets and earlier days are never marked."""

from __future__ import annotations

import dagster as dg
import pytest

from orchestration.history import HistoryRead, history_reads, stale_partitions, stale_run_requests
from zqdata import asset_keys

CONSENT = dg.AssetKey(asset_keys.ods("subject_consent"))
RELEASED = dg.AssetKey(asset_keys.desensitized("enterprise_registry"))
OTHER = dg.AssetKey(asset_keys.ods("water_usage"))
READS = [HistoryRead(RELEASED, CONSENT, "consent as of the day")]
DAYS = ["2025-06-01", "2025-06-02", "2025-06-03", "2025-06-04"]


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def materialize(instance, key, day):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=day))


def night(instance, day):
    materialize(instance, CONSENT, day)
    materialize(instance, OTHER, day)
    materialize(instance, RELEASED, day)


def test_nights_in_order_leave_nothing_stale(instance):
    for d in DAYS:
        night(instance, d)
    assert stale_partitions(instance, READS) == []


def test_an_earlier_day_changed_marks_every_later_reader_stale_until_recomputed(instance):
    for d in DAYS:
        night(instance, d)
    materialize(instance, CONSENT, DAYS[1])  # day 2 redelivered and rerun
    stale = stale_partitions(instance, READS)
    assert [s.partition for s in stale] == DAYS[2:]  # days 3 and 4 read day 2's consent; days 1 and 2 do not
    assert all(s.changed_partition == DAYS[1] and s.changed_source == CONSENT for s in stale)
    night(instance, DAYS[2])  # day 3 recomputed
    assert [s.partition for s in stale_partitions(instance, READS)] == [DAYS[3]]
    night(instance, DAYS[3])
    assert stale_partitions(instance, READS) == []


def test_a_change_to_what_no_later_day_reads_marks_nothing(instance):
    for d in DAYS:
        night(instance, d)
    materialize(instance, OTHER, DAYS[0])
    materialize(instance, CONSENT, DAYS[3])  # the last day: nothing after it
    assert stale_partitions(instance, READS) == []


def test_run_requests_name_the_change_so_a_tick_never_asks_twice(instance, monkeypatch):
    import orchestration.history as history

    monkeypatch.setattr(history, "history_reads", lambda: READS)
    for d in DAYS:
        night(instance, d)
    materialize(instance, CONSENT, DAYS[0])
    first = stale_run_requests(instance, "nightly_aggregation")
    assert [r.partition_key for r in first] == DAYS[1:]
    assert len({r.run_key for r in first}) == 3 and stale_run_requests(instance, "nightly_aggregation") == first
    materialize(instance, CONSENT, DAYS[0])  # changed again: new run keys
    assert {r.run_key for r in stale_run_requests(instance, "nightly_aggregation")}.isdisjoint({r.run_key for r in first})


def test_the_pipeline_declares_its_cross_day_reads(reg):
    reads = {(r.reader.to_user_string(), r.source.to_user_string()) for r in history_reads()}
    assert ("ops/desensitized/desensitized_enterprise_registry", "gov/ods/ods_subject_consent") in reads
    assert ("ops/products/ops_sme_credit_profile", "ops/desensitized/desensitized_social_insurance") in reads
    assert all((f"gov/ods/ods_{code}", f"gov/ods/ods_{code}") in reads for code in reg.datasets)
