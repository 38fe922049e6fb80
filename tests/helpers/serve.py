"""``meter serve`` as a subprocess, for tests that need a real server process.

The launcher itself is ``benchmarks.serve.ServerProcess`` (shared with the
benchmarks, which must not import the tests); this module adapts it to trio
tests and adds the signals the crash tests send.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from benchmarks.serve import ENGINE_COMMAND, ServerProcess, child_env

__all__ = ["ENGINE_COMMAND", "HOST", "ServerProcess", "child_env", "kill", "serve_in",
           "server_process", "terminate"]

HOST = "127.0.0.1"


def serve_in(tmp_path: Path, *flags: str) -> ServerProcess:
    """``meter serve`` (4 shards) with its data in ``tmp_path / "data"`` and its stderr in
    ``tmp_path / "server.log"``, for blocking tests; as a context manager it is killed on
    exit if still running."""
    return ServerProcess(4, tmp_path / "data", flags=flags, log=tmp_path / "server.log")


@asynccontextmanager
async def server_process(data: Path, log: Path, *flags: str, shards: int | None = 4,
                         start_timeout_s: float = 30.0,
                         command: Sequence[str] = ENGINE_COMMAND,
                         ) -> AsyncIterator[ServerProcess]:
    """``meter serve`` on ``data`` and port 0, its stderr appended to ``log``; killed on
    exit if still running. The start waits in a thread, so the trio loop keeps running;
    the wait cannot be cancelled, so a server that starts is always killed again."""
    start = functools.partial(ServerProcess, shards, data, start_timeout_s, flags=flags,
                              log=log, command=command)
    server = await trio.to_thread.run_sync(start)
    with server:
        yield server


async def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL, and wait until the process is gone."""
    process.send_signal(signal.SIGKILL)
    with trio.fail_after(30):
        await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
    assert process.returncode == -signal.SIGKILL


async def terminate(process: subprocess.Popen[str], within_s: float) -> float:
    """SIGTERM; the process must exit 0 within ``within_s``. Returns how long it took."""
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(within_s):
        await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
    assert process.returncode == 0, f"exit code {process.returncode} after SIGTERM"
    return time.perf_counter() - signalled
