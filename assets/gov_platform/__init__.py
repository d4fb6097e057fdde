"""市政务大数据平台 (city government big-data platform): ODS ingestion and the dbt staging/intermediate models."""

import dagster as dg


def gov_platform_defs() -> dg.Definitions:
    from assets.gov_platform.dbt_models import gov_dbt_defs
    from assets.gov_platform.ods import ods_defs

    return dg.Definitions.merge(ods_defs(), gov_dbt_defs())
