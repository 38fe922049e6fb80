"""open_engine's interpreter tuning: the thread switch interval while open."""

from __future__ import annotations

import sys

import pytest

from engine import open_engine
from engine.runtime.gc_tuning import DEFAULT_SWITCH_INTERVAL_S


async def test_the_switch_interval_is_set_while_open_and_restored(tmp_path):
    before = sys.getswitchinterval()
    assert before != DEFAULT_SWITCH_INTERVAL_S
    async with open_engine(tmp_path / "a", shards=1):
        assert sys.getswitchinterval() == pytest.approx(DEFAULT_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == before
    async with open_engine(tmp_path / "b", shards=1, switch_interval_s=None):
        assert sys.getswitchinterval() == before


async def test_a_switch_interval_that_is_not_positive_is_refused(tmp_path):
    with pytest.raises(ValueError, match="switch_interval_s must be positive"):
        async with open_engine(tmp_path, shards=1, switch_interval_s=0):
            pass
