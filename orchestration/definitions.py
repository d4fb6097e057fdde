"""The code location: assembles each stage's definitions and applies cross-cutting policy once."""

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    # Imports inside the loader: nothing is built when the module is merely imported.
    from assets.gov_platform import gov_platform_defs
    from assets.governance import governance_defs
    from assets.ops_platform import ops_platform_defs
    from assets.source_systems import source_defs
    from orchestration.history import build_history_sensor
    from orchestration.jobs import nightly_aggregation
    from orchestration.resources import default_resources
    from orchestration.schedules import nightly_schedule
    from orchestration.sensors import sensor_defs
    from zqdata.settings import restrict_permissions

    restrict_permissions()  # every process that loads the code location (code server, runs) creates private files

    return dg.Definitions.merge(
        source_defs(),
        gov_platform_defs(),
        governance_defs(),
        ops_platform_defs(),
        sensor_defs(),
        dg.Definitions(jobs=[nightly_aggregation], schedules=[nightly_schedule], sensors=[build_history_sensor()],
                       resources=default_resources()),
    )
