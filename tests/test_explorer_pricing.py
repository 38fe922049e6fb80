"""The explorer's customer page shows cost to date and the invoice preview, equal to
``eng.invoice`` (Playwright and Debian's Chromium, as tests/test_explorer.py runs them)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from engine import Charge, Plan, Tier
from tests.test_explorer import NOW, LiveServer, browser, open_page, page  # noqa: F401

PLAN = Plan(id="pro", currency="EUR", fixed_fee="19.99", charges=[
    Charge(meter_api_name="api_calls", model="graduated", tiers=[
        Tier(up_to=100, unit_price="0"), Tier(unit_price="0.000001")], id="calls"),
    Charge(meter_api_name="api_calls", unit_price="0.5", dimensions={"region": ["us"]},
           id="calls-us"),
    Charge(meter_api_name="storage_gb", model="volume", tiers=[
        Tier(up_to=10, unit_price="2"), Tier(unit_price="1.5", flat_fee="3")])])


@pytest.fixture(scope="module")
def priced() -> Iterator[LiveServer]:
    with LiveServer() as server:
        assert server.engine is not None
        server.run(server.engine.define_plan, PLAN)
        for customer in ("acme", "cust-00"):
            server.run(lambda c=customer: server.engine.assign_plan(  # type: ignore[union-attr]
                c, "pro", effective_from_ms=NOW))
        yield server


@pytest.mark.parametrize("customer", ["acme", "cust-00"])
def test_the_customer_page_previews_the_invoice(priced: LiveServer, page: Any,  # noqa: F811
                                                customer: str) -> None:
    open_page(page, priced.url(f"/?view=customer&customer={customer}"))
    page.wait_for_selector("#customer-invoice[data-state='ready']")
    assert priced.engine is not None
    expected = priced.run(priced.engine.invoice, customer, NOW)
    box = page.locator("#customer-invoice")
    assert Decimal(box.get_attribute("data-total")) == expected.total
    assert box.get_attribute("data-total") == str(expected.total)  # exact, as the engine's
    shown = [(row.get_attribute("data-kind"), row.get_attribute("data-charge"),
              row.get_attribute("data-quantity"), row.get_attribute("data-amount"))
             for row in box.locator("tr.invoice-line").all()]
    assert shown == [(line.kind, line.charge_id or "", str(line.quantity), str(line.amount))
                     for line in expected.lines]
    assert f"{expected.total} EUR" in box.inner_text()
    assert not page.errors


def test_a_customer_without_a_plan_says_so(priced: LiveServer, page: Any) -> None:  # noqa: F811
    open_page(page, priced.url("/?view=customer&customer=cust-07"))
    page.wait_for_selector("#customer-invoice[data-state='none']")
    assert "No plan bills cust-07" in page.inner_text("#customer-invoice")
