"""The documentation site builds strictly (a broken link or docstring reference fails), its
notebook-style example runs on the fake engine, and the README stays short and keeps CI's command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}


def test_mkdocs_build_strict(tmp_path):
    out = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    api = (out / "reference" / "api" / "index.html").read_text()
    # mkdocstrings rendered the docstrings (not just the page's own text)
    assert "factory.api.run" in api and "Run (or resume) the pipeline" in api
    # every guide in the nav was built, and the benchmark results are part of the site
    for page in ("guide/preferences", "guide/exports", "guide/dedup", "guide/performance", "api-example"):
        assert (out / page / "index.html").exists(), page
    assert (out / "results" / "scale.jsonl").exists()


def example_code(page: Path) -> str:
    return "\n\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))


def test_api_example_page_runs(tmp_path):
    """docs/api-example.md's code blocks, in order, as one script, in a folder laid out like the repo."""
    for d in ("constitutions", "prompts", "pipelines"):
        (tmp_path / d).symlink_to(REPO / d)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo_prompts.jsonl").symlink_to(REPO / "data" / "demo_prompts.jsonl")
    code = example_code(REPO / "docs" / "api-example.md")
    assert "factory.run(" in code and "factory.open(" in code and "factory.export(" in code
    r = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done" in r.stdout and "refused" in r.stdout and "has no audit" in r.stdout
    card = (tmp_path / "data" / "exports" / "example" / "README.md").read_text()
    assert card.startswith("---\n") and "constitution" in card
    assert not (tmp_path / "data" / "exports" / "gated").exists()


def test_readme_is_short_and_keeps_the_ci_command():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "./factory.sh test" in text and "./factory.sh demo" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # the README's links into the site point at real pages
        assert (REPO / link).exists(), link
