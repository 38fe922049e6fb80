"""engine.budget.ByteBudget: a FIFO byte semaphore, tested without a server."""

from __future__ import annotations

import trio

from engine.budget import ByteBudget


async def test_the_request_budget_admits_in_arrival_order() -> None:
    """A large request waiting for the budget is not overtaken by later small ones, so a
    steady stream of small requests cannot starve it."""
    budget = ByteBudget(100)
    held = await budget.acquire(30)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        got = await budget.acquire(size)
        order.append(name)
        budget.release(got)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 90)
        await trio.sleep(0.01)
        nursery.start_soon(take, "small", 10)  # would fit now, but arrived later
        await trio.sleep(0.01)
        assert order == [] and budget.used_bytes == 30  # small waits behind big
        budget.release(held)
    assert sorted(order) == ["big", "small"] and budget.used_bytes == 0  # both granted at once
    # A waiter cancelled while queued leaves the queue, and those behind it get through.
    held = await budget.acquire(100)
    with trio.move_on_after(0.01):
        await budget.acquire(50)
    budget.release(held)
    assert await budget.acquire(60) == 60 and budget.used_bytes == 60


async def test_a_request_larger_than_the_budget_is_capped_and_waits_for_an_empty_budget(
) -> None:
    budget = ByteBudget(100)
    assert await budget.acquire(1000) == 100 and budget.used_bytes == 100
    budget.release(100)
    held = await budget.acquire(1)
    granted: list[int] = []

    async def take() -> None:
        granted.append(await budget.acquire(500))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.sleep(0.01)
        assert granted == []  # 1 + 100 would pass the limit
        budget.release(held)
    assert granted == [100] and budget.used_bytes == 100


async def test_charge_may_pass_the_limit_and_holds_readers_back_until_released() -> None:
    budget = ByteBudget(100)
    budget.charge(250)  # a reply that already exists
    assert budget.used_bytes == 250
    granted: list[int] = []

    async def take() -> None:
        granted.append(await budget.acquire(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.sleep(0.01)
        assert granted == []
        budget.release(100)
        await trio.sleep(0.01)
        assert granted == []  # 150 + 10 still passes the limit
        budget.release(100)  # 50 + 10 fits: granted on this release
    assert granted == [10] and budget.used_bytes == 60


def test_the_server_module_keeps_its_old_name() -> None:
    from engine.server import ByteBudget as FromServer

    assert FromServer is ByteBudget
