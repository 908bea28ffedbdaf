"""The node pack in a real ComfyUI: in process (ComfyUI's loaders, KSampler, SamplerCustomAdvanced) and through
its HTTP API (server started headless on 127.0.0.1 by the test, killed after).

Needs ``COMFYUI_PATH`` (a ComfyUI checkout whose requirements are installed) and runs ComfyUI with
``COMFYUI_PYTHON`` (default: this Python). CPU torch without a matching torchvision: put a stub package on
``PYTHONPATH`` (see docs/development.md). The UNet is a tiny random SD1.5-detectable one written at test
time; the VAE is the real TAESD from ../shared/assets/taesd. Random weights are no image prior, so the tests
check mechanics and the data term, not picture quality: the guided result's measurement residual must be
clearly below the unguided one at the same seed.
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
from pathlib import Path

import pytest

from conftest import ROOT, TAESD

COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
DRIVER = Path(__file__).with_name("comfy_host_driver.py")
STRENGTH = 5.0    # random weights are no prior; a firmer pull than the default 1.0 makes the effect clear in 4 steps

pytestmark = [
    pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout with its requirements installed "
                                         "(and COMFYUI_PYTHON to its Python) to run the real-host tests"),
    pytest.mark.skipif(not (TAESD / "taesd_decoder.safetensors").exists(),
                       reason=f"TAESD weights not found at {TAESD} (../shared beside the checkout)"),
]

HELPERS = '''
"""Test-only nodes written by tests/test_comfy_integration.py: zero conditioning, a test picture, residuals."""
import torch

class DPSTestZeroCond:
    RETURN_TYPES = ("CONDITIONING",); FUNCTION = "run"; CATEGORY = "testing"
    @classmethod
    def INPUT_TYPES(cls): return {"required": {}}
    def run(self): return ([[torch.zeros(1, 77, 768), {}]],)

class DPSTestPicture:
    RETURN_TYPES = ("IMAGE",); FUNCTION = "run"; CATEGORY = "testing"
    @classmethod
    def INPUT_TYPES(cls): return {"required": {}}
    def run(self):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
        disc = (((xx - 0.6) ** 2 + (yy - 0.4) ** 2) < 0.06).float()
        return (torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy * (1 - disc), 0.8 * disc + 0.1], -1)[None],)

class DPSTestResidual:
    RETURN_TYPES = (); FUNCTION = "run"; CATEGORY = "testing"; OUTPUT_NODE = True
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "measurement": ("IMAGE",), "operator": ("DPS_OPERATOR",)}}
    def run(self, image, measurement, operator):
        x, y = image.movedim(-1, 1) * 2 - 1, measurement.movedim(-1, 1) * 2 - 1
        return {"ui": {"residual": (operator(x) - y).flatten(1).norm(dim=1).tolist()}}

NODE_CLASS_MAPPINGS = {"DPSTestZeroCond": DPSTestZeroCond, "DPSTestPicture": DPSTestPicture,
                       "DPSTestResidual": DPSTestResidual}
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("comfy")
    (work / "custom_nodes").mkdir()
    (work / "custom_nodes" / "dps_guidance").symlink_to(ROOT, target_is_directory=True)
    (work / "custom_nodes" / "dps_test_helpers.py").write_text(HELPERS)
    (work / "diffusion_models").mkdir()
    out = _driver("unet", str(work / "diffusion_models" / "tiny_sd15_unet.safetensors"))
    assert out.returncode == 0, out.stderr[-3000:]
    (work / "vae_approx").symlink_to(TAESD, target_is_directory=True)
    for d in ("output", "input", "user", "frontend"):
        (work / d).mkdir()
    (work / "paths.yaml").write_text(f"dps_test:\n    base_path: {work}\n    custom_nodes: custom_nodes\n"
                                     "    diffusion_models: diffusion_models\n    vae_approx: vae_approx\n")
    return work


def _driver(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_PATH=COMFY or "")
    return subprocess.run([PYTHON, str(DRIVER), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_in_process_every_sampler_and_entry_point(work):
    out = _driver("inprocess", str(work / "diffusion_models"), str(work / "custom_nodes" / "dps_guidance"),
                  str(TAESD), str(STRENGTH))
    assert out.returncode == 0, out.stderr[-5000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert {"DPSApply", "DPSMeasure", "DPSSuperResolution", "DPSInpainting"} <= set(result["registered"])
    assert result["model_type"] == "BaseModel"                     # detected as SD1.5
    cases = dict(result["samplers"], **{k: result[k] for k in ("batch", "noise_mask", "sampler_custom_advanced",
                                                                "taesd_surrogate", "lora_controlnet")},
                 **{f"proximal {k}": v for k, v in result["proximal"].items()})
    for name, case in cases.items():
        for plain, dps in zip(case["plain"], case["dps"]):
            assert dps < 0.9 * plain, (name, plain, dps)
    # From pure noise a random UNet's x0 saturates the decoder: guidance still lowers the residual, less so.
    # Every sampler name of the KSampler (ComfyUI's SAMPLER_NAMES): finite, and closer to the measurement guided.
    every = result["every_sampler"]
    assert len(every) >= 40 and {"lms", "deis", "ipndm", "res_multistep", "uni_pc_bh2", "dpm_adaptive"} <= set(every)
    for name, case in every.items():
        assert case["finite"] and case["dps"][0] < case["plain"][0], (name, case)
    # The driver's negative conditioning is its positive one, so a CFG++ sampler is its base sampler here, guided too
    # (the node feeds the correction to the unconditional prediction as well, nodes/hook.py feed_post_cfg).
    for name, base in (("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m")):
        for key in ("plain", "dps"):
            assert abs(every[name][key][0] - every[base][key][0]) <= 1e-3 * every[base][key][0], (name, every[name],
                                                                                                  every[base])
    assert result["txt2img"]["dps"][0] < result["txt2img"]["plain"][0]
    assert len(result["batch"]["dps"]) == 2
    assert result["plain_after_guided_equal"] is True              # the same model runs unguided afterwards
    assert result["lora_changes_output"] and result["controlnet_changes_output"]   # both are live in that graph
    assert "Resize the measurement to 16x16" in result["errors"]["measurement_size"]
    assert "mask is 32x32 but the measurement image is 16x16" in result["errors"]["mask_size"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(work):
    port = _free_port()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
         str(work / "paths.yaml"), "--output-directory", str(work / "output"), "--input-directory",
         str(work / "input"), "--user-directory", str(work / "user"), "--front-end-root", str(work / "frontend"),
         "--disable-api-nodes", "--database-url", "sqlite:///:memory:"],
        cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited at start:\n" + (work / "server.log").read_text()[-3000:])
            try:
                _get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not answer within 120 s")
        yield url
    finally:
        proc.kill()          # SIGTERM does not stop main.py promptly
        proc.wait(timeout=30)
        log.close()


def _run_prompt(url: str, prompt: dict, timeout: float = 600) -> dict:
    status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "dps-test"})
    assert status == 200, body
    return _wait(url, body["prompt_id"], timeout)


def _workflow(operator: dict, sampler: str = "euler", strength: float = STRENGTH, rule: str = "dps") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15_unet.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "3": {"class_type": "DPSTestZeroCond", "inputs": {}},
        "4": {"class_type": "DPSTestPicture", "inputs": {}},
        "5": operator,
        "6": {"class_type": "DPSGaussianNoise", "inputs": {"sigma": 0.02}},
        "7": {"class_type": "DPSMeasure", "inputs": {"image": ["4", 0], "operator": ["5", 0], "noise": ["6", 0], "seed": 0}},
        "8": {"class_type": "DPSApply", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "measurement": ["7", 0], "operator": ["5", 0], "noise": ["6", 0],
            "strength": strength, "step_rule": rule, "gradient": "full", "start_percent": 0.0, "end_percent": 1.0,
            "vae_precision": "auto", "fast_decoder": "none"}},
        # img2img from the bicubic upscale of the measurement (random weights are no prior from pure noise)
        "21": {"class_type": "ImageScale", "inputs": {"image": ["7", 0], "upscale_method": "bicubic", "width": 64,
                                                      "height": 64, "crop": "disabled"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["2", 0]}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 4, "cfg": 2.0,
                                                    "sampler_name": sampler, "scheduler": "karras", "positive": ["3", 0],
                                                    "negative": ["3", 0], "latent_image": ["9", 0], "denoise": 0.6}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["8", 0], "seed": 7, "steps": 4, "cfg": 2.0,
                                                    "sampler_name": sampler, "scheduler": "karras", "positive": ["3", 0],
                                                    "negative": ["3", 0], "latent_image": ["9", 0], "denoise": 0.6}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["2", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}},
        "14": {"class_type": "DPSTestResidual", "inputs": {"image": ["12", 0], "measurement": ["7", 0], "operator": ["5", 0]}},
        "15": {"class_type": "DPSTestResidual", "inputs": {"image": ["13", 0], "measurement": ["7", 0], "operator": ["5", 0]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "dps_test"}},
    }


SR = {"class_type": "DPSSuperResolution", "inputs": {"factor": 4, "filter": "bicubic"}}


def test_server_registers_the_nodes_with_their_socket_types(server):
    info = _get(server + "/object_info/DPSApply")["DPSApply"]
    required = info["input"]["required"]
    assert required["operator"][0] == "DPS_OPERATOR" and required["noise"][0] == "DPS_NOISE"
    assert info["output"] == ["MODEL"] and info["category"] == "sampling/dps"


@pytest.mark.parametrize("rule,strength", [("dps", STRENGTH), ("polyak", 1.0)], ids=["dps", "polyak-default"])
def test_server_prompt_guided_residual_below_unguided(server, work, rule, strength):
    history = _run_prompt(server, _workflow(SR, "dpmpp_2m", strength, rule))
    assert history["status"]["status_str"] == "success", history["status"]
    plain = history["outputs"]["14"]["residual"][0]
    dps = history["outputs"]["15"]["residual"][0]
    assert dps < 0.9 * plain, (plain, dps)
    assert history["outputs"]["16"]["images"][0]["filename"].startswith("dps_test")


def _progress_texts(url: str, prompt: dict, timeout: float = 600) -> tuple[dict, dict[str, list[str]]]:
    """Run ``prompt`` while listening on the server's websocket; the history and the progress texts per node
    (binary messages of type 3: event, node id length, node id, UTF-8 text; ComfyUI's protocol.py)."""
    websocket = pytest.importorskip("websocket", reason="needs websocket-client to listen to the server")
    import struct
    ws = websocket.create_connection(url.replace("http://", "ws://") + "/ws?clientId=dps-ui", timeout=timeout)
    texts: dict[str, list[str]] = {}
    try:
        status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "dps-ui"})
        assert status == 200, body
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                if struct.unpack(">I", message[:4])[0] == 3:
                    size = struct.unpack(">I", message[4:8])[0]
                    texts.setdefault(message[8:8 + size].decode(), []).append(message[8 + size:].decode())
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") == body["prompt_id"] and (
                    event["type"] in ("execution_error", "execution_interrupted") or
                    (event["type"] == "executing" and data.get("node") is None) or event["type"] == "execution_success"):
                break
    finally:
        ws.close()
    return _wait(url, body["prompt_id"], timeout=60), texts


