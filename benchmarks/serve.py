"""Start ``meter serve`` as a subprocess on 127.0.0.1 and an ephemeral port.

The one launcher of a server process, used by the benchmarks and, through
``tests/helpers/serve.py``, by the tests (crash, load, hostile clients, limits
and data-directory tests). It lives here, below both, because the benchmark
scripts must run without the tests tree or pytest, while the tests already
import the benchmarks (their smoke tests). Standard library only; it runs the
engine only as a child process.

``ServerProcess(...)`` returns once the server printed its ``listening on``
line, which the server prints only after recovery; the recovery figures it
printed before are kept. A server that exits, or stays silent past
``start_timeout_s``, is killed and ``ServerDidNotStart`` is raised with the
end of its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from benchmarks.common import REPO_ROOT, BenchmarkFailure

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
RECOVERED = re.compile(r"recovered ([\d,]+) series \(lsn (\d+)\) in (\d+) ms")
ENGINE_COMMAND = (sys.executable, "-m", "engine")


class ServerDidNotStart(BenchmarkFailure):
    """``meter serve`` exited, or printed no ``listening on`` line in time."""


def child_env() -> dict[str, str]:
    """The environment of a child process that imports this checkout's ``engine``; without
    ``METER_API_KEYS``, so that a key in the caller's environment does not turn auth on."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("METER_API_KEYS", None)
    return env


class ServerProcess:
    """``python -m engine serve`` on a data directory and an ephemeral port.

    With ``data_dir=None`` a fresh temporary directory is used and removed by
    ``stop``; with a given ``data_dir`` the directory is the caller's (used to
    restart on the state a killed server left). ``flags`` are more ``meter serve``
    options; ``shards=None`` leaves the server's default. ``command`` replaces
    ``python -m engine`` (a script that patches a default first, say). stderr goes
    to ``log`` (appended) if given, else to a pipe; stdout stays a pipe the caller
    may read after the listening line (``lines`` holds what came before it).

    ``ready_s`` is the time from spawning the process to its "listening" line;
    ``recovery_ms``, ``recovered_series`` and ``recovered_lsn`` are what the
    server reported about its own recovery (``None`` if it printed nothing).
    As a context manager it kills the server on exit if it is still running.
    """

    def __init__(self, shards: int | None = 4, data_dir: str | Path | None = None,
                 start_timeout_s: float = 30.0, *, flags: Sequence[str] = (),
                 log: Path | None = None, command: Sequence[str] = ENGINE_COMMAND) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="meter-bench-tcp-")
            data_dir = self._tmp.name
        self.data_dir = str(data_dir)
        self.log = log
        self.recovery_ms: int | None = None
        self.recovered_series: int | None = None
        self.recovered_lsn: int | None = None
        self.lines: list[str] = []
        arguments = [*command, "serve", "--data-dir", self.data_dir, "--port", "0",
                     "--status", "off"]
        if shards is not None:
            arguments += ["--shards", str(shards)]
        stderr: int | IO[str] = subprocess.PIPE
        if log is not None:
            stderr = log.open("a")
        spawned = time.perf_counter()
        try:
            self.process = subprocess.Popen([*arguments, *flags], stdout=subprocess.PIPE,
                                            stderr=stderr, text=True, env=child_env())
        finally:
            if log is not None:
                stderr.close()  # type: ignore[union-attr]  # the child holds its own copy
        self.pid = self.process.pid
        # readline blocks: a server silent past the deadline is killed, which ends the
        # read with EOF; the server prints its recovery line, then its listening line.
        watchdog = threading.Timer(start_timeout_s, self.process.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            port = self._read_startup()
        finally:
            watchdog.cancel()
        if port is None:
            self.stop(kill=True)
            raise ServerDidNotStart(f"server did not start within {start_timeout_s} s: "
                                    f"{self._log_tail()}")
        self.port = port
        self.ready_s = time.perf_counter() - spawned

    def _read_startup(self) -> int | None:
        assert self.process.stdout is not None
        while line := self.process.stdout.readline():
            self.lines.append(line)
            if recovered := RECOVERED.search(line):
                self.recovered_series = int(recovered.group(1).replace(",", ""))
                self.recovered_lsn = int(recovered.group(2))
                self.recovery_ms = int(recovered.group(3))
            if listening := LISTENING.search(line):
                return int(listening.group(1))
        return None

    def _log_tail(self) -> str:
        if self.log is not None and self.log.exists():
            return self.log.read_text(errors="replace")[-3000:]
        return "".join(self.lines)[-3000:]

    # ---------------------------------------------------------------- stopping

    def kill(self) -> None:
        """SIGKILL: no drain, no snapshot; the data directory stays for a restart."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code (a clean shutdown is 0); raises
        ``subprocess.TimeoutExpired`` if it is still running after ``timeout_s``."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM, a clean close; ``kill=True``: SIGKILL) and remove a temporary dir."""
        if kill:
            self.kill()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def _close(self) -> None:
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._close()

    # ---------------------------------------------------------------- readings

    def rss_kib(self, kind: str = "RssAnon") -> int:
        """Resident memory from /proc/PID/status: ``RssAnon`` (the process's own heap and
        stacks, what a leak grows) by default; ``RssFile`` counts the pages of the LMDB
        map it touched, which the kernel can drop; ``VmRSS`` is their sum."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {kind} in /proc/PID/status")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def errors_logged(self) -> list[str]:
        """Lines of the server's log (``log``) that show a handler failing."""
        assert self.log is not None, "the server's stderr went to a pipe, not a log"
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines()
                if "Traceback" in line or "failed" in line or "Error" in line]

