"""engine.errors: the tree drawn in the docstring is the class tree, every wire
code has one class, and ``map_exceptions`` translates only what it is told to."""

from __future__ import annotations

import itertools
import re

import msgspec
import pytest
import trio

import engine
from engine import errors
from engine.errors import (
    ERRORS_BY_CODE,
    BadMessage,
    BatchRejected,
    ConnectionLost,
    DataDirError,
    EventProblem,
    MeteringError,
    ProtocolError,
    map_exceptions,
)


def drawing() -> list[str]:
    """The lines of the tree drawn in the module docstring."""
    assert errors.__doc__ is not None
    lines = errors.__doc__.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("    MeteringError")))
    return lines[first:lines.index("", first)]


def tree_in_docstring() -> dict[str, str]:
    """Class name -> parent name, read from the drawing."""
    parents: dict[str, str] = {}
    stack: list[str] = []
    for line in drawing():
        match = re.match(r"^    ((?:│   |    )*)(?:[├└]── )?([A-Z]\w+)", line)
        assert match, line
        depth = len(match.group(1)) // 4 + (1 if "──" in line else 0)
        del stack[depth:]
        if stack:
            parents[match.group(2)] = stack[-1]
        stack.append(match.group(2))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    drawn = tree_in_docstring()
    classes = {cls.__name__: cls for cls in ERRORS_BY_CODE.values()}
    assert set(drawn) | {"MeteringError"} == set(classes)
    for name, parent in drawn.items():
        assert classes[name].__bases__ == (classes[parent],), name
    # No two siblings end their branch: one └── per level of each subtree.
    lines = drawing()
    for before, after in itertools.pairwise(lines):
        glyph = re.search(r"[├└]──", before)
        if glyph and before.index(glyph.group()) == (after.find("──") - 1 if "──" in after
                                                     else -1):
            assert glyph.group() == "├──", f"{before!r} ends a branch that goes on"


def test_every_class_has_its_own_code_and_is_exported() -> None:
    assert len({cls.code for cls in ERRORS_BY_CODE.values()}) == len(ERRORS_BY_CODE)
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code == code
        assert getattr(engine, cls.__name__) is cls, f"{cls.__name__} is not in engine"
        assert cls.__name__ in engine.__all__
    assert {"frame_error", "bad_message", "timeout", "too_large", "insecure_bind"} <= set(
        ERRORS_BY_CODE)


def test_the_server_module_keeps_its_old_names() -> None:
    from engine.server import InsecureBind

    assert InsecureBind is errors.InsecureBind and InsecureBind.code == "insecure_bind"


def test_a_code_can_be_carried_by_an_instance() -> None:
    error = ProtocolError("shiny: new", code="shiny")
    assert (error.code, error.detail, ProtocolError.code) == ("shiny", "shiny: new",
                                                              "protocol_error")
    rejected = BatchRejected([EventProblem(3, "bad")])
    assert rejected.code == "batch_rejected" and "event 3: bad" in rejected.detail


def test_map_exceptions_translates_with_a_detail_and_keeps_the_cause() -> None:
    with pytest.raises(DataDirError, match=r"^snapshot unreadable \(boom\); damaged$") as caught:
        with map_exceptions({msgspec.DecodeError: DataDirError},
                            "snapshot unreadable ({error}); damaged"):
            raise msgspec.DecodeError("boom")
    assert isinstance(caught.value.__cause__, msgspec.DecodeError)


def test_map_exceptions_takes_factories_and_the_first_match_wins() -> None:
    def rejected(exc: Exception) -> MeteringError:
        return BatchRejected([EventProblem(0, str(exc))])

    mapping = {KeyError: rejected, LookupError: BadMessage}
    with pytest.raises(BatchRejected, match="event 0: 'k'"):
        with map_exceptions(mapping):
            raise KeyError("k")
    with pytest.raises(BadMessage, match=r"^list index$"):
        with map_exceptions(mapping):
            raise IndexError("list index")


def test_map_exceptions_leaves_other_errors_ours_and_cancellation_alone() -> None:
    with pytest.raises(ValueError, match="not mapped"):
        with map_exceptions({KeyError: BadMessage}):
            raise ValueError("not mapped")
    original = ConnectionLost("already ours")
    with pytest.raises(ConnectionLost) as caught:
        with map_exceptions({Exception: BadMessage}):
            raise original
    assert caught.value is original
    with pytest.raises(KeyboardInterrupt):
        with map_exceptions({Exception: BadMessage}):
            raise KeyboardInterrupt


async def test_map_exceptions_around_await_never_swallows_cancelled() -> None:
    with trio.CancelScope() as scope:
        with map_exceptions({Exception: ConnectionLost}):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    with pytest.raises(ConnectionLost, match="sending failed: gone"):
        with map_exceptions({trio.BrokenResourceError: ConnectionLost},
                            "sending failed: {error}"):
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("gone")
