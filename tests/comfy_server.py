"""A real ComfyUI server for the example-workflow tests and the thumbnail maker, with stand-in models.

Stand-in models carry the names the example workflows use, so a workflow runs as shipped (only the sizes and
step counts are lowered by the caller):

* ``checkpoints/v1-5-pruned-emaonly.safetensors``: a tiny SD1.5-detectable UNet (one level, random weights,
  written by ``comfy_host_driver.py unet``), the real TAESD as its VAE (``first_stage_model.taesd_*``, which
  ComfyUI's checkpoint loader detects) and a CLIP ViT-L/14 text encoder with random weights
  (``hosts/make_sd15_checkpoint.py``'s shapes; ComfyUI ships the tokenizer).
* ``controlnet/*.safetensors``: a ControlNet of the tiny UNet's architecture; ``loras/my_style.safetensors``: a
  rank-4 LoRA on its attention.

Everything is written into a temporary folder that ComfyUI reads through ``--extra-model-paths-config`` and
``--base``-style directories (input, output, user); nothing goes into the ComfyUI checkout. Random weights make
no pretty picture: the runs prove that a workflow loads, validates and samples, and DPS pulls the result toward
the measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TAESD = ROOT.parent / "shared" / "assets" / "taesd"
DRIVER = HERE / "comfy_host_driver.py"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CONTROLNETS = ("control_v11f1e_sd15_tile.safetensors", "control_v11p_sd15_scribble.safetensors")
LORA = "my_style.safetensors"
PACK_FOLDER = "dps_guidance"          # the custom_nodes folder name = the template browser's module name
# The frontend maps model folders to loader nodes and fails on every model combo (Load Checkpoint, LoRA) when one
# of them is missing: with a stub torchvision, core's nodes_upscale_model does not import. A placeholder keeps
# the frontend whole; it is defined only where the real node is absent.
FRONTEND_PLACEHOLDERS = '''
"""Test-only: placeholders for core nodes that did not import here (written by tests/comfy_server.py)."""
import nodes

class UpscaleModelLoaderPlaceholder:
    RETURN_TYPES = ("UPSCALE_MODEL",); FUNCTION = "run"; CATEGORY = "testing"
    @classmethod
    def INPUT_TYPES(cls): return {"required": {"model_name": ([],)}}
    def run(self, model_name): raise RuntimeError("placeholder")

NODE_CLASS_MAPPINGS = {} if "UpscaleModelLoader" in nodes.NODE_CLASS_MAPPINGS else {
    "UpscaleModelLoader": UpscaleModelLoaderPlaceholder}
'''


def write_standin_models(work: Path, comfy: str, python: str, taesd: Path = TAESD) -> None:
    """Write the stand-in checkpoint, ControlNets and LoRA under ``work`` (see the module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE / "hosts"))
    try:
        import make_sd15_checkpoint as sd15
    finally:
        sys.path.pop(0)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COMFYUI_PATH=comfy)
    out = subprocess.run([python, str(DRIVER), "unet", str(raw / "unet.safetensors")], capture_output=True,
                         text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError("writing the tiny UNet failed:\n" + out.stderr[-3000:])
    state = load_file(str(raw / "unet.safetensors"))
    for part in ("encoder", "decoder"):
        for key, value in load_file(str(taesd / f"taesd_{part}.safetensors")).items():
            state[f"first_stage_model.taesd_{part}.{key}"] = value
    state["first_stage_model.vae_scale"] = torch.tensor(0.18215)      # SD1.5's latent scale (TAESD decodes x*scale)
    state["first_stage_model.vae_shift"] = torch.tensor(0.0)
    generator = torch.Generator().manual_seed(0)
    for name, shape in sd15.clip_shapes():
        state[name] = sd15.random_tensor(name, shape, generator).half()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for folder in ("checkpoints", "controlnet", "loras"):
        (work / folder).mkdir(exist_ok=True)
    save_file(state, str(work / "checkpoints" / CHECKPOINT))
    for name in CONTROLNETS:
        shutil.copyfile(raw / "tiny_controlnet.safetensors", work / "controlnet" / name)
    shutil.copyfile(raw / "tiny_lora.safetensors", work / "loras" / LORA)
    shutil.rmtree(raw)


def prepare_work(work: Path, comfy: str, python: str) -> Path:
    """Models, the pack as a custom node, the shipped input images and empty input/output/user folders."""
    for d in ("custom_nodes", "input", "output", "user"):
        (work / d).mkdir(parents=True, exist_ok=True)
    link = work / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    (work / "custom_nodes" / "dps_test_placeholders.py").write_text(FRONTEND_PLACEHOLDERS)
    if not (work / "checkpoints" / CHECKPOINT).exists():
        write_standin_models(work, comfy, python)
    for image in (ROOT / "example_workflows" / "input").glob("*"):
        shutil.copyfile(image, work / "input" / image.name)
    # The frontend's first-run tour would cover the canvas.
    settings = work / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    (work / "paths.yaml").write_text(
        f"dps_test:\n    base_path: {work}\n    custom_nodes: custom_nodes\n    checkpoints: checkpoints\n"
        "    controlnet: controlnet\n    loras: loras\n")
    return work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@contextmanager
def comfy_server(work: Path, comfy: str, python: str, frontend: bool = False) -> Iterator[str]:
    """Start ComfyUI on 127.0.0.1 (CPU, one torch thread) and yield its URL; kill it afterwards.

    ``frontend``: serve the installed frontend package (what a user sees); otherwise an empty front-end root."""
    port = free_port()
    args = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
            str(work / "paths.yaml"), "--output-directory", str(work / "output"), "--input-directory",
            str(work / "input"), "--user-directory", str(work / "user"), "--disable-api-nodes",
            "--database-url", "sqlite:///:memory:"]
    if not frontend:
        (work / "frontend").mkdir(exist_ok=True)
        args += ["--front-end-root", str(work / "frontend")]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log_path = work / f"server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(480):
                if proc.poll() is not None:
                    raise RuntimeError("ComfyUI exited at start:\n" + log_path.read_text()[-3000:])
                try:
                    get_json(url + "/system_stats", timeout=5)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.5)
            else:
                raise RuntimeError("ComfyUI did not answer within 240 s:\n" + log_path.read_text()[-3000:])
            yield url
        finally:
            proc.kill()          # SIGTERM does not stop main.py promptly
            proc.wait(timeout=30)


def run_prompt(url: str, prompt: dict, timeout: float = 900) -> dict:
    """POST an API-format prompt and wait for its history entry (success or error)."""
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": "dps-workflows"})
    if status != 200:
        raise AssertionError(f"prompt rejected ({status}): {json.dumps(body)[:3000]}")
    return wait_for(url, body["prompt_id"], timeout)


def wait_for(url: str, prompt_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = get_json(f"{url}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry["status"].get("completed") is not None and (
                entry["status"]["status_str"] in ("success", "error")):
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")
