"""The explorer's customer page lists the customer's corrections (``GET /api/corrections``):
who, when, what and which events, newest first, in a browser like tests/test_explorer.py
(skipped without Chromium), compared with the engine's own list."""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from engine import Event
from tests.test_explorer import (  # noqa: F401 (fixtures)
    HOUR,
    NOW,
    LiveServer,
    browser,
    open_page,
    page,
)

SHOT = os.environ.get("METER_EXPLORER_SHOT")  # a path: also save the page as a PNG there


def acme_event(value: int | Decimal, hours_ago: int, unique_id: str,
               region: str = "eu") -> Event:
    return Event(meter_api_name="api_calls", customer_id="acme", meter_value=value,
                 meter_time_in_millis=NOW - hours_ago * HOUR, dimensions={"region": region},
                 unique_id=unique_id)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        engine = server.engine
        assert engine is not None
        server.run(engine.ingest, [
            acme_event(7, 3, "a-1"), acme_event(9, 4, "a-2"), acme_event(11, 5, "a-3", "us"),
            acme_event(5, 6, "a-4"),
            Event(meter_api_name="zeta_unused", customer_id="cust-05", meter_value=1,
                  meter_time_in_millis=NOW - HOUR, unique_id="z-1")])

        async def correct() -> None:
            await engine.cancel("api_calls", "acme", unique_ids=["a-1", "a-2"], by="ops")
            await engine.amend("api_calls", "acme", "a-3",
                               acme_event(Decimal("2.5"), 5, "a-3", "us"), by="billing-fix")
            await engine.cancel_where("api_calls", customer_id="acme",
                                      start_ms=NOW - 7 * HOUR, end_ms=NOW - 5 * HOUR,
                                      dimensions={"region": ["eu"]}, by="ops")
            await engine.cancel_where("zeta_unused", customer_id=None, start_ms=NOW - 2 * HOUR,
                                      end_ms=NOW, by="cleanup")

        server.run(correct)
        yield server


def rows(view: Any) -> list[dict[str, str]]:
    return list(view.evaluate("""() => [...document.querySelectorAll(
        '#customer-corrections tbody tr')].map(tr => ({
            lsn: tr.dataset.lsn, kind: tr.dataset.kind,
            cells: [...tr.querySelectorAll('td')].map(td => td.textContent)}))"""))


def test_the_customer_page_lists_its_corrections(live: LiveServer, page: Any) -> None:  # noqa: F811
    assert live.engine is not None
    open_page(page, live.url("/?view=customer&customer=acme"))
    listed = live.run(live.engine.corrections, None, "acme")
    shown = rows(page)
    # Newest first, every one of acme's (and the correction of every customer is not
    # acme's: it is of another meter, and listed too).
    assert [row["lsn"] for row in shown] == [str(c.lsn) for c in reversed(listed)]
    assert [row["kind"] for row in shown] == ["cancel_where", "cancel_where", "amend", "cancel"]
    by_kind = {(row["kind"], row["cells"][3]): row["cells"] for row in shown}
    # When, who, what, meter, which events.
    cancel = by_kind[("cancel", "api_calls")]
    assert cancel[1:4] == ["ops", "cancelled 2 events", "api_calls"]
    assert cancel[4] == "ids a-1, a-2"
    assert cancel[0] == "Sep 21, 2026, 16:13"  # the engine clock, in the page's zone (Berlin)
    amend = by_kind[("amend", "api_calls")]
    assert amend[1:4] == ["billing-fix", "amended 1 event: now 2.5 at Sep 21, 2026, 11:13",
                          "api_calls"]
    where = by_kind[("cancel_where", "api_calls")]
    assert where[1:4] == ["ops", "cancelled 1 event", "api_calls"]  # a-4: a-3 is in "us"
    assert where[4] == "Sep 21, 2026, 09:13 \u2013 Sep 21, 2026, 11:13 \u00b7 region: eu"
    every = by_kind[("cancel_where", "zeta_unused")]
    assert every[1:4] == ["cleanup", "cancelled 1 event (all customers)", "zeta_unused"]
    # The usage the page shows is after the corrections: acme's events left are the
    # amended 2.5 and the known ones.
    card = page.locator(".meter-card[data-meter='api_calls']")
    total = Decimal(card.get_attribute("data-total"))
    assert total == Decimal("100000000000000000000.1") + Decimal("2.5")
    if SHOT:
        page.locator("#customer-corrections").scroll_into_view_if_needed()
        page.screenshot(path=SHOT, full_page=True)
    # A customer with no correction of its own lists the correction of every customer.
    open_page(page, live.url("/?view=customer&customer=cust-03"))
    shown = rows(page)
    assert [(row["kind"], row["cells"][3]) for row in shown] == [
        ("cancel_where", "zeta_unused")]  # the correction of every customer only
    assert shown[0]["cells"][2] == "cancelled 1 event (all customers)"
