"""Every curl example in docs/http.md runs, in order, against a live server, and gets the
status (and text) its ``# → STATUS text`` line promises; every route has an example."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio

from engine import open_engine
from engine.http.webhooks import WebhookDispatcher, WebhookSettings
from tests.http_support import open_http

DOC = Path(__file__).resolve().parents[1] / "docs" / "http.md"
DOC_BASE = "http://127.0.0.1:7434"
# Every curl prints its body, a newline and then the status code.
CURL_SHIM = "curl() { command curl -sS --max-time 10 -w '\\n%{http_code}' \"$@\"; }\n"


def examples() -> list[tuple[str, int, str]]:
    found = []
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S):
        if "curl" not in block:
            continue
        expect = re.search(r"^# → (\d{3}) ?(.*)$", block, re.M)
        assert expect, f"a curl example without its '# → STATUS' line:\n{block}"
        found.append((block, int(expect.group(1)), expect.group(2).strip()))
    return found


def test_every_route_has_an_example() -> None:
    from engine.http.serve import build_router

    text = "\n".join(block for block, _, _ in examples())
    for route in build_router().routes():
        # A {name} segment of a template matches any one segment of an example.
        pattern = re.sub(r"\\\{\w+\\\}", "[^/?' \"\\n]+", re.escape(DOC_BASE + route.path))
        assert re.search(pattern + r"[/?' \"\n]", text), route.path


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("gzip") is None,
                    reason="needs curl and gzip")
async def test_the_curl_examples_run(tmp_path: Path) -> None:
    async with open_engine(tmp_path / "data", shards=2) as engine, open_http(
            engine, clock_ms=None) as server, trio.open_nursery() as hooks:
        dispatcher = WebhookDispatcher(engine, WebhookSettings(secret=b"doc-secret"))
        await hooks.start(dispatcher.run)
        server.attach_webhooks(dispatcher)
        base = f"http://127.0.0.1:{server.port}"
        for block, status, text in examples():
            script = CURL_SHIM + block.replace(DOC_BASE, base)
            with trio.fail_after(30):
                done = await trio.run_process(["bash", "-c", script], capture_stdout=True,
                                              capture_stderr=True, check=False)
            output = done.stdout.decode()
            body, _, code = output.rstrip("\n").rpartition("\n")
            assert done.returncode == 0, (block, done.stderr.decode())
            assert int(code) == status, (block, output)
            assert text in body, (block, body)
        dispatcher.shutdown()


def test_examples_are_not_silently_skipped() -> None:
    assert len(examples()) >= 15


async def test_the_embedding_example_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert "trio.run(main)" in block and "port=7434" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(block.replace("trio.run(main)", "").replace("port=7434", "port=0"), namespace)
    main = namespace["main"]
    assert callable(main)
    printed = ""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(main)  # the example serves until cancelled
        with trio.fail_after(30):
            while not re.search(r"HTTP on port \d+", printed):
                await trio.sleep(0.01)
                printed += capsys.readouterr().out
        nursery.cancel_scope.cancel()
