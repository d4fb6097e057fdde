"""Governance stage (Art. 20): quality findings, scores, the publication gate, GX checks and Data Docs."""

import dagster as dg


def governance_defs() -> dg.Definitions:
    """Definitions of the governance stage (built on call, nothing at import)."""
    from assets.governance.issues import issues_defs
    from assets.governance.quality import quality_defs
    from assets.governance.registration import registration_defs
    from assets.governance.reports import reports_defs

    return dg.Definitions.merge(quality_defs(), issues_defs(), registration_defs(), reports_defs())
