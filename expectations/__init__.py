"""Great Expectations 1.x suites as code: one registry-driven builder for every dataset's staging model."""

from expectations.suites import LINEAGE_COLUMNS, Baseline, build_suite, suite_name

__all__ = ["LINEAGE_COLUMNS", "Baseline", "build_suite", "suite_name"]
