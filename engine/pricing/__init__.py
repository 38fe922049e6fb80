"""Pricing: plans, charge models, rating, invoices and cost limits, on top of metering.

Metering never imports this package (``tests/test_layers.py``). The pure part
(``model``, ``rating``, ``ledger``: no trio, no storage, no clocks) rates
usage it is given; the runtime part (``extension``, ``engine``) plugs into
metering's extension seam and reads usage through the query API and the
per-batch usage feed. docs/pricing.md describes the models and rules.
"""

from engine.pricing.model import (
    Charge,
    Invoice,
    InvoiceLine,
    Plan,
    PlanAssignment,
    Tier,
    TierAmount,
)

__all__ = ["Charge", "Invoice", "InvoiceLine", "Plan", "PlanAssignment", "Tier", "TierAmount"]
