"""The example workflows in ``example_workflows/``: their one source, and the tools that write and check them.

ComfyUI's template browser lists ``<custom node>/example_workflows/*.json`` (server route
``/workflow_templates``) and loads each as a UI-format workflow (nodes with positions, links, widget values,
groups, notes), with ``<name>.jpg`` beside it as the card's picture. The graphs are written here as API-style
descriptions (class type, widget values by name, links by node id) plus a layout; ``to_ui`` turns one into the
UI format with a node schema (a ComfyUI server's ``/object_info``; a copy of the types used is
``tests/fixtures/comfy_object_info.json``), ``ui_to_api`` turns a UI workflow back into the API prompt that
``POST /prompt`` takes.

Commands (``python tests/comfy_workflows.py ...``):

* ``write``: rewrite ``example_workflows/*.json`` from the descriptions and the fixture.
* ``inputs``: write the input images into ``example_workflows/input/`` (needs scikit-image's bundled photos).
* ``object-info``: refresh the fixture from a real ComfyUI (``COMFYUI_PATH``, ``COMFYUI_PYTHON``).
* ``thumbnails``: run every workflow in a real ComfyUI with stand-in models (``tests/comfy_server.py``) at a small
  size and write ``example_workflows/<name>.jpg``: the measurement beside the result, labelled as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FOLDER = ROOT / "example_workflows"
INPUTS = FOLDER / "input"
FIXTURE = HERE / "fixtures" / "comfy_object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}        # frontend-only nodes: no schema, never sent to the server
SEED_NAMES = ("seed", "noise_seed")          # the frontend adds a "control after generate" widget to these
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
DPS_COLOR, DPS_BGCOLOR = "#232", "#353"      # the DPS nodes in green (ComfyUI's palette)
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"    # notes in ComfyUI's "yellow"
GAP = 70.0                                   # between stacked nodes: the next title bar (30) and a node badge
SOURCES = ("Photos: scikit-image's sample data (BSD-3-Clause package): `chelsea` (CC0, Stefan van der Walt), "
           "`coffee` (CC0, Rachel Michetti), `astronaut` (NASA, public domain). The storyboard sketch was drawn "
           "for this pack.")


# ------------------------------------------------------------------------------------------------ schema

@dataclass(frozen=True)
class Widget:
    name: str
    type: str
    default: Any
    extra: tuple[Any, ...] = ()     # values of the widgets the frontend adds after it (seed control, upload)


def _input_type(spec: list) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _ordered_inputs(schema: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order: input_order's required, then its optional."""
    inputs = schema["input"]
    order = schema.get("input_order") or {k: list(inputs.get(k, {})) for k in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            if name in inputs.get(group, {}):
                out.append((name, inputs[group][name], group == "optional"))
    return out


def widgets(schema: dict) -> list[Widget]:
    """The widgets the frontend makes for a node, in its order, with the extra values it saves after some."""
    out = []
    for name, spec, _ in _ordered_inputs(schema):
        kind = _input_type(spec)
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        default = options.get("default")
        if default is None and kind == "COMBO":
            choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
            default = choices[0] if choices else None
        extra: tuple[Any, ...] = ()
        if kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
            extra = ("fixed",)
        elif kind == "COMBO" and options.get("control_after_generate"):
            extra = ("fixed",)
        if options.get("image_upload"):
            extra = ("image",)      # LoadImage's upload button saves the folder it uploads to
        out.append(Widget(name, kind, default, extra))
    return out


def sockets(schema: dict) -> list[tuple[str, str, bool]]:
    """The node's input sockets (not widgets): (name, type, optional)."""
    out = []
    for name, spec, optional in _ordered_inputs(schema):
        kind = _input_type(spec)
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            out.append((name, kind, optional))
    return out


def combo_choices(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return options.get("options") if spec[0] == "COMBO" else None


# ------------------------------------------------------------------------------------------------ descriptions

@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float | None]     # y None: below the previous node of the same column
    title: str | None = None
    values: dict[str, Any] = field(default_factory=dict)      # widget values by name (others: schema default)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)   # input -> (node id, output index)
    size: tuple[float, float] | None = None
    text: str | None = None                                   # notes only
    dps: bool = False                                         # colour it as a DPS node


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    groups: list[tuple[str, list[int], str]]                  # (title, member node ids, colour)


def _model_and_prompts(positive: str, negative: str, clip_from: int = 1) -> list[Node]:
    return [
        Node(1, "CheckpointLoaderSimple", (0, 0), "Load Checkpoint (any SD1.5)", {"ckpt_name": CHECKPOINT}),
        Node(2, "CLIPTextEncode", (0, None), "Positive prompt", {"text": positive}, {"clip": (clip_from, 1)},
             size=(400, 170)),
        Node(3, "CLIPTextEncode", (0, None), "Negative prompt", {"text": negative}, {"clip": (clip_from, 1)},
             size=(400, 170)),
    ]


def _sampling(x: float, sampler: str, cfg: float, positive: tuple[int, int], negative: tuple[int, int],
              size_title: str, prefix: str, result_title: str = "Restored") -> list[Node]:
    return [
        Node(8, "EmptyLatentImage", (x, None), size_title, {"width": 512, "height": 512, "batch_size": 1}),
        Node(9, "KSampler", (x + 360, 0), "KSampler", {"seed": 0, "steps": 30, "cfg": cfg, "sampler_name": sampler,
                                                       "scheduler": "karras", "denoise": 1.0},
             {"model": (7, 0), "positive": positive, "negative": negative, "latent_image": (8, 0)}),
        Node(10, "VAEDecode", (x + 720, 0), None, {}, {"samples": (9, 0), "vae": (1, 2)}),
        Node(11, "SaveImage", (x + 720, None), result_title, {"filename_prefix": prefix}, {"images": (10, 0)},
             size=(360, 400)),
    ]


def _apply(x: float, measurement: tuple[int, int], model: tuple[int, int] = (1, 0), strength: float = 1.0,
           end: float = 1.0) -> Node:
    return Node(7, "DPSApply", (x, 0), "Apply DPS Guidance",
                {"strength": strength, "step_rule": "polyak", "gradient": "full", "start_percent": 0.0,
                 "end_percent": end, "vae_precision": "auto", "fast_decoder": "none"},
                {"model": model, "vae": (1, 2), "measurement": measurement, "operator": (5, 0), "noise": (6, 0)},
                dps=True)


def _note(id: int, pos: tuple[float, float], size: tuple[float, float], text: str) -> Node:
    return Node(id, "MarkdownNote", pos, "Read me" if id == 90 else "Note", size=size, text=text.strip())


def _input_note(files: str) -> str:
    return (f"**Input image.** Load Image reads `ComfyUI/input/`. Copy {files} from this node pack's "
            "`example_workflows/input/` folder there (or drag it onto the Load Image node), or load your own.\n\n"
            + SOURCES)


def super_resolution() -> Graph:
    nodes = _model_and_prompts("a sharp, detailed photograph of a cat", "blurry, lowres, jpeg artifacts, watermark")
    nodes += [
        Node(4, "LoadImage", (460, 0), "Low-resolution photo (128x128)", {"image": "lowres_photo.png"},
             size=(315, 330)),
        Node(5, "DPSSuperResolution", (460, None), "How it was shrunk", {"factor": 4, "filter": "bicubic"}, dps=True),
        Node(6, "DPSGaussianNoise", (460, None), "How noisy it is", {"sigma": 0.05}, dps=True),
        _apply(880, (4, 0)),
        *_sampling(880, "euler", 5.0, (2, 0), (3, 0), "Output size (4x the photo)", "dps_super_resolution"),
        Node(12, "ImageScale", (1600, None), "Baseline: bicubic upscale",
             {"upscale_method": "bicubic", "width": 512, "height": 512, "crop": "disabled"}, {"image": (4, 0)}),
        Node(13, "PreviewImage", (1600, None), "Baseline", {}, {"images": (12, 0)}, size=(360, 400)),
        _note(90, (-480, 0), (440, 560), """
## DPS super-resolution (4x)
Diffusion Posterior Sampling: at every step the sampler is pulled toward pictures that, **shrunk 4x the way
the operator says**, give back the low-resolution photo. The model still draws the details.

**Wiring:** the checkpoint's MODEL goes through **Apply DPS Guidance** into the KSampler; the photo is the
**measurement**; the operator and noise nodes describe how it was made. The output must be exactly `factor`
times the photo (128 px -> 512 px).

**Your photo:** set `factor` so that photo x factor = output size, and `filter` to how it was shrunk
(`bicubic` for most photos). Raise the noise `sigma` for JPEG-y or noisy photos.

The bottom row is a plain bicubic upscale to compare with.
"""),
        _note(91, (460, None), (315, 230), _input_note("`lowres_photo.png`")),
    ]
    return Graph("dps_super_resolution", nodes, [
        ("Model and prompt", [1, 2, 3], "#3f789e"),
        ("The measurement and how it was made", [4, 5, 6, 91], "#8A8"),
        ("DPS guidance and sampling", [7, 8, 9], "#3f789e"),
        ("Result", [10, 11, 12, 13], "#88A"),
    ])


def inpainting() -> Graph:
    nodes = _model_and_prompts("a photograph of an astronaut", "blurry, lowres, jpeg artifacts, watermark")
    nodes += [
        Node(4, "LoadImage", (460, 0), "Photo with holes (transparent = missing)", {"image": "photo_with_holes.webp"},
             size=(315, 330)),
        Node(5, "DPSInpainting", (460, None), "Missing pixels = the mask", {}, {"mask": (4, 1)}, dps=True),
        Node(6, "DPSGaussianNoise", (460, None), "How noisy it is", {"sigma": 0.02}, dps=True),
        _apply(880, (4, 0)),
        *_sampling(880, "dpmpp_2m", 5.0, (2, 0), (3, 0), "Output size (= the photo)", "dps_inpainting"),
        _note(90, (-480, 0), (440, 560), """
## DPS inpainting
The photo's transparent pixels are missing; DPS fills them so that the known pixels stay as they are
(up to the noise level) while the model draws the rest.

**Wiring:** Load Image's **MASK** (1 = transparent = missing) is the operator's mask; its **IMAGE** is the
measurement. The checkpoint's MODEL goes through **Apply DPS Guidance** into the KSampler. The output is the
photo's size.

**Your photo:** erase the region to fill (a PNG or WebP with transparency), or paint it in the mask editor (right-click the
Load Image node, *Open in MaskEditor*). The mask must be the measurement's size.
"""),
        _note(91, (460, None), (315, 230), _input_note("`photo_with_holes.webp`")),
    ]
    return Graph("dps_inpainting", nodes, [
        ("Model and prompt", [1, 2, 3], "#3f789e"),
        ("The measurement and how it was made", [4, 5, 6, 91], "#8A8"),
        ("DPS guidance and sampling", [7, 8, 9], "#3f789e"),
        ("Result", [10, 11], "#88A"),
    ])


def deblur_controlnet() -> Graph:
    nodes = _model_and_prompts("a sharp, in-focus photograph of a cup of coffee",
                               "blurry, lowres, jpeg artifacts, watermark")
    nodes += [
        Node(4, "LoadImage", (460, 0), "Blurred photo (512x512)", {"image": "blurred_photo.jpg"}, size=(315, 330)),
        Node(5, "DPSGaussianBlur", (460, None), "How it was blurred", {"kernel_size": 61, "sigma": 3.0}, dps=True),
        Node(6, "DPSGaussianNoise", (460, None), "How noisy it is", {"sigma": 0.05}, dps=True),
        _apply(880, (4, 0)),
        Node(14, "ControlNetLoader", (880, None), "Load ControlNet (tile)",
             {"control_net_name": "control_v11f1e_sd15_tile.safetensors"}),
        Node(15, "ControlNetApplyAdvanced", (880, None), "Apply ControlNet",
             {"strength": 0.5, "start_percent": 0.0, "end_percent": 0.8},
             {"positive": (2, 0), "negative": (3, 0), "control_net": (14, 0), "image": (4, 0)}),
        *_sampling(880, "euler", 5.0, (15, 0), (15, 1), "Output size (= the photo)", "dps_deblur_controlnet"),
        _note(90, (-480, 0), (440, 600), """
## DPS deblurring with a tile ControlNet
DPS pulls the sampler toward sharp pictures that, **blurred the way the operator says**, give back the
photo. A tile ControlNet fed with the same blurred photo keeps the layout from the first steps.

**Wiring:** the checkpoint's MODEL goes through **Apply DPS Guidance** into the KSampler; the prompts go
through **Apply ControlNet** into it. The photo is both the DPS measurement and the ControlNet image.

**Your photo:** match `kernel_size` and `sigma` to the blur (in pixels of the photo; sigma 3 at 512 px is a
mild blur). Too small a sigma leaves blur, too large makes halos. Without a ControlNet, connect the prompts
straight to the KSampler.
"""),
        _note(91, (460, None), (315, 230), _input_note("`blurred_photo.jpg`")),
    ]
    return Graph("dps_deblur_controlnet", nodes, [
        ("Model and prompt", [1, 2, 3], "#3f789e"),
        ("The measurement and how it was made", [4, 5, 6, 91], "#8A8"),
        ("DPS guidance, ControlNet and sampling", [7, 8, 9, 14, 15], "#3f789e"),
        ("Result", [10, 11], "#88A"),
    ])


def storyboard() -> Graph:
    nodes = _model_and_prompts("finished concept art of a house on a hill under a big sun, painterly, "
                               "dramatic light, in the artist's style",
                               "sketch, lineart, unfinished, lowres, watermark", clip_from=16)
    nodes[0].pos = (0, -160)
    nodes += [
        Node(16, "LoraLoader", (0, None), "The artist's style LoRA",
             {"lora_name": "my_style.safetensors", "strength_model": 0.8, "strength_clip": 0.8},
             {"model": (1, 0), "clip": (1, 1)}),
        Node(4, "LoadImage", (460, 0), "Storyboard sketch (512x512)", {"image": "storyboard_sketch.png"},
             size=(315, 330)),
        Node(17, "DPSGrayscale", (460, None), "Keep tones, not colours", dps=True),
        Node(18, "DPSGaussianBlur", (460, None), "Keep masses, not lines", {"kernel_size": 31, "sigma": 4.0},
             dps=True),
        Node(19, "DPSSuperResolution", (460, None), "Keep layout only (1/8 size)", {"factor": 8, "filter": "area"},
             dps=True),
        Node(5, "DPSCompose", (460, None), "Composition of the sketch", {},
             {"first": (17, 0), "second": (18, 0), "third": (19, 0)}, dps=True),
        Node(6, "DPSGaussianNoise", (460, None), "Loose fit (a sketch is not the answer)", {"sigma": 0.2}, dps=True),
        Node(20, "DPSMeasure", (460, None), "The sketch's composition", {"seed": 0},
             {"image": (4, 0), "operator": (5, 0), "noise": (6, 0)}, dps=True),
        _apply(880, (20, 0), model=(16, 0), strength=0.5, end=0.7),
        Node(14, "ControlNetLoader", (880, None), "Load ControlNet (scribble, optional)",
             {"control_net_name": "control_v11p_sd15_scribble.safetensors"}),
        Node(15, "ControlNetApplyAdvanced", (880, None), "Apply ControlNet",
             {"strength": 0.4, "start_percent": 0.0, "end_percent": 0.6},
             {"positive": (2, 0), "negative": (3, 0), "control_net": (14, 0), "image": (4, 0)}),
        *_sampling(880, "dpmpp_2m", 6.0, (15, 0), (15, 1), "Output size (= the sketch)", "dps_storyboard",
                   "Finished art"),
        _note(90, (-480, -160), (440, 640), """
## Storyboard sketch to finished art
The sketch is not the answer, only its **composition**: DPS keeps the result's tones, masses and layout
close to the sketch's (grayscale, blurred, 1/8 size, loose noise) while the model and the style LoRA
paint the rest. A scribble ControlNet adds the lines (optional).

**Wiring:** the operator is three operators in a chain (**DPS Chain Operators**); **DPS Measure** applies
it to the sketch to make the measurement. Apply DPS Guidance takes the LoRA's MODEL and feeds the KSampler.
Guidance stops at 70% of the steps (`end_percent`) so the model finishes the details freely.

**Tuning:** lower `strength` or raise the noise `sigma` for a looser fit; lower the blur and the factor to
keep more of the drawing.
"""),
        _note(91, (460, None), (315, 230), _input_note("`storyboard_sketch.png`")),
    ]
    return Graph("dps_storyboard_sketch_to_art", nodes, [
        ("Model, style and prompt", [1, 2, 3, 16], "#3f789e"),
        ("The sketch and what of it to keep", [4, 17, 18, 19, 5, 6, 20, 91], "#8A8"),
        ("DPS guidance, ControlNet and sampling", [7, 8, 9, 14, 15], "#3f789e"),
        ("Result", [10, 11], "#88A"),
    ])


GRAPHS = (super_resolution, inpainting, deblur_controlnet, storyboard)
TASK_INPUTS = {"dps_super_resolution": "lowres_photo.png", "dps_inpainting": "photo_with_holes.webp",
               "dps_deblur_controlnet": "blurred_photo.jpg", "dps_storyboard_sketch_to_art": "storyboard_sketch.png"}


# ------------------------------------------------------------------------------------------------ UI format

def _default_size(schema: dict, n_widgets: int) -> tuple[float, float]:
    rows = max(len(sockets(schema)), len(schema.get("output", [])))
    return 315.0, 30.0 + 22.0 * rows + 26.0 * n_widgets + 8.0


def to_ui(graph: Graph, info: dict) -> dict:
    """The UI-format workflow (``version`` 0.4, as the frontend saves it) of one description."""
    by_id = {n.id: n for n in graph.nodes}
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    for node in graph.nodes:
        if node.type in NOTE_TYPES:
            continue
        schema = info[node.type]
        socket_names = [s[0] for s in sockets(schema)]
        for name, (source, slot) in node.links.items():
            if name not in socket_names:
                raise ValueError(f"{graph.name}: {node.type} #{node.id} has no input socket {name!r}")
            kind = dict((s[0], s[1]) for s in sockets(schema))[name]
            source_type = info[by_id[source].type]["output"][slot]
            if source_type != kind:
                raise ValueError(f"{graph.name}: #{source} output {slot} is {source_type}, #{node.id}.{name} wants {kind}")
            link_id = len(links) + 1
            links.append([link_id, source, slot, node.id, socket_names.index(name), kind])
            out_links.setdefault((source, slot), []).append(link_id)
            in_link[(node.id, name)] = link_id
    nodes = []
    order = _execution_order(graph)
    bottoms: dict[float, float] = {}
    positions: dict[int, tuple[float, float]] = {}
    for node in graph.nodes:
        x, y = node.pos
        if y is None:
            y = bottoms[x] + GAP
        positions[node.id] = (x, y)
        entry: dict[str, Any] = {"id": node.id, "type": node.type, "pos": [float(x), float(y)]}
        if node.type in NOTE_TYPES:
            bottoms[x] = y + node.size[1]
            entry.update(size=[float(node.size[0]), float(node.size[1])], flags={}, order=order[node.id], mode=0,
                         inputs=[], outputs=[], title=node.title, properties={}, widgets_values=[node.text],
                         color=NOTE_COLOR, bgcolor=NOTE_BGCOLOR)
            nodes.append(entry)
            continue
        schema = info[node.type]
        values = []
        unknown = set(node.values) - {w.name for w in widgets(schema)}
        if unknown:
            raise ValueError(f"{graph.name}: {node.type} #{node.id} has no widget {sorted(unknown)}")
        for w in widgets(schema):
            value = node.values.get(w.name, w.default)
            if value is None:
                raise ValueError(f"{graph.name}: {node.type} #{node.id} needs a value for {w.name!r}")
            values += [value, *w.extra]
        size = node.size or _default_size(schema, len(widgets(schema)))
        bottoms[x] = y + size[1]
        inputs = [{"name": name, "type": kind, "link": in_link.get((node.id, name))}
                  for name, kind, _ in sockets(schema)]
        outputs = []
        for slot, (kind, name) in enumerate(zip(schema["output"], schema["output_name"])):
            ids = out_links.get((node.id, slot))
            outputs.append({"name": name, "type": kind, "links": ids or None, **({"slot_index": slot} if ids else {})})
        entry.update(size=[float(size[0]), float(size[1])], flags={}, order=order[node.id], mode=0, inputs=inputs,
                     outputs=outputs, properties={"Node name for S&R": node.type}, widgets_values=values)
        if node.title:
            entry["title"] = node.title
        if node.dps:
            entry.update(color=DPS_COLOR, bgcolor=DPS_BGCOLOR)
        nodes.append(entry)
    groups = []
    for index, (title, members, color) in enumerate(graph.groups, 1):
        boxes = [(positions[m], next(n["size"] for n in nodes if n["id"] == m)) for m in members]
        x0 = min(p[0] for p, _ in boxes) - 20
        y0 = min(p[1] for p, _ in boxes) - 70
        x1 = max(p[0] + s[0] for p, s in boxes) + 20
        y1 = max(p[1] + s[1] for p, s in boxes) + 20
        groups.append({"id": index, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                       "font_size": 24, "flags": {}})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "dps-guidance/" + graph.name)), "revision": 0,
            "last_node_id": max(n.id for n in graph.nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [560, 260]}}, "version": 0.4}


