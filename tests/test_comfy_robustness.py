"""Issue 14 in a real ComfyUI (through its HTTP API): bad inputs come back as node errors and the server keeps
serving; an interrupted guided prompt leaves no state behind; consecutive guided prompts do not grow the server's
memory. Needs COMFYUI_PATH (and COMFYUI_PYTHON), like tests/test_comfy_integration.py, whose tiny random SD1.5
UNet, TAESD and server fixtures it reuses.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_comfy_integration import SR, _get, _post, _run_prompt, _wait, _workflow, pytestmark, server, work  # noqa: F401

SAMPLER = "dpmpp_2m"      # a multistep sampler: its correction filter carries state from step to step


def _prompt(plain_seed: int | None = 1, guided_seed: int | None = 1, steps: int = 4) -> dict:
    """The integration workflow; a branch is dropped when its seed is None. Seeds decide which KSampler runs
    again (ComfyUI re-executes a node only when its inputs change)."""
    prompt = copy.deepcopy(_workflow(SR, SAMPLER))          # _workflow shares the SR dict
    del prompt["16"]                                        # no files written
    if plain_seed is None:
        for node in ("10", "12", "14"):
            del prompt[node]
    else:
        prompt["10"]["inputs"]["seed"] = plain_seed
    if guided_seed is None:
        for node in ("11", "13", "15"):
            del prompt[node]
    else:
        prompt["11"]["inputs"].update(seed=guided_seed, steps=steps)
    return prompt


def _errors(history: dict) -> list[str]:
    return [f"{m[1].get('node_type')}: {m[1].get('exception_message')}" for m in history["status"]["messages"]
            if m[0] == "execution_error"]


def _residual(history: dict, node: str) -> float:
    assert history["status"]["status_str"] == "success", _errors(history)
    return history["outputs"][node]["residual"][0]


def _set(node: str, **inputs):
    def change(prompt: dict) -> dict:
        prompt[node]["inputs"].update(inputs)
        return prompt
    return change


BAD = [   # (id, change of a good prompt, words of the error)
    ("strength-negative", _set("8", strength=-1.0), "strength"),
    ("strength-text", _set("8", strength="strong"), "strength"),
    ("strength-nan", _set("8", strength=math.nan), "zeta must be a finite number"),
    ("noise-sigma-negative", _set("6", sigma=-0.5), "sigma"),
    ("factor-3-on-64x64", _set("5", factor=3), "not divisible by the super-resolution factor 3"),
    ("start-after-end", _set("8", start_percent=0.8, end_percent=0.2), "start"),
    ("rule-unknown", _set("8", step_rule="fast"), "step_rule"),
    ("missing-measurement", lambda p: (p["8"]["inputs"].pop("measurement"), p)[1], "measurement"),
]


@pytest.mark.parametrize("change,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_are_node_errors_and_the_server_keeps_serving(server, change, words):
    prompt = change(_prompt(plain_seed=None, guided_seed=11))
    status, body = _post(server + "/prompt", {"prompt": prompt, "client_id": "dps-robustness"})
    if status == 200:                                        # accepted: it must fail as a node error when run
        history = _wait(server, body["prompt_id"])
        assert history["status"]["status_str"] == "error", history["status"]
        text = json.dumps(history["status"]["messages"])
        assert "execution_error" in text and words in text, text[-2000:]
    else:                                                    # refused by ComfyUI's validation
        assert status == 400 and (body.get("node_errors") or body.get("error")), body
        assert words in json.dumps(body), body
    assert "system" in _get(server + "/system_stats")       # still serving
    good = _run_prompt(server, _prompt(plain_seed=None, guided_seed=12))
    assert _residual(good, "15") > 0


def test_interrupted_guided_prompt_leaves_no_state(server):
    first = _run_prompt(server, _prompt(plain_seed=1, guided_seed=1))
    plain, guided = _residual(first, "14"), _residual(first, "15")
    # Only the guided sampler runs in this one (the plain branch is cached), for long enough to be interrupted.
    status, body = _post(server + "/prompt", {"prompt": _prompt(plain_seed=1, guided_seed=2, steps=400),
                                              "client_id": "dps-robustness"})
    assert status == 200, body
    deadline = time.monotonic() + 300
    while not _get(server + "/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the long prompt never started"
        time.sleep(0.1)
    time.sleep(3.0)                                          # well inside the 400 guided steps
    request = urllib.request.Request(server + "/interrupt", data=json.dumps({"prompt_id": body["prompt_id"]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:     # an empty 200 answer
        assert response.status == 200
    interrupted = _wait(server, body["prompt_id"])
    text = json.dumps(interrupted["status"]["messages"])
    assert "execution_interrupted" in text and '"node_id": "11"' in text, text[-2000:]
    # Both samplers run again (seeds changed twice): the results of the first prompt, to the last bit.
    _run_prompt(server, _prompt(plain_seed=3, guided_seed=3))
    again = _run_prompt(server, _prompt(plain_seed=1, guided_seed=1))
    assert (_residual(again, "14"), _residual(again, "15")) == (plain, guided)


def _server_rss(url: str) -> int:
    """Resident memory (bytes) of the ComfyUI process listening on ``url``'s port (Linux /proc)."""
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"main.py" in args and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    pytest.skip("cannot find the ComfyUI process in /proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc")
def test_hundred_guided_prompts_do_not_grow_memory(server):
    """100 consecutive guided prompts, each sampling again (a new seed; one guided step, to keep the test to
    minutes on a CPU): resident memory after prompt 100 within 5 % of that after the 10 warm-up prompts."""
    rss = {}
    for i in range(1, 101):
        history = _run_prompt(server, _prompt(plain_seed=None, guided_seed=1000 + i, steps=1))
        assert history["status"]["status_str"] == "success", _errors(history)
        if i % 10 == 0:
            rss[i] = _server_rss(server)
    print(f"server RSS (MiB) after prompts {list(rss)}: {[round(v / 2**20) for v in rss.values()]}")
    assert rss[100] <= 1.05 * rss[10], rss
