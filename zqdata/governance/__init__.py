"""Governance loop (治理闭环): registration of resources, products and services (Art. 17), data demand requests
(Art. 18), the disclosure report (Art. 21), and the operator's evaluations and reports. Plain, tested functions over the
registry and the operational DB; the Dagster wiring lives in ``assets/governance``."""
