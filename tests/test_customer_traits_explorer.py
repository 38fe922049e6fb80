"""The explorer's customer page shows the customer's name and traits from the registry
(in a browser, like tests/test_explorer.py; skipped without Chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine import Customer
from tests.test_explorer import LiveServer, browser, open_page, page  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        assert server.engine is not None
        server.run(server.engine.add_customer, Customer(
            id="acme", name="Acme Inc", traits={"tier": "gold", "plan": "pro"}))
        yield server


def test_the_customer_page_shows_name_and_traits(live: LiveServer, page: Any) -> None:  # noqa: F811
    open_page(page, live.url("/?view=customer&customer=acme"))
    traits = page.locator("#customer-traits .trait")
    assert [(traits.nth(i).get_attribute("data-trait"), traits.nth(i).get_attribute("data-value"))
            for i in range(traits.count())] == [("plan", "pro"), ("tier", "gold")]
    assert page.inner_text("#customer-traits .customer-name") == "Acme Inc"
    # A customer known only by its usage has no record: no traits, and the page still renders.
    open_page(page, live.url("/?view=customer&customer=cust-03"))
    assert page.locator("#customer-traits .trait").count() == 0
    assert "No traits." in page.inner_text("#customer-traits")
    assert page.locator(".meter-card").count() >= 1
    assert not page.errors
