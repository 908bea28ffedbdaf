"""The example workflows (``example_workflows/``): UI format for ComfyUI's template browser, in sync with their
source (``tests/comfy_workflows.py``), consistent links, widget values that fit the node schemas; then, with a
real ComfyUI (``COMFYUI_PATH``), validated and run by its server, and opened from the template browser of its
frontend and run there in Chromium (Playwright).

The schemas on CPU come from ``tests/fixtures/comfy_object_info.json`` (the node types the workflows use, dumped
from a real ComfyUI a125cd84 with this pack); the DPS nodes' entries are also checked against ``nodes/v3.py``
itself. The runs use stand-in models under the workflows' model names (``tests/comfy_server.py``: a tiny random
SD1.5 UNet, the real TAESD, a random CLIP-L; a tiny ControlNet and LoRA) at 64 px and 4 steps; random weights
make no picture, so a run proves the workflow loads, validates and samples.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import ROOT, TAESD
import comfy_workflows as cw

COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
BROWSER_PYTHON = os.environ.get("PLAYWRIGHT_PYTHON", sys.executable)
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or shutil.which("chromium-browser") or "")
TASKS = ("super_resolution", "inpainting", "deblur_controlnet", "storyboard")
USER_FILES = {"ckpt_name", "lora_name", "control_net_name", "image"}     # combos listing the user's files
SIDE, STEPS = 64, 4


@pytest.fixture(scope="module")
def info() -> dict:
    return cw.load_info()


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict]:
    return cw.load_workflows()


# ---- CPU: format, sync, links, widgets ----------------------------------------------------------------------

def test_template_folder_holds_ui_workflows_with_thumbnails(workflows):
    from PIL import Image
    assert all(any(task in name for name in workflows) for task in TASKS), sorted(workflows)
    for name, ui in workflows.items():
        assert ui["version"] == 0.4 and isinstance(ui["nodes"], list) and isinstance(ui["links"], list), name
        assert not any(isinstance(v, dict) and "class_type" in v for v in ui.values()), f"{name} is API format"
        thumb = cw.FOLDER / f"{name}.jpg"
        assert thumb.exists(), f"{thumb.name} missing (python tests/comfy_workflows.py thumbnails)"
        assert thumb.stat().st_size < 100_000, thumb.name
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and image.size[0] == image.size[1], (thumb.name, image.size)
    assert not list(cw.FOLDER.glob("*.png")) and not list(cw.FOLDER.glob("*.py")), "only workflows and thumbnails"


def test_workflows_are_what_their_source_writes(workflows, info):
    written = {g.name: cw.to_ui(g, info) for g in (make() for make in cw.GRAPHS)}
    assert sorted(written) == sorted(workflows)
    for name, ui in workflows.items():
        assert ui == written[name], f"{name}.json is stale: run python tests/comfy_workflows.py write"


def test_links_agree_with_the_nodes_slots(workflows, info):
    for name, ui in workflows.items():
        nodes = {n["id"]: n for n in ui["nodes"]}
        assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes), name
        links = {link[0]: link for link in ui["links"]}
        assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links), name
        for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
            out = nodes[origin]["outputs"][origin_slot]
            inp = nodes[target]["inputs"][target_slot]
            assert link_id in (out["links"] or []) and inp["link"] == link_id, (name, link_id)
            assert out["type"] == kind == inp["type"], (name, link_id, out["type"], kind, inp["type"])
            assert info[nodes[origin]["type"]]["output"][origin_slot] == kind, (name, link_id)
        for node in ui["nodes"]:
            for inp in node["inputs"]:
                assert inp["link"] is None or links[inp["link"]][3:5] == [node["id"], node["inputs"].index(inp)]
            for slot, out in enumerate(node["outputs"]):
                for link_id in out["links"] or []:
                    assert links[link_id][1:3] == [node["id"], slot], (name, node["id"], link_id)
            if node["type"] in cw.NOTE_TYPES:
                continue
            schema = info[node["type"]]
            assert [(i["name"], i["type"]) for i in node["inputs"]] == [s[:2] for s in cw.sockets(schema)]
            assert [o["type"] for o in node["outputs"]] == schema["output"], (name, node["id"])
            for inp, (_, _, optional) in zip(node["inputs"], cw.sockets(schema)):
                assert optional or inp["link"] is not None, (name, node["id"], inp["name"], "required, unlinked")


def _check_value(spec: list, value, where) -> None:
    kind = cw._input_type(spec)
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "COMBO":
        assert value in cw.combo_choices(spec), (where, value)
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, value)
        assert kind == "FLOAT" or isinstance(value, int), (where, value)
        assert options.get("min", value) <= value <= options.get("max", value), (where, value)
    elif kind == "STRING":
        assert isinstance(value, str), (where, value)


def check_widget_values(workflows: dict, info: dict) -> None:
    """Every widget value by hand against the schema: count (with the frontend's extra values), combo choices
    (not the user's file lists), number ranges. ComfyUI a125cd84's /prompt checks only V1 list combos."""
    for name, ui in workflows.items():
        for node in ui["nodes"]:
            where = (name, node["id"], node["type"])
            if node["type"] in cw.NOTE_TYPES:
                assert len(node["widgets_values"]) == 1 and len(node["widgets_values"][0]) > 80, where
                continue
            schema = info[node["type"]]
            expected = cw.widgets(schema)
            values = list(node["widgets_values"])
            assert len(values) == sum(1 + len(w.extra) for w in expected), where
            specs = {n: s for n, s, _ in cw._ordered_inputs(schema)}
            for widget in expected:
                value = values.pop(0)
                if widget.name not in USER_FILES:
                    _check_value(specs[widget.name], value, where + (widget.name,))
                extra = [values.pop(0) for _ in widget.extra]
                assert extra in ([], ["fixed"], ["image"]), where + (widget.name, extra)


def test_widget_values_fit_the_schemas(workflows, info):
    check_widget_values(workflows, info)
    broken = json.loads(json.dumps(workflows["dps_super_resolution"]))
    next(n for n in broken["nodes"] if n["type"] == "DPSSuperResolution")["widgets_values"][1] = "sharpest"
    with pytest.raises(AssertionError, match="sharpest"):
        check_widget_values({"broken": broken}, info)


def test_every_workflow_loads_its_input_and_explains_itself(workflows, info):
    for name, ui in workflows.items():
        notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "MarkdownNote"]
        loads = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoadImage"]
        assert loads and all((cw.INPUTS / f).exists() for f in loads), (name, loads)
        assert any(f in text and "ComfyUI/input" in text for f in loads for text in notes), name
        assert any("Wiring" in text for text in notes) and len(ui["groups"]) >= 3, name
        by_id = {n["id"]: n for n in ui["nodes"]}
        for group in ui["groups"]:                    # each group holds at least one node, wholly
            x, y, w, h = group["bounding"]
            inside = [n for n in by_id.values() if x <= n["pos"][0] and n["pos"][0] + n["size"][0] <= x + w
                      and y <= n["pos"][1] - 30 and n["pos"][1] + n["size"][1] <= y + h]      # 30: the title bar
            assert group["title"] and inside, (name, group["title"])
        prompt = cw.ui_to_api(ui, info)
        applies = [k for k, v in prompt.items() if v["class_type"] == "DPSApply"]
        samplers = [v for v in prompt.values() if v["class_type"] == "KSampler"]
        assert applies and any(s["inputs"]["model"][0] in applies for s in samplers), name
        for node in prompt.values():
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in prompt, (name, value)
    sources = (cw.INPUTS / "SOURCES.md").read_text()
    for image in cw.INPUTS.iterdir():
        assert image.name == "SOURCES.md" or (image.name in sources and image.stat().st_size < 100_000), image.name


def _v3_with_fake_comfy_api(monkeypatch):
    from test_operator_registry import _fake_comfy_api
    fake = _fake_comfy_api()
    if not hasattr(fake["comfy_api.latest"], "ui"):        # used at run time only (DPS Measure's preview)
        fake["comfy_api.latest"].ui = types.SimpleNamespace(PreviewImage=None)
    folder_paths = types.ModuleType("folder_paths")            # Apply DPS lists models/vae_approx
    folder_paths.get_filename_list = lambda folder: []
    for name, module in {**fake, "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    pack = "dps_guidance_pack_workflow_test"
    spec = importlib.util.spec_from_file_location(pack, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    monkeypatch.setitem(sys.modules, pack, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules[pack])
    return importlib.import_module(f"{pack}.nodes.v3"), fake["comfy_api.latest"].io, pack


def test_fixture_matches_the_dps_nodes_in_nodes_v3(monkeypatch, info):
    """The fixture's DPS schemas (from a real server) against the pack's own definitions: same inputs in the same
    order, kinds, optional flags and defaults, so a changed node cannot leave the workflows' widget lists stale."""
    v3, io, pack = _v3_with_fake_comfy_api(monkeypatch)
    try:
        kinds = {getattr(io, n).Input: n.upper() for n in ("Int", "Float", "Combo", "Boolean", "Image", "Mask",
                                                         "Model", "Vae", "Latent")}
        kinds.update({v3.Operator.Input: "DPS_OPERATOR", v3.Noise.Input: "DPS_NOISE"})
        schemas = {s.node_id: s for s in (cls.define_schema() for cls in v3.nodes())}
        used = sorted(t for t in info if t.startswith("DPS"))
        assert used and set(used) <= set(schemas)
        for node_type in used:
            ours = [(i.id, kinds[type(i)], bool(i.kwargs.get("optional")), i.kwargs.get("default"))
                    for i in schemas[node_type].inputs]
            theirs = []
            for name, spec, optional in cw._ordered_inputs(info[node_type]):
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                theirs.append((name, cw._input_type(spec), optional, options.get("default")))
            assert ours == theirs, (node_type, ours, theirs)
    finally:
        for name in [n for n in sys.modules if n.startswith(pack + ".")]:
            del sys.modules[name]


def test_ui_to_api_skips_notes_and_restores_every_widget(workflows, info):
    ui = workflows["dps_storyboard_sketch_to_art"]
    prompt = cw.ui_to_api(ui, info)
    assert "90" not in prompt and prompt["9"]["inputs"]["seed"] == 0 and prompt["9"]["inputs"]["steps"] == 30
    assert prompt["20"]["inputs"] == {"seed": 0, "image": ["4", 0], "operator": ["5", 0], "noise": ["6", 0]}
    assert prompt["4"]["inputs"] == {"image": "storyboard_sketch.png"}
    broken = json.loads(json.dumps(ui))
    next(n for n in broken["nodes"] if n["type"] == "KSampler")["widgets_values"].pop()
    with pytest.raises(ValueError, match="no value for widget 'denoise'"):
        cw.ui_to_api(broken, info)


# ---- a real ComfyUI ---------------------------------------------------------------------------------------

requires_comfy = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout with its requirements "
                                                     "installed (and COMFYUI_PYTHON to its Python) to run it")
requires_taesd = pytest.mark.skipif(not (TAESD / "taesd_decoder.safetensors").exists(),
                                    reason=f"TAESD weights not found at {TAESD} (../shared beside the checkout)")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    import comfy_server as cs
    work = cs.prepare_work(tmp_path_factory.mktemp("comfy_workflows"), COMFY, PYTHON)
    for name in cw.TASK_INPUTS.values():
        cw.standin_input(name, SIDE, work / "input")        # the same names, sized for a 64 px run
    return work


def _server(work: Path, frontend: bool):
    import comfy_server as cs
    return cs.comfy_server(work, COMFY, PYTHON, frontend=frontend)


@requires_comfy
@requires_taesd
def test_server_validates_and_runs_every_workflow(work, workflows):
    import comfy_server as cs
    with _server(work, frontend=False) as url:
        live = cs.get_json(url + "/object_info")
        assert set(cs.get_json(url + "/workflow_templates")[cs.PACK_FOLDER]) == set(workflows)
        fixture = cw.load_info()
        for node_type, schema in fixture.items():
            assert node_type in live, node_type
            assert [w.name for w in cw.widgets(live[node_type])] == [w.name for w in cw.widgets(schema)], node_type
            assert cw.sockets(live[node_type]) == cw.sockets(schema), node_type
        for name, ui in workflows.items():
            prompt = cw.shrink(cw.ui_to_api(ui, live), SIDE, STEPS)
            history = cs.run_prompt(url, prompt)
            assert history["status"]["status_str"] == "success", (name, history["status"])
            [image] = history["outputs"]["11"]["images"]
            assert image["type"] == "output" and image["filename"].endswith(".png"), name
        check_widget_values(workflows, live)                                 # what the server does not check
        bad = cw.ui_to_api(workflows["dps_super_resolution"], live)
        bad["9"]["inputs"]["sampler_name"] = "sharpest"                     # what it checks: a V1 list combo
        del bad["12"], bad["13"]                      # with the baseline output valid, it would queue that part
        status, body = cs.post_json(url + "/prompt", {"prompt": bad})
        assert status == 400 and body["node_errors"]["9"]["errors"][0]["type"] == "value_not_in_list", body
        bad = cw.shrink(cw.ui_to_api(workflows["dps_super_resolution"], live), SIDE, 1)
        bad["5"]["inputs"]["filter"] = "sharpest"             # a V3 combo: /prompt lets it through, the node stops it
        history = cs.run_prompt(url, bad)
        assert history["status"]["status_str"] == "error", history["status"]
        text = json.dumps(history["status"]["messages"])
        assert '"node_type": "DPSSuperResolution"' in text and "filter must be one of" in text, text[-2000:]


def _has_playwright(python: str) -> bool:
    return subprocess.run([python, "-c", "import playwright.sync_api"], capture_output=True).returncode == 0


@requires_comfy
@requires_taesd
@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (Debian package chromium; or set CHROMIUM to its path)")
@pytest.mark.skipif(not _has_playwright(BROWSER_PYTHON),
                    reason="no playwright Python package: install it (the package only, no browser download) or set "
                           "PLAYWRIGHT_PYTHON to a Python that has it")
def test_browser_opens_each_workflow_from_the_template_browser_and_runs_it(work, workflows, tmp_path):
    """What a user does: Templates, this pack, a card (its thumbnail shown), Run; the server says success."""
    with _server(work, frontend=True) as url:
        out = subprocess.run([BROWSER_PYTHON, str(Path(__file__).with_name("comfy_browser_driver.py")), url, CHROMIUM,
                              str(SIDE), str(STEPS), str(tmp_path)], capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0 and "RESULT " in out.stdout, out.stderr[-5000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert sorted(result["workflows"]) == sorted(workflows)
    for name, seen in result["workflows"].items():
        assert seen["thumbnail_shown"] and seen["widgets_equal"] and seen["links_equal"], (name, seen)
        assert seen["prompt_equal"], (name, "the frontend sends another prompt than ui_to_api")
        assert len(seen["groups"]) == len(workflows[name]["groups"]), name
        run = seen["run"]
        assert run and run["status"] == "success", (name, run)
        assert (run["steps"], run["width"]) == (STEPS, SIDE), (name, run)          # it ran what the page showed
    # Frontend 1.27.10 throws once at start on a fresh profile (its NavigationMode setting sets another before that
    # one is registered); nothing may fail while a workflow opens or runs.
    assert not [e for e in result["page_errors"] if not e.startswith("start:")], result["page_errors"]
