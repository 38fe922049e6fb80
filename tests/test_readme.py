"""The examples in README.md, docs/api.md and docs/limits.md run as written."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(relative_path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / relative_path).read_text(), flags=re.S)


def run_example(block: str, tmp_path: Path, name: str) -> list[str]:
    """Run one example in a fresh directory; its stdout lines (fails on a non-zero exit)."""
    script = tmp_path / f"{name}.py"
    script.write_text(block)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, f"{name} failed:\n{done.stderr}"
    return done.stdout.splitlines()


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    blocks = python_blocks("README.md")
    assert blocks, "README has no python example"
    lines = run_example(blocks[0], tmp_path, "readme")
    assert lines[0] == "1 1"
    assert lines[1].endswith("{'customer_id': 'acme', 'region': 'eu'} 1")


def test_api_doc_examples_run(tmp_path: Path) -> None:
    blocks = python_blocks("docs/api.md")
    assert len(blocks) >= 5
    for number, block in enumerate(blocks):
        run_example(block, tmp_path, f"api_{number}")


def test_limits_doc_examples_run(tmp_path: Path) -> None:
    blocks = python_blocks("docs/limits.md")
    assert blocks
    lines = run_example(blocks[0], tmp_path, "limits")
    assert lines[0] == "[(100, 250), (200, 250)]"
    assert lines[1:] == ["0 daily-gb acme 100", "1 daily-gb acme 200"]


def quickstart_block(name: str) -> str:
    found = re.search(rf"<!-- quickstart: {name} -->\n```\w+\n(.*?)```",
                      (ROOT / "README.md").read_text(), flags=re.S)
    assert found, f"README has no quick-start {name} block"
    return found.group(1)


def normalised(text: str) -> list[str]:
    return [re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "TIME", line)
            for line in text.splitlines()]


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The command-line quick start, line for line: the server block starts ``meter
    serve`` (on a free port, which the client block then gets as ``METER_PORT``), the
    client block runs in bash, and prints what the README shows."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "meter"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m engine "$@"\n')
    shim.chmod(0o755)
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:/usr/bin:/bin", "METER_PORT": "0"}
    serve_line = quickstart_block("server").split("#")[0].split()
    assert serve_line[:2] == ["meter", "serve"]
    server = subprocess.Popen(serve_line, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    guard = threading.Timer(120, server.kill)  # a hang guard, not a timing bound
    guard.start()
    try:
        assert server.stdout is not None
        port = None
        while port is None and (line := server.stdout.readline()):
            if listening := re.search(r"listening on [\d.]+:(\d+)", line):
                port = listening.group(1)
        assert port is not None, "meter serve did not start"
        done = subprocess.run(["bash", "-e", "-c", quickstart_block("client")], cwd=tmp_path,
                              env={**env, "METER_PORT": port}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert normalised(done.stdout) == normalised(quickstart_block("output"))
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        guard.cancel()
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]


def test_pricing_doc_examples_run_and_print_what_the_doc_says(tmp_path: Path) -> None:
    text = (ROOT / "docs/pricing.md").read_text()
    blocks = python_blocks("docs/pricing.md")
    printed = re.findall(r"prints\n\n```\n(.*?)```", text, flags=re.S)
    assert len(blocks) == len(printed) == 2
    for number, (block, expected) in enumerate(zip(blocks, printed, strict=True)):
        assert run_example(block, tmp_path, f"pricing_{number}") == expected.splitlines()
