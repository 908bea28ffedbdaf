"""Drive a live Stable Diffusion WebUI (AUTOMATIC1111 or Forge, started with ``--api`` and this repository in its
``extensions/``) through its HTTP API as a client would, and check the DPS extension end to end.

    python tests/hosts/drive_webui.py --url http://127.0.0.1:7860 --log WEBUI.log [--steps 4] [--size 64]
        [--report report.json] [--only txt2img,img2img,paste,xyz,restore,invalid,proximal] [--sampler LCM]

``--log`` is the server's console output (the script prints ``[DPS Guidance] measurement distance a -> b`` there
after each guided job); without it the residual-in-the-log checks are skipped. Checks (each asserted):

* txt2img without DPS, with DPS at the defaults (``alwayson_scripts``, dict form), and with DPS at strength 0:
  finite, non-constant images; the ``DPS`` infotext entry; the distance in the log falls; strength 0 gives the
  unguided image; the guided image fits the measurement better than the unguided one.
* img2img likewise (measurement from the init image).
* paste-back: an img2img job given only the earlier job's ``infotext`` (the API runs the same infotext-paste
  fields the UI uses) restores the DPS settings: same ``DPS`` entry, same image.
* the X/Y/Z plot script over the ``[DPS]`` axes (strength and gradient mode): one cell per value, each cell's
  infotext carries its value.
* the DPS Restore tab's function, called as the page calls it (gradio's ``/run/predict``; on gradio 4, i.e.
  Forge, the image is uploaded first (``/upload``) and passed as a ``FileData``, and the result fetched by URL).
* invalid settings (an unknown task; ``upload`` with no image): a clear ``DPS error`` in the result, and the
  server keeps serving.
* the step rule ``proximal``: its infotext entry, a falling distance, a better fit than the unguided image, and
  the note about the sampler exactly when ``--sampler`` is not LCM.

Needs numpy, PIL and this repository's ``dps`` (for the measurement residual); a venv with torch will do.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dps.operators import SuperResolution  # noqa: E402
from dps_webui.settings import parse_infotext  # noqa: E402

TITLE = "DPS Guidance"
DISTANCE = re.compile(r"\[DPS Guidance\] measurement distance ([-+0-9.eE]+) -> ([-+0-9.eE]+) over (\d+) guided "
                      r"denoiser calls \((\d+) skipped\)")
DPS_ENTRY = re.compile(r'(?:^|, )DPS: ("(?:[^"\\]|\\.)*"|[^,]*)')
ERROR_ENTRY = re.compile(r'DPS error: ("(?:[^"\\]|\\.)*"|[^,\n]*)')


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# -- images ---------------------------------------------------------------------------------------------

def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype("float32") / 127.5 - 1).permute(2, 0, 1)[None]


def check_image(array: np.ndarray, size: tuple[int, int], what: str) -> None:
    expect(array.shape[:2] == size, f"{what}: image is {array.shape[1]}x{array.shape[0]}, expected {size[1]}x{size[0]}")
    as_float = array.astype("float64")
    expect(bool(np.isfinite(as_float).all()), f"{what}: non-finite pixels")
    expect(float(as_float.std()) > 0.5, f"{what}: the image is constant (a NaN latent decodes to black)")


# -- the server -----------------------------------------------------------------------------------------

class WebUI:
    def __init__(self, url: str, log: Path | None, timeout: float = 3600) -> None:
        self.url, self.log, self.timeout = url.rstrip("/"), log, timeout

    def request(self, path: str, payload: dict | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise CheckFailed(f"{path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def upload(self, name: str, content: bytes) -> str:
        """gradio 4's ``/upload`` (multipart, field ``files``): the server-side path of the uploaded file."""
        boundary = "dpsboundary" + hashlib.sha1(content).hexdigest()[:16]
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(self.url + "/upload", data=body,
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())[0]
        except urllib.error.HTTPError as exc:
            raise CheckFailed(f"/upload: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def file_bytes(self, file_data: dict) -> bytes:
        """The content of a gradio 4 ``FileData`` output (its ``url``, else ``/file=<path>``)."""
        url = file_data.get("url") or f"{self.url}/file={file_data['path']}"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            return response.read()

    def log_offset(self) -> int:
        return self.log.stat().st_size if self.log and self.log.exists() else 0

    def distances_since(self, offset: int) -> list[tuple[float, float, int, int]]:
        if not self.log:
            return []
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        return [(float(a), float(b), int(n), int(s)) for a, b, n, s in DISTANCE.findall(text)]


def gradio_major(config: dict) -> int:
    """The major version of the page's gradio (``/config``'s ``version``; AUTOMATIC1111 1.10: 3, Forge: 4)."""
    try:
        return int(str(config.get("version", "3")).split(".")[0])
    except ValueError:
        return 3


def dps_entry(infotext: str) -> str | None:
    m = DPS_ENTRY.search(infotext)
    if not m:
        return None
    value = m.group(1)
    return json.loads(value) if value.startswith('"') else value


def error_entry(infotext: str) -> str | None:
    m = ERROR_ENTRY.search(infotext)
    if not m:
        return None
    value = m.group(1)
    return json.loads(value) if value.startswith('"') else value


class Driver:
    def __init__(self, webui: WebUI, steps: int, size: int, factor: int = 4, sampler: str = "Euler",
                 scheduler: str | None = None) -> None:
        self.webui, self.steps, self.size, self.factor, self.sampler = webui, steps, size, factor, sampler
        self.scheduler = scheduler
        rng = np.random.default_rng(0)
        # the measurement: a smooth low-resolution picture (random weights make noise; any y will do)
        low = rng.random((size // factor // 4, size // factor // 4, 3))
        low = np.asarray(Image.fromarray((low * 255).astype("uint8")).resize((size // factor, size // factor),
                                                                               Image.BICUBIC))
        self.low = low
        self.low_b64 = png_b64(low)
        self.init_b64 = png_b64(np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)))
        self.results: dict[str, Any] = {}
        self.images: dict[str, np.ndarray] = {}
        self.pngs: dict[str, str] = {}  # the PNGs as returned (base64, with the infotext in a text chunk)

    def residual(self, image: np.ndarray) -> float:
        y = to_tensor(self.low)
        return float((SuperResolution(factor=self.factor)(to_tensor(image)) - y).norm())

    def base(self, **extra) -> dict:
        payload = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": self.steps, "width": self.size,
                   "height": self.size, "seed": 1, "sampler_name": self.sampler, "cfg_scale": 5, "batch_size": 1,
                   "n_iter": 1, "save_images": False}
        if self.scheduler:
            payload["scheduler"] = self.scheduler
        payload.update(extra)
        return payload

    def generate(self, name: str, endpoint: str, payload: dict, guided: bool, logged: bool = True) -> dict:
        """One job. ``guided``: DPS is on (its infotext entry, no error); ``logged``: it guided at least one
        step, so the log has one distance line (strength 0 guides no step: no line)."""
        offset = self.webui.log_offset()
        start = time.time()
        response = self.webui.request(f"/sdapi/v1/{endpoint}", payload)
        seconds = time.time() - start
        info = json.loads(response["info"])
        infotext = info["infotexts"][0]
        image = decode(response["images"][0])
        check_image(image, (self.size, self.size), name)
        distances = self.webui.distances_since(offset)
        result = {"seconds": round(seconds, 1), "infotext": infotext, "dps": dps_entry(infotext),
                  "dps_error": error_entry(infotext), "residual": round(self.residual(image), 4),
                  "log_distances": distances}
        if guided:
            expect(result["dps"] is not None, f"{name}: no DPS entry in the infotext: {infotext}")
            expect(result["dps_error"] is None, f"{name}: {result['dps_error']}")
            if self.webui.log and not logged:
                expect(not distances, f"{name}: strength 0 guided some steps: {distances}")
            elif self.webui.log:
                expect(len(distances) == 1, f"{name}: expected one distance line in the log, got {distances}")
                first, last, calls, skipped = distances[0]
                expect(calls > 0 and skipped == 0, f"{name}: {calls} guided calls, {skipped} skipped")
                result["distance_falls"] = last < first
        else:
            expect(result["dps"] is None and not distances, f"{name}: DPS ran although it was off: {infotext}")
        self.results[name] = result
        self.images[name] = image
        self.pngs[name] = response["images"][0]
        print(f"  {name}: {seconds:.0f} s, residual {result['residual']:.3f}, log {distances}, "
              f"DPS: {result['dps']}", flush=True)
        return response

    # -- checks -----------------------------------------------------------------------------------------

    def check_txt2img(self) -> None:
        self.generate("txt2img_plain", "txt2img", self.base(), guided=False)
        args = {"enabled": True, "source": "upload", "image": self.low_b64}
        self.generate("txt2img_dps_default", "txt2img", self.base(alwayson_scripts={TITLE: {"args": [args]}}), True)
        entry = parse_infotext(self.results["txt2img_dps_default"]["dps"])
        infotext = self.results["txt2img_dps_default"]["infotext"]
        forge = "DPS note" in infotext and "Forge" in infotext  # Forge: always x0_only, and the note says so
        expect(entry.get("zeta") == 1.0 and entry.get("rule") == "polyak" and
               entry.get("mode") == ("x0_only" if forge else "full"), f"defaults not in the infotext: {infotext}")
        expect(self.results["txt2img_dps_default"].get("distance_falls", True), "txt2img: the distance did not fall")
        expect(self.results["txt2img_dps_default"]["residual"] < self.results["txt2img_plain"]["residual"],
               "txt2img: the guided image does not fit the measurement better than the unguided one")
        zero = dict(args, zeta=0.0)
        self.generate("txt2img_dps_zeta0", "txt2img", self.base(alwayson_scripts={TITLE: {"args": [zero]}}), True,
                      logged=False)
        diff = np.abs(self.images["txt2img_dps_zeta0"].astype(int) - self.images["txt2img_plain"].astype(int)).max()
        self.results["txt2img_dps_zeta0"]["max_diff_to_plain"] = int(diff)
        expect(diff <= 1, f"strength 0 changed the image (max difference {diff})")

    def check_proximal(self) -> None:
        """txt2img with the step rule ``proximal`` (the data step on x0_hat, made for LCM): the infotext names the
        rule, the distance falls, the image fits the measurement better than the unguided one, and the note about
        the sampler appears exactly when the sampler is not LCM (``dps.proximal.sampler_note``)."""
        if "txt2img_plain" not in self.results:
            self.generate("txt2img_plain", "txt2img", self.base(), guided=False)
        args = {"enabled": True, "source": "upload", "image": self.low_b64, "rule": "proximal"}
        self.generate("txt2img_dps_proximal", "txt2img", self.base(alwayson_scripts={TITLE: {"args": [args]}}), True)
        result = self.results["txt2img_dps_proximal"]
        expect(parse_infotext(result["dps"]).get("rule") == "proximal", f"rule not in the infotext: {result['dps']}")
        expect(result.get("distance_falls", True), "proximal: the distance did not fall")
        expect(result["residual"] < self.results["txt2img_plain"]["residual"],
               "proximal: the guided image does not fit the measurement better than the unguided one")
        noted = "made for the LCM sampler" in result["infotext"]
        expect(noted == (self.sampler.upper() != "LCM"),
               f"proximal with {self.sampler}: the sampler note {'appeared' if noted else 'is missing'}")

    def img2img_payload(self, **extra) -> dict:
        return self.base(init_images=[self.init_b64], denoising_strength=0.75, **extra)

    def check_img2img(self) -> None:
        self.generate("img2img_plain", "img2img", self.img2img_payload(), guided=False)
        args = {"enabled": True}  # measurement from the init image (img2img's default source)
        self.generate("img2img_dps_default", "img2img", self.img2img_payload(alwayson_scripts={TITLE: {"args": [args]}}),
                      True)
        expect(parse_infotext(self.results["img2img_dps_default"]["dps"]).get("source") == "init image",
               "img2img: the measurement did not come from the init image")
        expect(self.results["img2img_dps_default"].get("distance_falls", True), "img2img: the distance did not fall")
        zero = {"enabled": True, "zeta": 0.0}
        self.generate("img2img_dps_zeta0", "img2img", self.img2img_payload(alwayson_scripts={TITLE: {"args": [zero]}}),
                      True, logged=False)
        diff = np.abs(self.images["img2img_dps_zeta0"].astype(int) - self.images["img2img_plain"].astype(int)).max()
        self.results["img2img_dps_zeta0"]["max_diff_to_plain"] = int(diff)
        expect(diff <= 1, f"img2img: strength 0 changed the image (max difference {diff})")

    def check_paste(self) -> None:
        """Settings that differ from every default, then the same job from its infotext alone."""
        args = {"enabled": True, "sr_filter": "area", "noise_sigma": 0.02, "zeta": 0.5, "rule": "dps",
                "mode": "x0_only", "start": 0.1, "end": 0.9}
        self.generate("img2img_dps_custom", "img2img", self.img2img_payload(alwayson_scripts={TITLE: {"args": [args]}}),
                      True)
        original = self.results["img2img_dps_custom"]
        pasted = self.webui.request("/sdapi/v1/png-info", {"image": self.pngs["img2img_dps_custom"]})
        self.results["png_info_parameters_DPS"] = pasted["parameters"].get("DPS")
        expect(pasted["parameters"].get("DPS") == original["dps"], f"PNG info lost the DPS entry: {pasted}")
        # AUTOMATIC1111 1.10's img2img paste fields for prompt, size, CFG and denoising carry no API names (its
        # txt2img ones do), so the API restores only steps, seed, sampler and the scripts' fields from the
        # infotext: send the others as a client would. The DPS settings must come from the infotext alone.
        keep = {k: v for k, v in self.img2img_payload().items() if k in ("prompt", "negative_prompt", "width",
                                                                          "height", "cfg_scale", "denoising_strength")}
        payload = dict(keep, init_images=[self.init_b64], infotext=pasted["info"], save_images=False)
        self.generate("img2img_from_infotext", "img2img", payload, True)
        again = self.results["img2img_from_infotext"]
        expect(again["dps"] == original["dps"], f"pasting did not restore the settings: {again['dps']!r} vs "
                                                f"{original['dps']!r}")
        diff = np.abs(self.images["img2img_from_infotext"].astype(int) - self.images["img2img_dps_custom"].astype(int))
        again["max_diff_to_original"] = int(diff.max())
        expect(diff.max() <= 1, f"the pasted job gave another image (max difference {diff.max()})")

    def script_info(self, name: str, img2img: bool) -> dict:
        for script in self.webui.request("/sdapi/v1/script-info"):
            if script["name"] == name and script["is_img2img"] == img2img:
                return script
        raise CheckFailed(f"script {name!r} not found")

    def check_xyz(self) -> None:
        choices = self.script_info("x/y/z plot", False)["args"][0]["choices"]
        for label in ("[DPS] Strength zeta", "[DPS] Step rule", "[DPS] Gradient", "[DPS] Guidance start",
                      "[DPS] Guidance end"):
            expect(label in choices, f"X/Y/Z axis {label!r} missing: {choices}")
        x, y = choices.index("[DPS] Strength zeta"), choices.index("[DPS] Gradient")
        script_args = [x, "0, 2", [], y, "", ["x0_only"], 0, "", [], True, True, False, False, False, False, False, 0,
                       False]
        args = {"enabled": True, "source": "upload", "image": self.low_b64}
        offset = self.webui.log_offset()
        start = time.time()
        response = self.webui.request("/sdapi/v1/txt2img", self.base(
            script_name="x/y/z plot", script_args=script_args, alwayson_scripts={TITLE: {"args": [args]}}))
        infotexts = json.loads(response["info"])["infotexts"]
        cells = [dps_entry(t) for t in infotexts[1:]]
        distances = self.webui.distances_since(offset)
        self.results["xyz"] = {"seconds": round(time.time() - start, 1), "images": len(response["images"]),
                               "cells": cells, "log_distances": distances}
        print(f"  xyz: {self.results['xyz']}", flush=True)
        expect(len(cells) == 2 and all(c for c in cells), f"xyz: expected 2 guided cells, got {infotexts}")
        zetas = sorted(parse_infotext(c).get("zeta") for c in cells)
        modes = {parse_infotext(c).get("mode") for c in cells}
        expect(zetas == [0.0, 2.0] and modes == {"x0_only"}, f"xyz: cells carry zeta {zetas}, mode {modes}")
        if self.webui.log:  # the zeta 2 cell guides; the zeta 0 cell does not
            expect(len(distances) == 1 and distances[0][1] < distances[0][0], f"xyz: log {distances}")
        for b64 in response["images"][1:]:
            check_image(decode(b64), (self.size, self.size), "xyz cell")
        if "txt2img_plain" in self.images:
            zero = [decode(b) for b, c in zip(response["images"][1:], cells) if parse_infotext(c).get("zeta") == 0.0]
            diff = int(np.abs(zero[0].astype(int) - self.images["txt2img_plain"].astype(int)).max())
            self.results["xyz"]["zeta0_max_diff_to_plain"] = diff
            expect(diff <= 1, f"xyz: the zeta 0 cell differs from the unguided image ({diff})")

    def check_restore(self) -> None:
        config = self.webui.request("/config")
        components = {c["id"]: c for c in config["components"]}
        index = None
        for i, dependency in enumerate(config["dependencies"]):
            targets = [t[0] if isinstance(t, list) else t for t in dependency.get("targets", [])]
            if any(components.get(t, {}).get("props", {}).get("value") == "Restore" for t in targets):
                index = i
        expect(index is not None, "the DPS Restore tab's button is not on the page")
        inputs = [components[c] for c in config["dependencies"][index]["inputs"]]
        gradio4 = gradio_major(config) >= 4
        if gradio4:  # Forge: images travel as uploaded files (FileData), as the page sends them
            path = self.webui.upload("degraded.png", base64.b64decode(self.low_b64))
            degraded: Any = {"path": path, "orig_name": "degraded.png", "meta": {"_type": "gradio.FileData"}}
            index = config["dependencies"][index].get("id", index)
        else:  # AUTOMATIC1111's gradio 3: data URLs
            degraded = "data:image/png;base64," + self.low_b64
        given = {"Degraded image": degraded, "Prompt (describe the image)": "a photo",
                 "Steps": self.steps, "Seed (-1: random)": 1, "Sampler": "Euler"}
        data = [given.get(c["props"].get("label"), c["props"].get("value")) for c in inputs]
        offset = self.webui.log_offset()
        start = time.time()
        out = self.webui.request("/run/predict", {"fn_index": index, "data": data, "session_hash": "dpslive"})["data"]
        before, after, infotext = out
        distances = self.webui.distances_since(offset)
        self.results["restore"] = {"seconds": round(time.time() - start, 1), "infotext": infotext,
                                   "dps": dps_entry(infotext or ""), "log_distances": distances,
                                   "gradio": config.get("version")}
        print(f"  restore: {self.results['restore']}", flush=True)
        expect(after is not None, f"restore gave no image: {infotext}")
        if gradio4:
            image = np.asarray(Image.open(io.BytesIO(self.webui.file_bytes(after))).convert("RGB"))
        else:
            image = decode(after if isinstance(after, str) else after.get("data") or after["name"])
        check_image(image, (self.size, self.size), "restore")
        self.results["restore"]["residual"] = round(self.residual(image), 4)
        expect(self.results["restore"]["dps"] is not None and not error_entry(infotext), f"restore: {infotext}")
        if self.webui.log:
            expect(len(distances) == 1 and distances[0][1] < distances[0][0], f"restore: log {distances}")

    def check_invalid(self) -> None:
        for name, args, needle in (
                ("invalid_task", {"enabled": True, "task": "deblur"}, "task must be one of"),
                ("invalid_no_image", {"enabled": True, "source": "upload"}, "no measurement image")):
            response = self.webui.request("/sdapi/v1/txt2img", self.base(steps=1, alwayson_scripts={
                TITLE: {"args": [args]}}))
            infotext = json.loads(response["info"])["infotexts"][0]
            error = error_entry(infotext)
            self.results[name] = {"dps_error": error}
            print(f"  {name}: DPS error: {error}", flush=True)
            expect(error is not None and needle in error, f"{name}: no clear error in the infotext: {infotext}")
            check_image(decode(response["images"][0]), (self.size, self.size), name)
        memory = self.webui.request("/sdapi/v1/progress")
        expect("progress" in memory, "the server stopped answering after the invalid settings")


CHECKS: dict[str, Callable[[Driver], None]] = {
    "txt2img": Driver.check_txt2img, "img2img": Driver.check_img2img, "paste": Driver.check_paste,
    "xyz": Driver.check_xyz, "restore": Driver.check_restore, "invalid": Driver.check_invalid,
    "proximal": Driver.check_proximal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--log", type=Path, help="the server's console log (for the measurement distance)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {list(CHECKS)}")
    parser.add_argument("--report", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--sampler", default="Euler", help="the WebUI's sampler name for the jobs (e.g. 'DPM++ 2M')")
    parser.add_argument("--scheduler", help="the WebUI's schedule type for the jobs (e.g. 'Uniform'; default: the "
                                            "sampler's own, A1111 1.9+)")
    args = parser.parse_args(argv)
    webui = WebUI(args.url, args.log)
    try:
        version = webui.request("/sdapi/v1/cmd-flags")
    except CheckFailed as exc:  # Forge dfdcbab answers 500 here (its backend flags fail the response model)
        version = {"error": str(exc)[:200]}
    driver = Driver(webui, args.steps, args.size, sampler=args.sampler, scheduler=args.scheduler)
    failures = []
    for name in args.only.split(","):
        print(f"{name} ...", flush=True)
        try:
            CHECKS[name](driver)
            print(f"{name}: ok", flush=True)
        except CheckFailed as exc:
            failures.append(f"{name}: {exc}")
            print(f"{name}: FAILED: {exc}", flush=True)
    driver.results["failures"] = failures
    driver.results["server_flags"] = {k: version.get(k) for k in ("use_cpu", "no_half", "precision", "api")}
    if args.report:
        args.report.write_text(json.dumps(driver.results, indent=2, default=str), encoding="utf-8")
    print(f"{len(args.only.split(',')) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
