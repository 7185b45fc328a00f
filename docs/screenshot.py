"""The report screenshots of docs/report.md: a report opened in headless Chromium (playwright).

    python docs/screenshot.py RUN/report.html docs/report-cv.png [--height 1400] [--section accuracy]

Regenerate them after a change to the report's look, from `make demo`'s run (cv) and a
`cellmorph predict` output.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--section", default=None, help="scroll to this section id first")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.report.resolve().as_uri())
        page.wait_for_selector("html[data-report-ready=yes]")
        if args.section:
            page.eval_on_selector(f"#{args.section}", "e => e.scrollIntoView()")
        page.screenshot(path=str(args.out))
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
