"""The explorer's screenshots for the docs: ``make screenshots`` (``python -m
tests.explorer_screenshots DIR``).

A live server (``tests.test_explorer.LiveServer``) with a few weeks of varied, seeded
traffic, and Chromium at a fixed clock and zone, so the same commit gives the same
pictures. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import random
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from engine import Event, Limit
from tests.test_explorer import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DAY,
    NOW,
    ZONE,
    LiveServer,
)

# (file, page, a selector to wait for: the dimension keys arrive beside the view)
VIEWS = [
    ("usage.png", "/", "input[data-group-key='region']"),
    ("usage-by-region.png", "/?range=30d&group=region&chart=lines&f=plan%3Apro",
     "input[data-group-key='plan']"),
    ("customer.png", "/?view=customer&customer=acme&range=30d", ".limit"),
    ("refused.png", "/?range=30d&window=minute", "input[data-group-key='region']"),
]


def varied_events() -> list[Event]:
    """Five weeks of traffic with a weekly rhythm, a growing customer and a few big ones."""
    rng = random.Random(13)
    customers = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
                 "tyrell", "cyberdyne", "soylent", "aperture",
                 *[f"shop-{i:03d}" for i in range(60)]]
    events = []
    for index, customer in enumerate(customers):
        weight = 600 / (index + 1.5) ** 1.1
        for day in range(33):
            at_day = NOW - day * DAY
            weekday = datetime.fromtimestamp(at_day / 1000, UTC).weekday()
            rhythm = 0.55 if weekday >= 5 else 1.0
            growth = 1.0 + (0.9 if customer == "initech" else 0.1) * (33 - day) / 33
            for _ in range(3):
                value = max(1, int(rng.gauss(weight * rhythm * growth / 3, weight / 12)))
                events.append(Event(
                    meter_api_name="api_calls", customer_id=customer, meter_value=value,
                    meter_time_in_millis=at_day - rng.randrange(0, DAY),
                    dimensions={"region": rng.choice(["eu-west", "us-east", "us-west", "ap-south"]),
                                "plan": "pro" if index % 3 else "free"}))
            if index < 15:
                events.append(Event(
                    meter_api_name="storage_gb", customer_id=customer,
                    meter_value=Decimal(int(weight * 40 * growth)) / 10,
                    meter_time_in_millis=at_day - rng.randrange(0, DAY)))
    return [e for e in events if e.meter_time_in_millis < NOW]


LIMITS = [
    Limit(id="acme-daily-calls", meter_api_name="api_calls", customer_id="acme",
          thresholds=[250, 400, 600], period="day", timezone=ZONE),
    Limit(id="acme-monthly-calls", meter_api_name="api_calls", customer_id="acme",
          thresholds=[8000, 12000], period="month", timezone=ZONE),
    Limit(id="storage-cap", meter_api_name="storage_gb", thresholds=[2000, 3000],
          period="month", timezone=ZONE),
]


def main(directory: str) -> None:
    from playwright.sync_api import sync_playwright

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with LiveServer(varied_events, LIMITS) as live, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US",
                                      timezone_id=ZONE, device_scale_factor=1)
        context.clock.set_fixed_time(datetime.fromtimestamp(NOW / 1000, UTC))
        page = context.new_page()
        for name, path, selector in VIEWS:
            page.goto(live.url(path))
            page.wait_for_function("() => +(document.documentElement.dataset.renders || 0) > 0"
                                   " && document.documentElement.dataset.busy === '0'")
            page.wait_for_selector(selector, state="attached")
            page.wait_for_selector("#live[data-accepted]")
            page.screenshot(path=str(out / name))
            print(out / name)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/explorer")
