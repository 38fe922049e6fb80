"""Checks of a data directory before the engine trusts it: format marker and data file.

Storage layer: the standard library, lmdb (its offline verifier, which never maps the
file) and ``engine.errors``. Each check raises ``DataDirError`` saying what is wrong
and what to do; ``LmdbStore`` runs them before LMDB maps ``data.mdb``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lmdb
import lmdb.verify

from engine.errors import DataDirError
from engine.storage.base import (
    DEDUP_FORMAT_VERSION,
    FORMAT_VERSION,
    HEAD_FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
    PREVIOUS_FORMAT_VERSION,
)

log = logging.getLogger("engine.storage.lmdb_store")  # one logger for the store's messages

FORMAT_PREFIX = b"metering-engine/"
# Up to this size ``data.mdb`` is walked page by page at every open (about 1 s per
# 100 MiB here: it would make a restart grow with history). Above it only the meta
# pages and the file's extent are checked: a truncated file is still refused before
# LMDB maps it; damage inside pages is then caught by the values' checksums as they
# are read (and a full walk stays one ``python -m lmdb.verify`` away).
FULL_VERIFY_MAX_BYTES = 128 << 20


def check_format(lmdb_dir: Path, version: bytes | None) -> None:
    if version in (FORMAT_VERSION, HEAD_FORMAT_VERSION, DEDUP_FORMAT_VERSION,
                   PREVIOUS_FORMAT_VERSION, LEGACY_FORMAT_VERSION):
        return
    if version is None or not version.startswith(FORMAT_PREFIX):
        raise DataDirError(
            f"{str(lmdb_dir)!r} is an LMDB environment without a metering-engine format "
            f"marker ({'none' if version is None else repr(version)}): it belongs to another "
            "program, or its creation never finished. Point the engine at its own data "
            "directory."
        )
    supported = int(FORMAT_VERSION[len(FORMAT_PREFIX):])
    try:
        found = int(version[len(FORMAT_PREFIX):])
    except ValueError:
        found = -1
    if found > supported:
        raise DataDirError(
            f"{str(lmdb_dir)!r} was written by a newer metering-engine (data format "
            f"{found}); this version reads formats 1 to {supported} only. Run a newer engine "
            "version on it; this one will not touch it."
        )
    raise DataDirError(
        f"{str(lmdb_dir)!r} has data format {version!r}, which this engine (format "
        f"{supported}) cannot read. Run a matching engine version on it."
    )


def _check_extent(data_file: Path, size_bytes: int) -> list[str]:
    """The meta pages, and that the file holds every page the committed meta claims."""
    with open(data_file, "rb") as f:
        verifier: Any = lmdb.verify._Verifier(  # type: ignore[no-untyped-call]
            f, size_bytes)
        verifier.detect_engine()
        verifier.load_metas()
        problems: list[str] = list(verifier.errors)
        if verifier.next_pgno * verifier.psize > size_bytes:
            problems.append(
                f"the committed meta uses {verifier.next_pgno} pages of {verifier.psize} "
                f"bytes but the file holds only {size_bytes} bytes (truncated)")
    return problems


def check_data_file(data_file: Path, verify: bool) -> None:
    """Refuse a missing, emptied, truncated or structurally corrupt ``data.mdb``
    before LMDB maps it: LMDB would take an empty file for a new store, and reading
    a truncated or corrupt one can crash the process (SIGBUS, SIGSEGV)."""
    restore = "Restore the data directory from a backup; the engine will not start over it."
    try:
        size_bytes = data_file.stat().st_size
    except FileNotFoundError:
        raise DataDirError(
            f"{str(data_file)!r} is missing (deleted or moved?): refusing to start empty "
            f"over an existing store. {restore}"
        ) from None
    except OSError as exc:
        raise DataDirError(f"cannot read {str(data_file)!r}: {exc}") from None
    if size_bytes == 0:
        raise DataDirError(f"{str(data_file)!r} is empty (truncated to 0 bytes). {restore}")
    if not verify:
        return
    started = time.perf_counter()
    try:
        problems: list[str]
        if size_bytes > FULL_VERIFY_MAX_BYTES:
            problems = _check_extent(data_file, size_bytes)
        else:
            problems = lmdb.verify.verify(  # type: ignore[no-untyped-call]
                str(data_file), subdir=False)
    except lmdb.verify.VerifyError as exc:
        raise DataDirError(
            f"{str(data_file)!r} is not a readable LMDB file ({exc}): corrupt, truncated "
            f"or not ours. {restore}"
        ) from None
    except OSError as exc:
        raise DataDirError(f"cannot read {str(data_file)!r}: {exc}") from None
    log.info("checked %s (%d bytes) in %.0f ms", data_file, size_bytes,
             (time.perf_counter() - started) * 1000)
    if problems:
        beyond_end = any("beyond EOF" in p or "truncated" in p for p in problems)
        what = "truncated (pages it needs lie past its end)" if beyond_end else "corrupt"
        raise DataDirError(
            f"{str(data_file)!r} is {what}: {len(problems)} problem(s) in its page "
            f"structure, first: {problems[0]}. {restore}"
        )