def _wait(url: str, prompt_id: str, timeout: float = 900) -> dict:
    """The history of a posted prompt once it has completed (success, error or interrupted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.25)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def test_measure_preview_and_the_residual_on_the_sampler_node(server):
    prompt = _workflow(SR, "euler", 1.0, "polyak")
    for node_id in ("10", "12", "14", "16"):                   # the guided branch only
        del prompt[node_id]
    prompt["6"]["inputs"]["sigma"] = 0.021                      # a new measurement: DPS Measure runs again
    history, texts = _progress_texts(server, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    preview = history["outputs"]["7"]["images"]                 # DPS Measure shows its measurement
    assert len(preview) == 1 and preview[0]["type"] == "temp" and preview[0]["filename"].endswith(".png")
    lines = texts.get("11", [])          # on the guided KSampler, one line per evaluation and one after the last
    assert len(lines) == 5 and all(line.startswith("DPS: measurement residual") for line in lines), texts
    assert "after the last step's refinement" in lines[-1] and "refinement" not in lines[-2], lines

    def now_and_first(line: str) -> tuple[float, float]:
        head, first = line.split("‖ ", 1)[1].split(", from ")
        return float(head.split()[0]), float(first.split()[0])

    last, first = now_and_first(lines[-2])
    refined, first_again = now_and_first(lines[-1])
    assert last < first and first_again == first and refined <= last


def test_server_malformed_workflows_get_node_errors(server):
    mask = {"class_type": "DPSBoxMask", "inputs": {"width": 32, "height": 32, "box_width": 8, "box_height": 8,
                                                   "margin": 2, "seed": 0}}
    prompt = _workflow({"class_type": "DPSInpainting", "inputs": {"mask": ["20", 0]}})
    prompt["20"] = mask
    for node_id in ("7", "14", "15"):                         # the 64x64 picture itself is the measurement
        del prompt[node_id]
    prompt["8"]["inputs"]["measurement"] = ["4", 0]
    prompt["21"]["inputs"]["image"] = ["4", 0]
    history = _run_prompt(server, prompt)
    assert history["status"]["status_str"] == "error"
    text = json.dumps(history["status"]["messages"])
    assert "mask is 32x32 but the measurement image is 64x64" in text and '"node_type": "DPSApply"' in text

    prompt = _workflow(SR)
    prompt["21"]["inputs"].update(width=96, height=96)         # the measurement (16x16) now fits no longer
    for node_id in ("10", "12", "14", "15"):                   # only the guided branch
        del prompt[node_id]
    history = _run_prompt(server, prompt)
    assert history["status"]["status_str"] == "error"
    assert "Resize the measurement to 24x24" in json.dumps(history["status"]["messages"])

    status, body = _post(server + "/prompt", {"prompt": {"1": {"class_type": "DPSApply", "inputs": {}}}})
    assert status == 400 and "node_errors" in body


def test_example_workflows_match_the_servers_node_schemas(server):
    import comfy_workflows                       # UI format; checked here as the API prompt the frontend sends
    info = _get(server + "/object_info")
    paths = sorted((ROOT / "example_workflows").glob("*.json"))
    assert len(paths) >= 4
    for path in paths:
        workflow = comfy_workflows.ui_to_api(json.loads(path.read_text()), info)
        for node_id, node in workflow.items():
            spec = info[node["class_type"]]["input"]
            required, optional = spec["required"], spec.get("optional", {})
            assert set(required) <= set(node["inputs"]), (path.name, node_id, set(required) - set(node["inputs"]))
            for name, value in node["inputs"].items():
                declared = required.get(name) or optional.get(name)
                assert declared is not None, (path.name, node_id, name)
                if isinstance(value, list):                       # a link: [node id, output index]
                    source = info[workflow[value[0]]["class_type"]]["output"][value[1]]
                    assert source == declared[0], (path.name, node_id, name, source, declared[0])
