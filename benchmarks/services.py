"""Install, start and stop the peer servers of ``benchmarks/peers.py`` (Redis, PostgreSQL).

Benchmark support code, standard library only. Both servers run as private
processes on 127.0.0.1, on free non-default ports, with their data in a fresh
temporary directory that is removed when they stop:

- ``RedisServer``: ``redis-server`` with an append-only file,
  ``appendfsync everysec``, RDB snapshots off.
- ``PostgresServer``: ``initdb`` into a temporary directory (locale C, trust
  auth for loopback), ``pg_ctl start`` on a loopback port, ``fsync=on`` and
  ``synchronous_commit=on`` (the defaults, set explicitly). When running as
  root the cluster belongs to, and runs as, the ``postgres`` user.

``ensure_installed`` runs ``apt-get install -y`` for a missing server (as root
only; ``apt-get update`` once and retry if the first attempt fails). A server
that cannot be installed or started raises ``ServiceUnavailable`` with the
reason, which the benchmark reports as SKIPPED.

Use the servers as context managers (``with RedisServer() as redis: ...``) so
that they stop on errors and Ctrl-C as well; ``atexit`` is a second line of
defence for anything still running at interpreter exit.

    python benchmarks/services.py     # start both, print how to connect, stop
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APT_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0

_running: list[Any] = []  # started servers not yet stopped, for the atexit hook


class ServiceUnavailable(RuntimeError):
    """A peer server could not be installed or started; the message says why."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's choice, not a default port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ installing


def _apt(*arguments: str) -> tuple[bool, str]:
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=120", *arguments]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=APT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{' '.join(command)}: {exc}"
    output = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, "\n".join(output[-5:])


def ensure_installed(binary_found: bool, packages: list[str], *, install: bool = True) -> None:
    """Install ``packages`` with apt-get unless ``binary_found``; raise ``ServiceUnavailable``."""
    if binary_found:
        return
    if not install:
        raise ServiceUnavailable(f"{' '.join(packages)} not installed (installing disabled)")
    if shutil.which("apt-get") is None:
        raise ServiceUnavailable(f"{' '.join(packages)} not installed and apt-get not found")
    if os.geteuid() != 0:
        raise ServiceUnavailable(f"{' '.join(packages)} not installed; installing needs root")
    ok, output = _apt("install", "-y", "-q", "--no-install-recommends", *packages)
    if not ok:
        _apt("update", "-q")
        ok, output = _apt("install", "-y", "-q", "--no-install-recommends", *packages)
    if not ok:
        raise ServiceUnavailable(f"apt-get install {' '.join(packages)} failed: {output}")


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, else PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                        else 0)
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    return None


# ----------------------------------------------------------------------- Redis


class RedisServer:
    """A private ``redis-server``: AOF on, ``appendfsync everysec``, no RDB snapshots."""

    def __init__(self, *, port: int = 0, install: bool = True) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._install = install
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.config = {"appendonly": "yes", "appendfsync": "everysec", "save": "(none)"}
        self.version = "unknown"

    def start(self) -> RedisServer:
        ensure_installed(redis_binary() is not None, ["redis-server"], install=self._install)
        binary = redis_binary()
        if binary is None:
            raise ServiceUnavailable("redis-server not found after installing")
        self._tmp = tempfile.TemporaryDirectory(prefix="meter-bench-redis-")
        log = Path(self._tmp.name) / "redis.log"
        _running.append(self)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
             "--dir", self._tmp.name, "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--daemonize", "no", "--logfile", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us; we stop it in order
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServiceUnavailable(f"redis-server exited at start: {_tail(log)}")
            reply = self._command(b"PING\r\n")
            if reply.startswith(b"+PONG"):
                info = self._command(b"INFO server\r\n").decode(errors="replace")
                for line in info.splitlines():
                    if line.startswith("redis_version:"):
                        self.version = line.split(":", 1)[1].strip()
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"redis-server did not answer PING: {_tail(log)}")

    def _command(self, raw: bytes) -> bytes:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(raw)
                return sock.recv(65536)
        except OSError:
            return b""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self in _running:
            _running.remove(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ PostgreSQL


class PostgresServer:
    """A private PostgreSQL cluster in a temporary directory on a loopback port."""

    def __init__(self, *, port: int = 0, install: bool = True) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.dbname = "postgres"
        self._install = install
        self._root: Path | None = None
        self._bindir: Path | None = None
        self._started = False
        self.settings = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}

    @property
    def conninfo(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def _run(self, command: list[str], what: str) -> None:
        try:
            done = subprocess.run(self._as_owner(command), capture_output=True, text=True,
                                  timeout=START_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceUnavailable(f"{what}: {exc}") from exc
        if done.returncode != 0:
            log = _tail(self._root / "postgres.log") if self._root else ""
            raise ServiceUnavailable(
                f"{what} failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}"
                f"\n{log}")

    def start(self) -> PostgresServer:
        ensure_installed(postgres_bindir() is not None, ["postgresql"], install=self._install)
        self._bindir = postgres_bindir()
        if self._bindir is None:
            raise ServiceUnavailable("initdb/pg_ctl not found after installing postgresql")
        self._root = Path(tempfile.mkdtemp(prefix="meter-bench-pg-"))
        _running.append(self)
        try:
            if os.geteuid() == 0:
                shutil.chown(self._root, user="postgres", group="postgres")
            data = self._root / "data"
            self._run([str(self._bindir / "initdb"), "-D", str(data), "-U", self.user,
                       "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-sync"], "initdb")
            options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                       f"-c unix_socket_directories={self._root} "
                       + " ".join(f"-c {k}={v}" for k, v in self.settings.items()))
            self._started = True
            self._run([str(self._bindir / "pg_ctl"), "-D", str(data), "-l",
                       str(self._root / "postgres.log"), "-o", options, "-w", "-t",
                       str(int(START_TIMEOUT_S)), "start"], "pg_ctl start")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def version(self) -> str:
        if self._bindir is None:
            return "unknown"
        try:
            done = subprocess.run([str(self._bindir / "postgres"), "--version"],
                                  capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        return done.stdout.strip()

    def stop(self) -> None:
        if self._started and self._bindir is not None and self._root is not None:
            self._started = False
            command = self._as_owner([str(self._bindir / "pg_ctl"), "-D",
                                      str(self._root / "data"), "-m", "fast", "-w", "-t",
                                      str(int(STOP_TIMEOUT_S)), "stop"])
            try:
                subprocess.run(command, capture_output=True, timeout=STOP_TIMEOUT_S + 10,
                               check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        if self in _running:
            _running.remove(self)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(reversed(_running)):
        server.stop()


def main() -> int:
    with RedisServer() as redis, PostgresServer() as postgres:
        print(f"redis {redis.version} on 127.0.0.1:{redis.port} ({redis.config})")
        print(f"{postgres.version}: {postgres.conninfo} ({postgres.settings})")
    print("both stopped")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