def _execution_order(graph: Graph) -> dict[int, int]:
    """Topological order (the frontend's ``order`` field); notes first."""
    done: dict[int, int] = {}
    by_id = {n.id: n for n in graph.nodes}

    def visit(node_id: int) -> None:
        if node_id in done:
            return
        for source, _ in by_id[node_id].links.values():
            visit(source)
        done[node_id] = len(done)

    for node in sorted(graph.nodes, key=lambda n: (n.type not in NOTE_TYPES, n.id)):
        visit(node.id)
    return done


def ui_to_api(ui: dict, info: dict) -> dict:
    """The API prompt of a UI workflow (what the frontend's "Queue" sends), notes dropped."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) in (2, 4):
            continue
        schema = info[node["type"]]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values", []))
        for w in widgets(schema):
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {w.name!r}")
            inputs[w.name] = values.pop(0)
            del values[:len(w.extra)]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        entry: dict[str, Any] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def load_info(path: Path = FIXTURE) -> dict:
    return json.loads(path.read_text())


def load_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(FOLDER.glob("*.json"))}


def shrink(prompt: dict, side: int = 64, steps: int = 4) -> dict:
    """A prompt with the sizes and step counts lowered for stand-in runs on a CPU (what the tests change)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs.update(width=side, height=side)
        if node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt


