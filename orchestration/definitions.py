"""The code location: assembles each stage's definitions and applies cross-cutting policy once."""

import warnings

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    # Imports inside the loader: nothing is built when the module is merely imported.
    from assets.gov_platform import gov_platform_defs
    from assets.governance import governance_defs
    from assets.ops_platform import ops_platform_defs
    from assets.source_systems import source_defs
    from orchestration.catalog import apply_catalog
    from orchestration.history import build_history_sensor
    from orchestration.jobs import nightly_aggregation
    from orchestration.resources import default_resources
    from orchestration.schedules import nightly_schedule
    from orchestration.sensors import sensor_defs
    from zqdata.registry import registry
    from zqdata.settings import restrict_permissions

    restrict_permissions()  # every process that loads the code location (code server, runs) creates private files
    # Check evaluations carry their partition (issue 14): partitioned check specs are a Dagster preview feature this
    # code location opts into deliberately; its warning is not news to the people running the platform.
    warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec",
                            category=dg.PreviewWarning)
    # Every asset of the nightly job has a backfill policy (orchestration/ranges.nightly_backfill_policy: embedded, one
    # run over the range, issue 15; on the lakes, one run per day, issue 16);
    # the `backfill_policy` parameter is a Dagster beta feature this code location uses deliberately.
    warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of .* is currently in beta",
                            category=dg.BetaWarning)

    return apply_catalog(dg.Definitions.merge(
        source_defs(),
        gov_platform_defs(),
        governance_defs(),
        ops_platform_defs(),
        sensor_defs(),
        dg.Definitions(jobs=[nightly_aggregation], schedules=[nightly_schedule], sensors=[build_history_sensor()],
                       resources=default_resources()),
    ), registry())
