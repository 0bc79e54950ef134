"""A screenshot of the listening page with results (the README's), taken in headless chromium.

    scripts/with-env.sh python scripts/page_screenshot.py --url http://127.0.0.1:8765 --audio CLIP.wav \
        --out docs/listening_page.png

Start the service first (``python -m audiohash.serve``). Needs Debian's chromium and chromium-driver.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from webdriver import start_chromedriver  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--audio", required=True, help="the clip to upload")
    parser.add_argument("--label", default="", help="filter the results by this label first")
    parser.add_argument("--out", default="docs/listening_page.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_chromedriver(Path(tmp) / "chromedriver.log") as web:
        web.get(args.url.rstrip("/") + "/")
        web.find("#label option[value]:nth-child(2)")
        if args.label:
            web.script("const s = document.getElementById('label'); s.value = arguments[0];"
                       "s.dispatchEvent(new Event('change'))", args.label)
        web.call("POST", web.s(f"/element/{web.find('#file')}/value"), {"text": str(Path(args.audio).resolve())})
        web.find("#results li.result")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        web.screenshot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