def standin_input(name: str, side: int, dest: Path) -> None:
    """A shipped input image resized for a run at ``side`` px (the low-resolution photo to side/4)."""
    from PIL import Image
    image = Image.open(INPUTS / name)
    target = side // 4 if name == "lowres_photo.png" else side
    image.resize((target, target), Image.LANCZOS if image.mode != "RGBA" else Image.NEAREST).save(dest / name)


# ------------------------------------------------------------------------------------------------ commands

def write_workflows(info: dict) -> list[Path]:
    paths = []
    for make in GRAPHS:
        graph = make()
        path = FOLDER / f"{graph.name}.json"
        path.write_text(json.dumps(to_ui(graph, info), indent=1) + "\n")
        paths.append(path)
    return paths


def write_inputs() -> None:
    """The measurements the workflows load, simulated with the operators they declare (seeded)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    from skimage import data

    sys.path.insert(0, str(ROOT))
    from dps import operators as ops
    INPUTS.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def to_x(array: np.ndarray, side: int) -> torch.Tensor:
        h, w = array.shape[:2]
        s = min(h, w)
        crop = array[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        image = Image.fromarray(crop).resize((side, side), Image.LANCZOS)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    def to_image(y: torch.Tensor) -> Image.Image:
        array = ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        return Image.fromarray(array)

    with torch.no_grad():
        x = to_x(data.chelsea(), 512)
        y = ops.SuperResolution(factor=4, filter="bicubic")(x)
        to_image(y + 0.05 * torch.randn(y.shape, generator=generator)).save(INPUTS / "lowres_photo.png")
        x = to_x(data.coffee(), 512)
        y = ops.GaussianBlur(kernel_size=61, sigma=3.0)(x)
        to_image(y + 0.05 * torch.randn(y.shape, generator=generator)).save(INPUTS / "blurred_photo.jpg", quality=85)
        x = to_x(data.astronaut(), 512)
        y = x + 0.02 * torch.randn(x.shape, generator=generator)
        rgba = to_image(y).convert("RGBA")
        alpha = Image.new("L", rgba.size, 255)
        draw = ImageDraw.Draw(alpha)
        draw.rectangle((300, 60, 440, 200), fill=0)                         # a box over the rocket
        for k in range(7):                                                 # and scratches across the picture
            draw.line((20 + 70 * k, 500, 90 + 60 * k, 260), fill=0, width=9)
        rgba.putalpha(alpha)
        rgba = Image.composite(rgba, Image.new("RGBA", rgba.size, (0, 0, 0, 0)), alpha)   # no colour under holes
        rgba.save(INPUTS / "photo_with_holes.webp", quality=80, method=6)   # a PNG would be 500 KB
    sketch = Image.new("L", (512, 512), 255)
    draw = ImageDraw.Draw(sketch)
    draw.line((0, 360, 140, 300, 260, 330, 380, 280, 512, 320), fill=30, width=5)    # hills
    draw.polygon((150, 300, 150, 200, 250, 200, 250, 310), outline=20, width=5)      # a house
    draw.polygon((135, 205, 200, 140, 265, 205), outline=20, width=5)                 # its roof
    draw.rectangle((185, 250, 215, 308), outline=20, width=4)                         # a door
    draw.ellipse((360, 60, 460, 160), outline=40, width=5)                            # the sun
    for k in range(5):
        draw.line((40 + 90 * k, 420 + 15 * (k % 2), 90 + 90 * k, 440), fill=90, width=3)  # grass strokes
    draw.polygon((380, 280, 512, 320, 512, 512, 300, 512), fill=170)                 # a shaded slope
    sketch.convert("RGB").save(INPUTS / "storyboard_sketch.png", optimize=True)
    (INPUTS / "SOURCES.md").write_text(
        "# Input images of the example workflows\n\nCopy them into `ComfyUI/input/` (Load Image reads that "
        "folder).\n\n" + SOURCES + "\n\nEach is simulated with the operator and noise its workflow declares "
        "(seed 0): `lowres_photo.png` = chelsea, bicubic 4x down (512 -> 128 px) + noise 0.05; "
        "`blurred_photo.jpg` = coffee, Gaussian blur 61 px / sigma 3 + noise 0.05; `photo_with_holes.webp` = "
        "astronaut + noise 0.02, transparent box and scratches = missing; `storyboard_sketch.png` = a line "
        "drawing.\n")


def dump_object_info(out: Path = FIXTURE) -> None:
    """The schemas of the node types the workflows use, from a real ComfyUI with this pack."""
    import comfy_server as cs
    comfy = os.environ["COMFYUI_PATH"]
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    types = {n.type for make in GRAPHS for n in make().nodes} - NOTE_TYPES
    with tempfile.TemporaryDirectory() as tmp:
        work = cs.prepare_work(Path(tmp), comfy, python)
        with cs.comfy_server(work, comfy, python) as url:
            info = cs.get_json(url + "/object_info")
    # Model lists name the stand-in files; keep them (they are the workflows' names).
    picked = {t: info[t] for t in sorted(types)}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(picked, indent=1, sort_keys=True) + "\n")


def make_thumbnails(side: int = 128, steps: int = 16) -> None:
    """Run each workflow at ``side`` px with stand-in models; the card shows the measurement and the result."""
    import io

    from PIL import Image

    import comfy_server as cs
    comfy = os.environ["COMFYUI_PATH"]
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    info = load_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = cs.prepare_work(Path(tmp), comfy, python)
        for name in TASK_INPUTS.values():
            standin_input(name, side, work / "input")
        with cs.comfy_server(work, comfy, python) as url:
            for name, ui in load_workflows().items():
                prompt = shrink(ui_to_api(ui, info), side, steps)
                history = cs.run_prompt(url, prompt)
                assert history["status"]["status_str"] == "success", history["status"]
                result = _fetch_image(url, history["outputs"]["11"]["images"][0])
                shown = Image.open(work / "input" / TASK_INPUTS[name]).convert("RGB")
                label = "input sketch" if "storyboard" in name else "input (measurement)"
                card = _card(TITLES[name], shown, result, label, "result", f"{side} px, {steps} steps")
                buffer = io.BytesIO()
                card.save(buffer, "JPEG", quality=85)
                (FOLDER / f"{name}.jpg").write_bytes(buffer.getvalue())
                print(f"{name}.jpg: {len(buffer.getvalue()) // 1024} KB")


def _fetch_image(url: str, ref: dict):
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image
    query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=60) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


TITLES = {"dps_super_resolution": "DPS super-resolution 4x", "dps_inpainting": "DPS inpainting",
          "dps_deblur_controlnet": "DPS deblur + tile ControlNet",
          "dps_storyboard_sketch_to_art": "DPS storyboard sketch to art"}


def _card(title: str, left, right, left_label: str, right_label: str, run: str):
    """A square card (the template browser shows 256 px squares): title, two labelled panels, and a footer
    that says the result came from a stand-in model."""
    from PIL import Image, ImageDraw, ImageFont
    side, panel, pad = 512, 238, 8
    card = Image.new("RGB", (side, side), (24, 24, 28))
    draw = ImageDraw.Draw(card)
    big, small = ImageFont.load_default(size=30), ImageFont.load_default(size=19)
    draw.text((pad + 4, 14), title, fill=(240, 240, 240), font=big)
    for k, (image, label) in enumerate(((left, left_label), (right, right_label))):
        x = pad + k * (panel + 20)
        draw.text((x, 66), label, fill=(220, 220, 220), font=small)
        card.paste(image.resize((panel, panel), Image.NEAREST), (x, 94))
    draw.text((pad + panel - 1, 94 + panel // 2 - 14), ">", fill=(255, 220, 120), font=big)
    footer = ("Test run of this workflow with a stand-in", "model (random weights, " + run + "):",
              "it shows the wiring, not what a trained", "SD1.5 checkpoint draws.")
    for k, line in enumerate(footer):
        draw.text((pad + 4, 356 + 36 * k), line, fill=(215, 200, 150), font=small if k else small)
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("write", "inputs", "object-info", "thumbnails"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.command == "write":
        for path in write_workflows(load_info()):
            print("wrote", path.relative_to(ROOT))
    elif args.command == "inputs":
        write_inputs()
    elif args.command == "object-info":
        dump_object_info()
    else:
        make_thumbnails()


if __name__ == "__main__":
    main()
