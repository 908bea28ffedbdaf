"""The DPS extension in a real browser: headless Chromium (Debian's package) driven by Playwright, against a live
WebUI started by ``setup_webui.py start`` (with its page, i.e. without ``--nowebui``).

    python tests/hosts/browser_webui.py --url http://127.0.0.1:7860 --out DIR [--screenshot docs/img/webui_dps.png]

Needs ``pip install playwright`` (the Python package only: the browser is the system's ``/usr/bin/chromium``,
``apt-get install chromium``; never ``playwright install``) and PIL. Checks, each asserted:

1. the txt2img tab shows the *DPS Guidance* accordion; opened, it shows its controls (task, strength, step rule);
2. PNG Info -> *Send to txt2img* with a PNG whose infotext has a ``DPS`` entry turns the accordion on and sets
   its controls to the pasted values (the infotext-paste fields the script registers);
3. the *DPS Restore* tab renders; a restore of a 16x16 upload (x4 super-resolution, a few steps) runs and shows
   the *After* image and an infotext with the ``DPS`` entry.

Screenshots go to ``--out``; ``--screenshot`` keeps a small copy of the Restore tab after the restore.
Works on both pages: AUTOMATIC1111's gradio 3 and Forge's gradio 4 (tabs have the ``tab`` role there, and
images load lazily, so the *After* image is scrolled into view first).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
ACCORDION = "#script_txt2img_dps_guidance_dps_enabled"
PASTED = {"Strength zeta": "0.5", "Start (fraction of sampling)": "0.1", "End (fraction of sampling)": "0.9"}
INFOTEXT = ('a photo of a cat\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 5.0, Seed: 1, '
            'Size: 64x64, DPS: "task: super_resolution, sr_factor: 4, sr_filter: area, noise: gaussian, '
            'noise_sigma: 0.02, zeta: 0.5, rule: dps, mode: x0_only, start: 0.1, end: 0.9, source: upload, '
            'y: 0123456789"')


def log(message: str) -> None:
    print(f"[browser] {message}", flush=True)


def make_inputs(out: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    low = Image.fromarray((rng.random((4, 4, 3)) * 255).astype("uint8")).resize((16, 16), Image.BICUBIC)
    degraded = out / "degraded_16px.png"
    low.save(degraded)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXT)
    with_info = out / "infotext.png"
    low.resize((64, 64)).save(with_info, pnginfo=info)
    return degraded, with_info


def block(scope, label: str):
    """The gradio block whose label is ``label`` (exact), inside ``scope``."""
    return scope.locator(".block", has=scope.page.get_by_text(label, exact=True)).last


def open_tab(page, name: str, gradio4: bool) -> None:
    """Click a top-level tab: gradio 3 (AUTOMATIC1111) draws its tab buttons as buttons, gradio 4 (Forge) gives
    them the ``tab`` role."""
    page.locator("#tabs").get_by_role("tab" if gradio4 else "button", name=name, exact=True).click()


def slider_value(scope, label: str) -> str:
    return block(scope, label).locator("input[type=number]").first.input_value()


def run(url: str, out: Path, screenshot: Path | None, steps: int, timeout_s: float) -> dict:
    from playwright.sync_api import expect, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    degraded, with_info = make_inputs(out)
    results: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        start = time.time()
        page.goto(url, wait_until="domcontentloaded", timeout=300_000)
        page.locator("#txt2img_prompt").wait_for(state="visible", timeout=300_000)
        results["page_load_s"] = round(time.time() - start, 1)
        results["gradio"] = page.evaluate("() => window.gradio_config && window.gradio_config.version") or "3"
        gradio4 = int(str(results["gradio"]).split(".")[0]) >= 4
        log(f"page loaded in {results['page_load_s']} s (gradio {results['gradio']})")

        # 1. the accordion
        accordion = page.locator(ACCORDION)
        expect(accordion).to_be_visible()
        accordion.locator(".label-wrap").first.click()
        for label in ("Task (operator A)", "Strength zeta", "Step rule", "Gradient"):
            expect(block(accordion, label)).to_be_visible()
        accordion.scroll_into_view_if_needed()
        accordion.screenshot(path=str(out / "accordion.png"))
        results["accordion"] = "rendered"
        accordion.locator(".label-wrap").first.click()  # close again (= off)
        log("accordion rendered")

        # 2. paste from PNG Info
        open_tab(page, "PNG Info", gradio4)
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(with_info))
        expect(page.locator("#tab_pnginfo")).to_contain_text("DPS", timeout=60_000)
        page.locator("#tab_pnginfo").get_by_role("button", name="Send to txt2img").click()
        page.locator("#txt2img_prompt").wait_for(state="visible")
        expect(page.locator(f"{ACCORDION}-checkbox input")).to_be_checked(timeout=30_000)
        pasted = {label: slider_value(accordion, label) for label in PASTED}
        rule = block(accordion, "Step rule").locator("input").first.input_value()
        results["pasted"] = dict(pasted, rule=rule)
        log(f"pasted: {results['pasted']}")
        assert pasted == PASTED and rule == "dps", f"pasting did not restore the settings: {results['pasted']}"
        accordion.screenshot(path=str(out / "accordion_pasted.png"))

        # 3. the Restore tab
        open_tab(page, "DPS Restore", gradio4)
        tab = page.locator("#tab_dps_restore")
        expect(block(tab, "Degraded image")).to_be_visible()
        block(tab, "Degraded image").locator("input[type=file]").set_input_files(str(degraded))
        block(tab, "Prompt (describe the image)").locator("textarea").fill("a photo of a cat")
        for label, value in (("Steps", str(steps)), ("Seed (-1: random)", "1")):
            field = block(tab, label).locator("input[type=number]").first
            field.fill(value)
            field.press("Enter")
        tab.screenshot(path=str(out / "restore_before.png"))
        start = time.time()
        tab.get_by_role("button", name="Restore", exact=True).click()
        infotext = block(tab, "Infotext").locator("textarea")
        expect(infotext).to_have_value(re.compile("DPS: "), timeout=timeout_s * 1000)
        results["restore_s"] = round(time.time() - start, 1)
        results["restore_infotext"] = infotext.input_value()
        after = block(tab, "After").locator("img")
        if gradio4:  # gradio 4 loads images lazily: off screen, the <img> stays 0 px high (hidden)
            block(tab, "After").scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=after.element_handle())
        expect(after).to_be_visible()
        size = after.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        results["after_size"] = size
        log(f"restore: {results['restore_s']} s, after {size}, infotext {results['restore_infotext']!r}")
        assert "DPS error" not in results["restore_infotext"], results["restore_infotext"]
        assert size == [64, 64], size
        tab.screenshot(path=str(out / "restore_after.png"))
        results["page_errors"] = errors
        browser.close()
    if screenshot is not None:
        image = Image.open(out / "restore_after.png").convert("RGB")
        image.thumbnail((900, 900))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=64).save(screenshot, optimize=True)
        log(f"kept {screenshot} ({screenshot.stat().st_size // 1024} KiB)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots and inputs")
    parser.add_argument("--screenshot", type=Path, help="keep a small PNG of the Restore tab here")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a restore may take")
    args = parser.parse_args(argv)
    try:
        results = run(args.url, args.out, args.screenshot, args.steps, args.timeout)
    except Exception as exc:  # report and fail
        print(f"FAILED: {type(exc).__name__}: {exc}")
        print("0 passed, 1 failed")
        return 1
    (args.out / "browser_report.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps(results, indent=2))
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
