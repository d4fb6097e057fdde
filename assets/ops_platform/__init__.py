"""市公共数据资源运营服务平台 (public data operations service platform): the boundary crossing and scenario products."""

import dagster as dg


def ops_platform_defs() -> dg.Definitions:
    from assets.ops_platform.boundary import boundary_defs, product_gate_defs
    from assets.ops_platform.products import ops_dbt_defs
    from assets.ops_platform.publish import publish_defs

    return dg.Definitions.merge(boundary_defs(), ops_dbt_defs(), product_gate_defs(), publish_defs())
