"""The README's studio screenshots: a real session after `make demo` (its data, registry and benchmark).

Starts `sketchgan studio` on the demo's config, draws squares with the mouse in Chromium (Playwright), saves
them as a sketch set, customises the committed base with the demo's recipe, waits for the run, then captures
each view. About five minutes here. Run from the repository's root:

    .venv/bin/python docs/studio/make_screenshots.py [--iterations 2000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def square(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r), (cx - r, cy - r)]


def stroke(page, points: list[tuple[float, float]]) -> None:
    box = page.locator("#canvas").bounding_box()
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=10)
    page.mouse.up()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "sketchgan"), "studio", "--port", str(port),
                               "--set", "studio.run_cpus=2"], cwd=REPO, start_new_session=True,
                              stdout=open(Path(tempfile.gettempdir()) / "studio-screenshots.log", "w"),
                              stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/info", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function("() => document.querySelector('#base-samples').naturalWidth > 0")
            page.fill("#stroke-width", "14")
            page.dispatch_event("#stroke-width", "input")
            # squares of several sizes and places, as the demo's square sketches are
            for cx, cy, r in [(0.5, 0.5, 0.25), (0.4, 0.6, 0.18), (0.62, 0.4, 0.2), (0.35, 0.35, 0.15),
                              (0.55, 0.62, 0.22), (0.45, 0.45, 0.3)]:
                stroke(page, square(cx, cy, r))
                page.click("#add-sketch")
                page.wait_for_timeout(400)
            stroke(page, square(0.5, 0.5, 0.2))  # one more on the canvas, for the picture
            page.fill("#set-name", "drawn-squares")
            page.check("#set-replace")
            page.click("#save-set")
            page.wait_for_function("() => /saved sketch set/.test(document.querySelector('#message').textContent)")
            page.screenshot(path=str(OUT / "draw.png"), full_page=True)

            page.click("#tab-runs")
            page.wait_for_function("() => [...document.querySelectorAll('#run-set option')]"
                                   ".some(o => o.value === 'drawn-squares')")
            page.select_option("#run-set", "drawn-squares")
            page.fill("#run-iterations", str(args.iterations))
            page.click("#launch")
            third = args.iterations // 3  # a picture of the run under way
            page.wait_for_function(f"""() => {{ const t = document.querySelector('#runs .run .run-iteration');
                const m = t && /iteration (\\d+)/.exec(t.textContent); return m && +m[1] >= {third}; }}""",
                                   timeout=1_800_000, polling=1000)
            page.screenshot(path=str(OUT / "runs.png"), full_page=True)
            page.wait_for_selector("#runs .run[data-status=SUCCEEDED]", timeout=1_800_000)
            page.locator("#runs .run .run-compare").first.click()
            page.wait_for_function("() => document.querySelector('#compare-image').naturalWidth > 800",
                                   timeout=120_000)
            page.screenshot(path=str(OUT / "compare.png"), full_page=True)
            page.click("#tab-models")
            page.wait_for_function("() => /drawn-squares/.test(document.querySelector('#models-table').textContent)",
                                   timeout=60_000)
            page.screenshot(path=str(OUT / "models.png"), full_page=True)
            page.locator("#models-table .model-use").last.click()
            page.fill("#use-edit-strength", "3")
            page.dispatch_event("#use-edit-strength", "input")
            page.check("#use-compare")
            page.click("#generate")
            page.wait_for_function("() => document.querySelector('#use-image').naturalWidth > 64", timeout=60_000)
            page.screenshot(path=str(OUT / "use.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2,
                                     has_touch=True, is_mobile=True)
            phone.goto(url + "/#runs")
            phone.wait_for_selector("#runs .run")
            phone.screenshot(path=str(OUT / "phone-runs.png"))
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(f"screenshots in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
