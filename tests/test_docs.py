"""The README's and docs' code runs as written: every ```python block (in a fresh interpreter, in an empty
directory) and the `python jobs/<job>.py --help` lines of the shell blocks; every job's --help says each
default once and lists --debug.

A block that needs something outside the repository (a checkpoint of the official repo, a cluster) is
marked by the line `<!-- no-run: needs ... -->` right above its fence, visible in the markdown source; it
is reported as skipped with that reason. Keep such blocks few.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:<!-- no-run: (?P<why>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
HELP = re.compile(r"^(?:\.venv/bin/)?python (?P<job>jobs/\w+\.py) --help\b", re.M)


def blocks(lang: str) -> list:
    """pytest params (page, line, code) of every `lang` block, the no-run ones skipped with their reason."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] == lang:
                line = text.count("\n", 0, m.start("code"))
                marks = [pytest.mark.skip(reason=f"no-run: {m['why']}")] if m["why"] else []
                out.append(pytest.param(m["code"], id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return out


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *args` in `cwd`, importing this checkout, with a cache of its own (nothing lands in ~/.cache)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINCONV_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, tmp_path):
    out = run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_help_lines_of_shell_blocks_name_the_jobs():
    """Each `python jobs/<job>.py --help` of the shell blocks is run, as written, by the test below."""
    listed = {m["job"] for page in PAGES for m in HELP.finditer(page.read_text())}
    assert len(listed) >= 4 and all((ROOT / job).is_file() for job in listed), listed


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py"))
def test_every_jobs_help_says_each_default_once_and_lists_debug(job, tmp_path):
    out = run([str(ROOT / "jobs" / job), "--help"], tmp_path)
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert out.returncode == 0 and text.startswith("usage:") and "--debug" in text, out.stderr[-2000:]
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), text
