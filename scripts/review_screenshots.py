"""Take the README's screenshots of `factory review` (docs/review-queue.png, docs/review-pair.png).

An audit of the first 60 shared hh-rlhf pairs by the fake engine (labels are hash noise: the
screenshots show the app, not a judge), three verdicts given with the keyboard, then the queue and
a pair view photographed in Debian's headless Chromium through Playwright.

    python scripts/review_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = Path(os.environ.get("FACTORY_HH_RLHF", REPO.parent / "shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def audit_db(tmp: Path) -> Path:
    from factory.audit.run import audit
    from factory.engines.fake import FakeEngine

    path = tmp / "hh-audit.yaml"
    path.write_text(f"""kind: audit
name: hh-audit
constitution: {REPO / 'constitutions/harmless.yaml'}
human: {{path: {HH}, format: hh-rlhf, limit: 60}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 4}}
engine: {{kind: fake}}
db: {tmp / 'data/hh.duckdb'}
audit: {{report_dir: {tmp}}}
""")
    audit(path, engine=FakeEngine(model="smollm2-135m"), quiet=True)
    return tmp / "data/hh.duckdb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        audit_db(Path(tmp))
        server = subprocess.Popen([sys.executable, "-c", "from factory.cli import app; app()", "review", "--db",
                                   "data/hh.duckdb", "--port", "0", "--annotator", "alice"], stdout=subprocess.PIPE,
                                  text=True, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
        try:
            url = next(line.split()[1] for line in server.stdout if line.startswith("open http"))
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                page.goto(url + "queue")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                for key in "213":  # AI right, human right, both acceptable
                    with page.expect_navigation():
                        page.keyboard.press(key)
                page.goto(url + "queue")
                page.keyboard.press("j")
                page.keyboard.press("j")
                page.keyboard.press("j")
                page.screenshot(path=str(args.out / "review-queue.png"))
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(args.out / "review-pair.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    from PIL import Image

    for name in ("review-queue.png", "review-pair.png"):  # a 128-colour palette keeps them small
        path = args.out / name
        Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
        print(path, f"{path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
