"""The examples in README.md, docs/api.md and docs/limits.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_pricing_doc_examples_run_and_print_what_the_doc_says(tmp_path: Path) -> None:
    text = (ROOT / "docs/pricing.md").read_text()
    blocks = python_blocks("docs/pricing.md")
    printed = re.findall(r"prints\n\n```\n(.*?)```", text, flags=re.S)
    assert len(blocks) == len(printed) == 2
    for number, (block, expected) in enumerate(zip(blocks, printed, strict=True)):
        assert run_example(block, tmp_path, f"pricing_{number}") == expected.splitlines()
