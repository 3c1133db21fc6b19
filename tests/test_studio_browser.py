"""The studio in a real browser: Playwright driving Debian's Chromium against a `sketchgan studio` process whose
runs go to a Ray head with token authentication (the cluster path, through the Jobs API).

Draws on the canvas with the mouse, saves the set, launches a tiny customisation, watches its progress and
its last sample grid, opens the comparison, tries a bad upload; then checks a phone's width and drawing by
touch. Screenshots go to $SKETCHGAN_SCREENSHOTS (default: the test's temp folder) — look at them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ray_head import RayHead
from studio_server import StudioServer, write_studio_root

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
# a root-run, offline machine: no sandbox, no GPU, none of Chromium's background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SKETCHGAN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    work = tmp_path_factory.mktemp("studio-browser")
    config = write_studio_root(work)
    head = RayHead(work / "ray", num_cpus=2).start()
    server = None
    try:
        server = StudioServer(work, config, args=["--ray-address", head.address, "--set",
                                                  "studio.runtime_env=infra/runtime_env.yaml"],
                              env=head.client_env()).start()
        yield server
    finally:
        if server is not None:
            server.stop()
        head.stop()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (make services)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on the canvas, in fractions of its displayed size."""
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()


def ink(page) -> float:
    """The share of the canvas that is not white."""
    return page.evaluate("""() => {
        const c = document.querySelector('#canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let dark = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;
        return dark / (c.width * c.height);
    }""")


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


SQUARE = [[(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75), (0.25, 0.25)]]


def test_draw_save_customise_watch_compare(studio, browser, shots, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(studio.url)
    page.wait_for_function("() => document.querySelector('#base-samples').naturalWidth > 0")
    # three drawings: strokes, an undone stroke, the eraser
    for i in range(3):
        draw(page, SQUARE)
        drawn = ink(page)
        assert drawn > 0.01
        draw(page, [[(0.1, 0.9), (0.9, 0.1)]])
        page.click("#undo")
        assert abs(ink(page) - drawn) < 1e-3  # the diagonal undone, the square kept
        if i == 2:
            page.click("#tool-eraser")
            draw(page, [[(0.2, 0.5), (0.8, 0.5)]])
            assert ink(page) < drawn
            page.click("#tool-pen")
        page.click("#add-sketch")
        page.wait_for_function(f"() => document.querySelectorAll('#sketch-list .sketch-thumb').length === {i + 1}")
        assert ink(page) == 0  # cleared for the next drawing
    page.screenshot(path=str(shots / "draw.png"), full_page=True)

    # a bad upload: a message on the page, nothing added
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a picture")
    page.set_input_files("#upload", str(bogus))
    page.wait_for_function("() => /not a known image format/.test(document.querySelector('#message').textContent)")
    assert page.locator("#sketch-list .sketch-thumb").count() == 3
    page.screenshot(path=str(shots / "bad-upload.png"))

    page.fill("#set-name", "squares")
    page.click("#save-set")
    page.wait_for_function("() => /saved sketch set squares/.test(document.querySelector('#message').textContent)")

    # customise: a tiny run on the Ray cluster
    page.click("#tab-runs")
    page.wait_for_function("() => [...document.querySelectorAll('#run-set option')].some(o => o.value === 'squares')")
    page.select_option("#run-set", "squares")
    page.fill("#run-iterations", "30")
    page.click("#launch")
    run = page.locator("#runs .run").first
    run.wait_for()
    # progress appears without reloading: an iteration count, then the samples
    page.wait_for_function("() => /iteration [1-9]/.test(document.querySelector('#runs .run .run-iteration')"
                           ".textContent)", timeout=240_000)
    page.screenshot(path=str(shots / "runs-progress.png"), full_page=True)
    page.wait_for_selector("#runs .run[data-status=SUCCEEDED]", timeout=300_000)
    assert run.locator(".run-iteration").text_content().strip() == "iteration 30 / 30"
    page.wait_for_function("() => { const i = document.querySelector('#runs .run .run-sample');"
                           " return i && i.complete && i.naturalWidth >= 128; }")
    assert "30" in run.locator(".run-sample-caption").text_content()
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    # compare: base against customised on the same latents
    run.locator(".run-compare").click()
    page.wait_for_function("() => { const i = document.querySelector('#compare-image');"
                           " return i.complete && i.naturalWidth > 800 && i.naturalHeight >= 288; }",
                           timeout=120_000)
    page.screenshot(path=str(shots / "compare.png"), full_page=True)

    # the registry knows the new model; use it
    page.click("#tab-models")
    page.wait_for_function("() => /sketchgan-shapes-squares/.test(document.querySelector('#models-table')"
                           ".textContent)", timeout=60_000)
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    page.locator("#models-table .model-use").first.click()
    page.click("#generate")
    page.wait_for_function("() => { const i = document.querySelector('#use-image');"
                           " return i.complete && i.naturalWidth > 64; }", timeout=60_000)
    page.screenshot(path=str(shots / "use.png"), full_page=True)
    page.close()


def test_phone_width_and_touch_drawing(studio, browser, shots):
    context = browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True, is_mobile=True,
                                  device_scale_factor=2)
    page = context.new_page()
    page.goto(studio.url)
    page.wait_for_selector("#canvas")
    for tab in ("draw", "runs", "compare", "models", "use"):
        page.click(f"#tab-{tab}")
        page.wait_for_timeout(300)
        assert no_horizontal_scroll(page), f"the {tab} view scrolls sideways at 375 px"
        if tab == "draw":
            page.screenshot(path=str(shots / "phone-draw.png"), full_page=True)
    page.click("#tab-draw")
    # a finger stroke: touch events as a phone sends them (through the DevTools protocol)
    box = page.locator("#canvas").bounding_box()
    cdp = context.new_cdp_session(page)
    points = [(box["x"] + box["width"] * f, box["y"] + box["height"] * 0.5) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0],
                                                                                 "y": points[0][1]}]})
    for x, y in points[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert ink(page) > 0.002, "a touch stroke left no ink on the canvas"
    assert no_horizontal_scroll(page)
    page.screenshot(path=str(shots / "phone-touch.png"), full_page=True)
    context.close()
