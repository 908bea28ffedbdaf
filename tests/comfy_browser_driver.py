"""Browser driver for tests/test_comfy_workflows.py: opens each example workflow from ComfyUI's template browser
in Chromium (Playwright, the Python package only; the browser is the system's), lowers its sizes and steps,
presses Run, waits for the server's verdict, and prints one ``RESULT {json}`` line.

Usage: ``python tests/comfy_browser_driver.py URL CHROMIUM SIDE STEPS SCREENSHOT_DIR``. It runs with any Python
that has ``playwright`` (``PLAYWRIGHT_PYTHON`` in the test); it needs nothing else from this repository than
``comfy_workflows.py`` (standard library only at import).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_workflows as cw  # noqa: E402

PACK_FOLDER = "dps_guidance"
LOWER = """([side, steps]) => {
    for (const node of window.app.graph.nodes) for (const w of node.widgets ?? []) {
        if (['EmptyLatentImage', 'ImageScale'].includes(node.type) && ['width', 'height'].includes(w.name)) w.value = side;
        if (node.type === 'KSampler' && w.name === 'steps') w.value = steps;
    }
    window.app.graph.setDirtyCanvas(true, true);
}"""
THUMBNAIL_SHOWN = """(sel) => { const i = document.querySelector(sel + ' img');
    return !!i && i.complete && i.naturalWidth > 0; }"""


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _wait_for_new_prompt(url: str, before: set, timeout: float = 900) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = _get(url + "/history")
        for prompt_id in set(history) - before:
            status = history[prompt_id]["status"]
            if status.get("completed") is not None and status["status_str"] in ("success", "error"):
                return {"prompt_id": prompt_id, "status": status["status_str"],
                        "messages": status.get("messages", [])[-3:],
                        "steps": history[prompt_id]["prompt"][2]["9"]["inputs"]["steps"],
                        "width": history[prompt_id]["prompt"][2]["8"]["inputs"]["width"]}
        time.sleep(0.5)
    return None


def drive(url: str, chromium: str, side: int, steps: int, shots: Path) -> dict:
    from playwright.sync_api import sync_playwright
    info = cw.load_info()
    result: dict = {"workflows": {}, "page_errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            current = {"step": "start"}
            page.on("pageerror", lambda err: result["page_errors"].append(
                f"{current['step']}: {err.message} {(err.stack or '')[:600]}"))
            page.goto(url, timeout=240_000)
            page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=240_000)
            for name, ui in cw.load_workflows().items():
                out: dict = {}
                result["workflows"][name] = out
                current["step"] = f"{name}: open"
                page.get_by_role("button", name="Templates").first.click()
                page.get_by_text(PACK_FOLDER, exact=True).first.click()
                selector = f"[data-testid='template-workflow-{name}']"
                page.locator(selector).wait_for(timeout=60_000)
                page.wait_for_function(THUMBNAIL_SHOWN, arg=selector, timeout=60_000)
                out["thumbnail_shown"] = True
                page.locator(selector).click()
                page.locator(selector).wait_for(state="detached", timeout=60_000)      # the dialog closed
                page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(ui["nodes"]),
                                       timeout=60_000)
                loaded = page.evaluate("() => window.app.graph.serialize()")
                out["widgets_equal"] = ({n["id"]: n["widgets_values"] for n in loaded["nodes"]} ==
                                        {n["id"]: n["widgets_values"] for n in ui["nodes"]})
                out["links_equal"] = sorted(map(tuple, loaded["links"])) == sorted(map(tuple, ui["links"]))
                out["groups"] = [g["title"] for g in loaded["groups"]]
                sent = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                expected = cw.ui_to_api(ui, info)
                out["prompt_equal"] = ({k: (v["class_type"], v["inputs"]) for k, v in sent.items()} ==
                                       {k: (v["class_type"], v["inputs"]) for k, v in expected.items()})
                current["step"] = f"{name}: run"
                page.evaluate(LOWER, [side, steps])
                page.screenshot(path=str(shots / f"{name}.png"))
                before = set(_get(url + "/history"))
                page.get_by_role("button", name="Run", exact=True).first.click()
                out["run"] = _wait_for_new_prompt(url, before)
        finally:
            browser.close()
    return result


def main() -> None:
    url, chromium, side, steps, shots = sys.argv[1:6]
    print("RESULT " + json.dumps(drive(url, chromium, int(side), int(steps), Path(shots))))


if __name__ == "__main__":
    main()
