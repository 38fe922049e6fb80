"""The import rules of the layers, executable: each part of ``engine/`` imports only what
its allow-list names, and ``engine/domain/`` has no import cycle.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: the rules
are about what a module depends on, not when. An allow-list entry is ``STDLIB`` (the
names in ``sys.stdlib_module_names``), a third-party distribution's top-level package,
or an engine module, which allows it and everything under it (``engine.domain`` allows
``engine.domain.shard``). ``from package import name`` counts as importing the module
``package.name`` when that module exists. A new import that breaks a rule is a design
decision: change the list here, with the reason beside it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"
STDLIB = "<stdlib>"

# engine/errors.py and engine/schema.py are imported by every layer, so they may import
# only what all of their importers may.
PURE = frozenset({STDLIB, "msgspec"})
DOMAIN = PURE | {"engine.schema", "engine.errors", "engine.domain"}
# messages.py widens integers beyond int64 with domain.records.wide_ints_as_decimals;
# domain.values (wide_as_decimal, fits_int64) is the leaf meant for that.
# engine.pricing.model: pricing's public structs (plans, invoices), pure like schema.py.
PROTOCOL = PURE | {"engine.schema", "engine.errors", "engine.protocol",
                   "engine.domain.values", "engine.domain.records", "engine.pricing.model"}
# Storage stores bytes; the record shapes and value bounds are the most it may know.
# engine.faults: the crash tests' kill points (standard library only).
STORAGE = PURE | {"lmdb", "engine.errors", "engine.storage", "engine.faults",
                  "engine.domain.records", "engine.domain.values"}
# The runtime may use every inner layer and engine.auth, never the shells around it
# (server, client, cli, the public engine package); and LMDB only through engine.storage.
# numpy and xxhash: the dedup index's Bloom filters (engine/runtime/idindex.py).
RUNTIME = PURE | {"trio", "numpy", "xxhash", "engine.schema", "engine.errors", "engine.domain",
                  "engine.auth", "engine.protocol", "engine.storage", "engine.runtime",
                  "engine.faults"}

HTTP = PURE | {"trio", "hypercorn", "h11", "prometheus_client", "=engine", "engine.schema",
               "engine.errors", "engine.auth", "engine.access", "engine.server",
               "engine.budget", "engine.http"}

# Pricing's pure part rates what it is given: no trio, storage or runtime; of metering's
# domain only the calendar windows and exact values (the billing month is a query window).
PRICING_PURE = PURE | {"engine.schema", "engine.errors", "engine.domain.windows",
                       "engine.domain.values", "engine.pricing.model", "engine.pricing.rating",
                       "engine.pricing.ledger"}
# Its runtime part plugs into metering's extension seam: the runtime's layer plus pricing.
PRICING_RUNTIME = RUNTIME | {"engine.pricing"}

# numpy and xxhash: unique_count limits keep distinct values as sorted 64-bit hashes
# (engine/domain/distinct.py), 8 bytes a value instead of a Python set's ~80.
DISTINCT = DOMAIN | {"numpy", "xxhash"}

RULES: dict[str, frozenset[str]] = {
    "domain/distinct.py": DISTINCT,
    "pricing/model.py": PRICING_PURE,
    "pricing/rating.py": PRICING_PURE,
    "pricing/ledger.py": PRICING_PURE,
    "pricing/": PRICING_RUNTIME,
    "domain/": DOMAIN,
    "protocol/": PROTOCOL,
    "storage/": STORAGE,
    "runtime/": RUNTIME,
    "schema.py": PURE,
    "errors.py": PURE,
    "auth.py": frozenset({STDLIB, "engine.errors"}),
    "faults.py": frozenset({STDLIB}),
    # What a customer-bound key may see: pure rules over the public structs.
    "access.py": PURE | {"engine.schema", "engine.errors"},
    # The HTTP shell: the engine's public API (the ``engine`` package itself, not what
    # is under it), the access rules and the TCP server's policies, never the runtime,
    # storage, domain or protocol internals.
    "http/": HTTP,
}

# Of the runtime, only the modules that write or read the store may import it: the
# write-ahead-log writer, recovery, the engine that opens the store, and the alert log.
# Shard actors and ack ordering must never wait on storage. Checked for the modules
# that exist, so the rule holds before and after runtime/engine.py is split.
# blocks.py: the block cache reads sealed blocks in short synchronous read transactions.
# idindex.py: the dedup index, called by the writer and recovery, reads its runs the same way.
STORAGE_USERS = frozenset({"writer.py", "recovery.py", "engine.py", "alerts.py", "blocks.py",
                           "idindex.py"})
NEVER_STORAGE = frozenset({"shards.py", "acks.py"})

# Everything engine/ may import from outside the standard library: its dependencies.
THIRD_PARTY = frozenset({"trio", "numpy", "xxhash", "msgspec", "lmdb", "sortedcontainers",
                         "hypercorn", "prometheus_client", "h11"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_engine_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ENGINE.parent / relative).with_suffix(".py").is_file() or (
        ENGINE.parent / relative / "__init__.py"
    ).is_file()


def imports_of(source: str, importer: str, is_package: bool = False) -> set[str]:
    """The modules ``source`` imports, as absolute dotted names."""
    names: set[str] = set()
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                names.add(child if is_engine_module(child) else base)
    return names


def allowed(name: str, allow: Iterable[str]) -> bool:
    top = name.split(".")[0]
    for entry in allow:
        if entry == STDLIB:
            if top in sys.stdlib_module_names:
                return True
        elif entry.startswith("="):  # that module alone, not what is under it
            if name == entry[1:]:
                return True
        elif name == entry or name.startswith(entry + "."):
            return True
    return False


def rule_for(path: Path) -> frozenset[str] | None:
    relative = path.relative_to(ENGINE).as_posix()
    for prefix, allow in RULES.items():
        if relative == prefix or (prefix.endswith("/") and relative.startswith(prefix)):
            return allow
    return None


def imports_of_file(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))
RULED_FILES = [path for path in ENGINE_FILES if rule_for(path) is not None]


def path_id(path: Path) -> str:
    return path.relative_to(ENGINE).as_posix()


@pytest.mark.parametrize("path", RULED_FILES, ids=path_id)
def test_module_imports_only_what_its_layer_allows(path: Path) -> None:
    allow = rule_for(path)
    assert allow is not None
    bad = sorted(name for name in imports_of_file(path) if not allowed(name, allow))
    assert not bad, f"{path_id(path)} imports {bad}, outside its layer's allow-list"


@pytest.mark.parametrize("path", ENGINE_FILES, ids=path_id)
def test_engine_imports_its_dependencies_and_itself_only(path: Path) -> None:
    """Never tests/ or benchmarks/, nor a package pyproject.toml does not install."""
    bad = sorted(
        name for name in imports_of_file(path)
        if not allowed(name, THIRD_PARTY | {STDLIB, "engine"})
    )
    assert not bad, f"{path_id(path)} imports {bad}"


@pytest.mark.parametrize("path", sorted((ENGINE / "runtime").glob("*.py")), ids=path_id)
def test_only_the_store_owners_in_the_runtime_import_storage(path: Path) -> None:
    uses_storage = any(allowed(name, {"engine.storage"}) for name in imports_of_file(path))
    if path.name in NEVER_STORAGE:
        assert not uses_storage, f"{path_id(path)} must never wait on storage"
    elif uses_storage:
        assert path.name in STORAGE_USERS, (
            f"{path_id(path)} imports engine.storage; only {sorted(STORAGE_USERS)} may"
        )


METERING = ("domain/", "storage/", "runtime/", "schema.py", "errors.py")


@pytest.mark.parametrize("path", [p for p in ENGINE_FILES
                                  if path_id(p).startswith(METERING)], ids=path_id)
def test_metering_never_imports_pricing(path: Path) -> None:
    """Pricing rides on metering (the usage feed, the extension seam), never the reverse."""
    bad = sorted(name for name in imports_of_file(path) if allowed(name, {"engine.pricing"}))
    assert not bad, f"{path_id(path)} imports {bad}: metering must not depend on pricing"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(package: str) -> dict[str, set[str]]:
    prefix = package + "."
    return {
        module_name(path): {
            name for name in imports_of_file(path) if name.startswith(prefix)
        }
        for path in sorted((ENGINE.parent / Path(*package.split("."))).glob("*.py"))
    }


def test_domain_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph("engine.domain")
    assert len(graph) >= 10
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# ------------------------------------------------------------ the checks can fail


def test_a_forbidden_import_is_reported() -> None:
    source = "import trio\nfrom engine.storage import Store\nfrom engine.domain import shard\n"
    names = imports_of(source, "engine.domain.example")
    assert names == {"trio", "engine.storage", "engine.domain.shard"}
    assert sorted(n for n in names if not allowed(n, DOMAIN)) == ["engine.storage", "trio"]


def test_relative_and_function_level_imports_count() -> None:
    source = "def f():\n    from . import shard\n    from ..storage import base\n"
    assert imports_of(source, "engine.domain.example") == {
        "engine.domain.shard", "engine.storage.base"
    }


def test_a_cycle_is_found_and_a_tree_is_not() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_layer_has_files_to_check() -> None:
    for prefix in ("domain/", "protocol/", "storage/", "runtime/", "pricing/"):
        assert sum(path_id(p).startswith(prefix) for p in RULED_FILES) >= 2, prefix
    assert {"auth.py", "errors.py", "schema.py"} <= {path_id(p) for p in RULED_FILES}
