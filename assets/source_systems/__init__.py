"""数源单位 (source agencies): the landing zone, where each agency delivers its datasets every day."""

import dagster as dg


def source_defs() -> dg.Definitions:
    from assets.source_systems.landing import landing_defs

    return landing_defs()
