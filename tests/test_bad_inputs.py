"""Issue 14: every bad input gets a clear error and nothing is overwritten.

The catalogue: bad inputs to every public entry point of the command line (``python -m dps smoke|demo|restore|
train``) and of the library (samplers, schedules, guidance, noise models, operators, image I/O, training, the
demo's and restore's requests).

* Command line: exit code 2 (bad input) or 1 (a failed run), one line on stderr that names the fix, no traceback,
  and no file changed: the inputs, the bundled weights and the output folder are hashed before and after. Every
  case must fail before sampling or training starts: the runner replaces both with a function that raises, so a
  case that gets that far shows a traceback and fails. The cases run through ``tests/cli_forkserver.py`` (one
  interpreter with torch imported, one forked ``python -m dps`` per case); a few also as plain subprocesses.
* Library: ``TypeError``/``ValueError`` whose message names the argument and the fix.
* Correct results where input is unusual but valid: PNGs of every bit depth, colour type and interlacing read the
  same with and without Pillow; training writes to the current folder, never into the package.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from dps import DPSGuidance, Gaussian, Poisson, ddim_sample, ddpm_sample, euler_sample, heun_sample
from dps.app.demo import DemoSettings, load_setup
from dps.app.files import atomic_write, check_output
from dps.app.imageio import ImageReadError, decode_png, read_image, write_png
from dps.app.models.taesd import TinyDecoder, TinyEncoder
from dps.app.models.unet import SmallUNet
from dps.app.restore import RestoreRequest, restore_file
from dps.app.train import train
from dps.operators import Blur, GaussianBlur, Inpainting, MotionBlur, PhaseRetrieval, SuperResolution
from dps.host import image_to_nchw
from dps.schedule import alphas_cumprod_from_betas, linear_betas, respace, sigmas_karras

PACKAGE = ROOT / "dps"
WEIGHTS = PACKAGE / "app" / "weights"
LATENT_PRIOR = WEIGHTS / "latent_prior.safetensors"
PIXEL_PRIOR = WEIGHTS / "pixel_prior.safetensors"


# --------------------------------------------------------------------------------------------------------------
# PNG writer for the tests: every bit depth, colour type, row filter and Adam7 interlacing (PNG spec, ch. 7-9).

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _pack_row(row: np.ndarray, depth: int) -> bytes:
    if depth == 16:
        return row.astype(">u2").tobytes()
    if depth == 8:
        return row.astype(np.uint8).tobytes()
    per = 8 // depth
    v = np.concatenate([row, np.zeros((-len(row)) % per, row.dtype)]).astype(np.uint8).reshape(-1, per)
    return (v << np.arange(8 - depth, -1, -depth, dtype=np.uint8)).sum(1).astype(np.uint8).tobytes()


def _filter_row(line: bytes, prev: bytes, kind: int, bpp: int) -> bytes:
    out = bytearray(len(line))
    for x in range(len(line)):
        a, b = (line[x - bpp] if x >= bpp else 0), prev[x]
        c = prev[x - bpp] if x >= bpp else 0
        p = a + b - c
        paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
        out[x] = (line[x] - (0, a, b, (a + b) // 2, paeth)[kind]) & 255
    return bytes([kind]) + bytes(out)


def encode_png(samples: np.ndarray, depth: int, color: int, interlace: int = 0, palette=None) -> bytes:
    """(H, W, C) raw sample values -> PNG bytes; rows use filter types 0-4 in turn."""
    h, w, c = samples.shape
    bits = c * depth
    raw, k = b"", 0
    for x0, y0, dx, dy in (ADAM7 if interlace else ((0, 0, 1, 1),)):
        sub = samples[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        prev = bytes((sub.shape[1] * bits + 7) // 8)
        for row in sub:
            line = _pack_row(row.reshape(-1), depth)
            raw += _filter_row(line, prev, k % 5, max(1, bits // 8))
            prev, k = line, k + 1
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace))
    if palette is not None:
        out += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    return out + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def declared_png(width: int, height: int, color: int = 0) -> bytes:
    """A tiny file whose header declares ``width x height`` pixels (a decompression bomb's shape)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------------------
# Inputs (tiny, written once per module) and the runner.

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    write_png(d / "img28.png", torch.linspace(-1, 1, 28 * 28).reshape(1, 28, 28))
    write_png(d / "low7.png", torch.zeros(1, 7, 7))
    write_png(d / "img9.png", torch.zeros(1, 9, 9))
    write_png(d / "big32.png", torch.zeros(1, 32, 32))
    half = -torch.ones(1, 28, 28)
    half[:, 8:20, 8:20] = 1
    write_png(d / "mask28.png", half)
    write_png(d / "mask_all_white.png", torch.ones(1, 28, 28))
    (d / "junk.png").write_bytes(b"definitely not an image")
    (d / "huge_grey.png").write_bytes(declared_png(20000, 20000, 0))
    (d / "huge_rgb.png").write_bytes(declared_png(20000, 20000, 2))
    (d / "truncated.png").write_bytes((d / "img28.png").read_bytes()[:60])
    (d / "outdir").mkdir()
    (d / "model.ckpt").write_bytes(b"\x80\x02pickle")
    save_file({"y": torch.rand(1, 42, 42)}, str(d / "y_phase.safetensors"))
    save_file({"y": torch.full((1, 42, 42), float("nan"))}, str(d / "y_nan.safetensors"))
    save_file({"y": torch.rand(42, 42)}, str(d / "y_2d.safetensors"))
    save_file({"amplitude": torch.rand(1, 42, 42)}, str(d / "y_noname.safetensors"))
    save_file({"y": torch.rand(1, 30, 30)}, str(d / "y_30.safetensors"))
    save_file({k: torch.randn_like(v) * 0.01 for k, v in TinyDecoder(16).state_dict().items()},
              str(d / "taesd16_decoder.safetensors"))
    save_file({k: torch.randn_like(v) * 0.01 for k, v in TinyDecoder(4).state_dict().items()},
              str(d / "taesd_decoder.safetensors"))
    save_file({k: torch.randn_like(v) * 0.01 for k, v in TinyEncoder(4).state_dict().items()},
              str(d / "taesd_encoder.safetensors"))
    return d


def _hashes(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


class Runner:
    """``python -m dps`` through tests/cli_forkserver.py (POSIX), or one subprocess per call elsewhere."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("DPS_TRACEBACK", None)
        self.env = env
        self.proc = None
        if hasattr(os, "fork"):
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_forkserver.py")], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, argv: list[str], cwd: Path, mode: str = "forbid") -> dict:
        if self.proc is None:
            if mode != "allow" and mode != "forbid":
                pytest.skip("sampling patches need the fork server (POSIX)")
            out = subprocess.run([sys.executable, "-m", "dps", *argv], cwd=cwd, env=self.env, capture_output=True,
                                 text=True, timeout=300)
            return {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr}
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "mode": mode}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the CLI fork server died"
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli():
    runner = Runner()
    yield runner
    runner.close()


def assert_clear_failure(out: dict, rc: int, needles: tuple[str, ...], logged: bool = False) -> None:
    """``logged``: the run got past its checks and may have logged progress; the error is then its last line."""
    err = out["stderr"]
    assert "Traceback" not in err, err
    assert out["rc"] == rc, (out["rc"], err)
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == 2 and lines and lines[0].startswith("usage:"):      # argparse: usage, then one error line
        lines = lines[-1:]
    if logged:
        assert sum(line.startswith("error:") for line in lines) == 1, err
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error:") or ": error:" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def run_case(cli, inputs: Path, tmp_path: Path, args: list[str], rc: int, needles: tuple[str, ...],
             mode: str = "forbid", cwd: Path | None = None, logged: bool = False) -> dict:
    fmt = {"d": inputs, "pkg": PACKAGE, "tmp": tmp_path}
    argv = [a.format(**fmt) for a in args]
    watched = (inputs, WEIGHTS, tmp_path)
    before = _hashes(*watched)
    out = cli(argv, cwd or tmp_path, mode)
    after = _hashes(*watched)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files changed or appeared: {changed}\n{out['stderr']}"
    assert_clear_failure(out, rc, tuple(n.format(**fmt) for n in needles), logged)
    return out


# --------------------------------------------------------------------------------------------------------------
# The command-line catalogue: (id, arguments, exit code, words the one-line message must contain).

RESTORE = ["restore", "--task"]
SR = RESTORE + ["super_resolution", "--input", "{d}/low7.png"]
OUT = ["--output", "{tmp}/out.png"]
DEBLUR = RESTORE + ["gaussian_deblur", "--input", "{d}/img28.png"]
BOX = RESTORE + ["box_inpainting", "--input", "{d}/img28.png"]
PR = RESTORE + ["phase_retrieval"]
LATENT = ["--model", str(LATENT_PRIOR), "--vae"]

CLI_CASES = [
    # restore: output paths (checked before anything is read or sampled)
    ("restore-output-is-input", DEBLUR + ["--output", "{d}/img28.png"], 2, ("same file as --input", "Choose another")),
    ("restore-output-is-input-other-spelling", DEBLUR + ["--output", "{d}/../{d.name}/./img28.png"], 2,
     ("same file as --input",)),
    ("restore-output-is-mask", BOX + ["--mask", "{d}/mask28.png", "--output", "{d}/mask28.png"], 2,
     ("same file as --mask",)),
    ("restore-output-is-folder", SR + ["--output", "{d}/outdir"], 2, ("is a folder", "give a file name")),
    ("restore-output-missing-folder", SR + ["--output", "{tmp}/no/such/out.png"], 2, ("does not exist", "mkdir -p")),
    ("restore-output-under-a-file", SR + ["--output", "{d}/img28.png/out.png"], 2, ("does not exist",)),
    ("restore-output-not-png", SR + ["--output", "{tmp}/out.jpg"], 2, ("must end in .png",)),
    ("restore-output-into-package", SR + ["--output", "{pkg}/app/weights/out.png"], 2,
     ("inside the installed DPS package", "outside it")),
    # restore: numbers
    ("restore-steps-0", SR + OUT + ["--steps", "0"], 2, ("--steps must lie in [10, 1000]", "200")),
    ("restore-steps-1", SR + OUT + ["--steps", "1"], 2, ("--steps must lie in [10, 1000]",)),
    ("restore-steps-negative", SR + OUT + ["--steps", "-5"], 2, ("--steps",)),
    ("restore-steps-too-many", SR + OUT + ["--steps", "5000"], 2, ("--steps must lie in [10, 1000]",)),
    ("restore-steps-not-a-number", SR + OUT + ["--steps", "abc"], 2, ("--steps", "invalid int value")),
    ("restore-factor-0", SR + OUT + ["--factor", "0"], 2, ("--factor must be >= 1",)),
    ("restore-factor-negative", SR + OUT + ["--factor", "-4"], 2, ("--factor must be >= 1",)),
    ("restore-factor-3-on-9x9", RESTORE + ["super_resolution", "--input", "{d}/img9.png", "--factor", "3"] + OUT, 2,
     ("--factor 3 does not divide", "use one of 2, 4, 7, 14")),
    ("restore-input-wrong-size", RESTORE + ["super_resolution", "--input", "{d}/big32.png"] + OUT, 2,
     ("must be 7x7; got 32x32", "Resize")),
    ("restore-kernel-size-even", DEBLUR + OUT + ["--kernel-size", "8"], 2, ("--kernel-size must be odd", "7 or 9")),
    ("restore-kernel-size-0", DEBLUR + OUT + ["--kernel-size", "0"], 2, ("--kernel-size must be >= 1",)),
    ("restore-kernel-size-too-big", DEBLUR + OUT + ["--kernel-size", "61"], 2, ("too small", "kernel_size <")),
    ("restore-blur-sigma-0", DEBLUR + OUT + ["--blur-sigma", "0"], 2, ("--blur-sigma must be > 0",)),
    ("restore-blur-sigma-nan", DEBLUR + OUT + ["--blur-sigma", "nan"], 2, ("--blur-sigma must be a finite number",)),
    ("restore-intensity-2", RESTORE + ["motion_deblur", "--input", "{d}/img28.png"] + OUT + ["--intensity", "2"], 2,
     ("--intensity must lie in [0, 1]",)),
    ("restore-sigma-negative", SR + OUT + ["--sigma", "-0.1"], 2, ("--sigma must be >= 0", "0.05")),
    ("restore-sigma-nan", SR + OUT + ["--sigma", "nan"], 2, ("--sigma must be a finite number",)),
    ("restore-sigma-inf", SR + OUT + ["--sigma", "inf"], 2, ("--sigma must be a finite number",)),
    ("restore-intensity-nan", RESTORE + ["motion_deblur", "--input", "{d}/img28.png"] + OUT + ["--intensity", "nan"],
     2, ("--intensity must be a finite number",)),
    ("restore-zeta-negative", SR + OUT + ["--zeta", "-1"], 2, ("--zeta must be >= 0", "leave it out")),
    ("restore-zeta-nan", SR + OUT + ["--zeta", "nan"], 2, ("--zeta must be a finite number",)),
    ("restore-zeta-inf", SR + OUT + ["--zeta", "inf"], 2, ("--zeta must be a finite number",)),
    ("restore-seed-negative", SR + OUT + ["--seed", "-1"], 2, ("--seed must be >= 0",)),
    ("restore-rule-unknown", SR + OUT + ["--rule", "fast"], 2, ("--rule", "invalid choice")),
    ("restore-task-unknown", RESTORE + ["denoise", "--input", "{d}/img28.png"] + OUT, 2, ("--task", "invalid choice")),
    # restore: masks
    ("restore-mask-missing", BOX + OUT, 2, ("needs --mask",)),
    ("restore-mask-all-white", BOX + ["--mask", "{d}/mask_all_white.png"] + OUT, 2,
     ("marks every pixel missing", "invert the mask")),
    ("restore-mask-wrong-size", BOX + ["--mask", "{d}/big32.png"] + OUT, 2, ("resize the mask",)),
    ("restore-mask-not-used", SR + ["--mask", "{d}/mask28.png"] + OUT, 2, ("--mask is used only by",)),
    # restore: input files
    ("restore-input-missing", RESTORE + ["gaussian_deblur", "--input", "{d}/missing.png"] + OUT, 2, ("not found",)),
    ("restore-input-folder", RESTORE + ["gaussian_deblur", "--input", "{d}/outdir"] + OUT, 2, ("is a folder",)),
    ("restore-input-empty", RESTORE + ["gaussian_deblur", "--input", ""] + OUT, 2, ("is a folder",)),
    ("restore-input-junk", RESTORE + ["gaussian_deblur", "--input", "{d}/junk.png"] + OUT, 2, ("cannot read",)),
    ("restore-input-truncated", RESTORE + ["gaussian_deblur", "--input", "{d}/truncated.png"] + OUT, 2,
     ("cannot read",)),
    ("restore-input-declares-20000x20000-grey", RESTORE + ["gaussian_deblur", "--input", "{d}/huge_grey.png"] + OUT,
     2, ("declares 20000x20000", "resize it")),
    ("restore-input-declares-20000x20000-rgb", RESTORE + ["gaussian_deblur", "--input", "{d}/huge_rgb.png"] + OUT,
     2, ("declares 20000x20000",)),
    ("restore-phase-retrieval-png", PR + ["--input", "{d}/img28.png"] + OUT, 2, ("y.safetensors",)),
    ("restore-tensor-without-y", PR + ["--input", "{d}/y_noname.safetensors"] + OUT, 2, ("no tensor named 'y'",)),
    ("restore-tensor-nan", PR + ["--input", "{d}/y_nan.safetensors"] + OUT, 2, ("NaN",)),
    ("restore-tensor-2d", PR + ["--input", "{d}/y_2d.safetensors"] + OUT, 2, ("(C, H, W)",)),
    ("restore-tensor-wrong-size", PR + ["--input", "{d}/y_30.safetensors"] + OUT, 2,
     ("must be 42x42; got 30x30", "Resize")),
    # restore: model files
    ("restore-model-missing", SR + OUT + ["--model", "{d}/nope.safetensors"], 2, ("not found", "python -m dps train")),
    ("restore-model-pickle", SR + OUT + ["--model", "{d}/model.ckpt"], 2, ("only .safetensors",)),
    ("restore-model-is-a-vae", SR + OUT + ["--model", "{d}/taesd_decoder.safetensors"], 2, ("is not a DPS prior",)),
    ("restore-latent-prior-without-vae", SR + OUT + ["--model", str(LATENT_PRIOR)], 2, ("latent prior", "--vae")),
    ("restore-vae-16-channels", SR + OUT + LATENT + ["{d}/taesd16_decoder.safetensors"], 2,
     ("decodes 16-channel latents", "SD1.x TAESD decoder")),
    ("restore-vae-is-an-encoder", SR + OUT + LATENT + ["{d}/taesd_encoder.safetensors"], 2,
     ("is not a TAESD decoder",)),
    ("restore-vae-with-pixel-prior", SR + OUT + ["--model", str(PIXEL_PRIOR), "--vae", "{d}/taesd_decoder.safetensors"], 2,
     ("pixel prior", "leave --vae out")),
    ("restore-vae-missing", SR + OUT + ["--vae", "{d}/nope.safetensors"], 2, ("TAESD file not found",)),
    # demo
    ("demo-images-0", ["demo", "--images", "0", "--output", "{tmp}/g.png"], 2, ("--images must lie in [1, 50]",)),
    ("demo-images-negative", ["demo", "--images", "-3", "--output", "{tmp}/g.png"], 2, ("--images must lie in [1, 50]",)),
    ("demo-images-tuning-digits", ["demo", "--images", "51", "--output", "{tmp}/g.png"], 2, ("tuned",)),
    ("demo-steps-0", ["demo", "--steps", "0", "--output", "{tmp}/g.png"], 2, ("--steps must lie in [10, 1000]",)),
    ("demo-steps-1", ["demo", "--steps", "1", "--output", "{tmp}/g.png"], 2, ("--steps must lie in [10, 1000]",)),
    ("demo-seed-negative", ["demo", "--seed", "-2", "--output", "{tmp}/g.png"], 2, ("--seed must be >= 0",)),
    ("demo-output-folder", ["demo", "--output", "{d}/outdir"], 2, ("is a folder",)),
    ("demo-output-empty", ["demo", "--output", ""], 2, ("is a folder",)),
    ("demo-output-not-png", ["demo", "--output", "{tmp}/grid.jpg"], 2, ("must end in .png",)),
    ("demo-output-under-a-file", ["demo", "--output", "{d}/img28.png/grid.png"], 2, ("is a file, not a folder",)),
    ("demo-output-into-package", ["demo", "--output", "{pkg}/app/weights/grid.png"], 2, ("inside the installed",)),
    ("demo-output-is-model", ["demo", "--model", "{d}/taesd_decoder.safetensors", "--output",
                              "{d}/taesd_decoder.safetensors"], 2, ("must end in .png",)),
    ("demo-vae-without-latent", ["demo", "--vae", "{d}/taesd_decoder.safetensors", "--output", "{tmp}/g.png"], 2,
     ("add --latent",)),
    ("demo-latent-without-vae", ["demo", "--latent", "--output", "{tmp}/g.png"], 2, ("needs a TAESD decoder", "--vae")),
    ("demo-latent-vae-16-channels", ["demo", "--latent", "--vae", "{d}/taesd16_decoder.safetensors", "--output",
                                     "{tmp}/g.png"], 2, ("decodes 16-channel latents",)),
    ("demo-latent-model-without-latent", ["demo", "--model", str(LATENT_PRIOR), "--output", "{tmp}/g.png"], 2,
     ("is a latent prior", "--latent")),
    ("demo-images-not-a-number", ["demo", "--images", "many"], 2, ("--images", "invalid int value")),
    # train (the bundled weights are never the default output and are refused as one)
    ("train-out-bundled-weights", ["train", "--steps", "1", "--out", "{pkg}/app/weights/pixel_prior.safetensors"], 2,
     ("--out", "inside the installed DPS package")),
    ("train-out-into-package", ["train", "--steps", "1", "--out", "{pkg}/new_prior.safetensors"], 2,
     ("--out", "inside the installed DPS package")),
    ("train-batch-0", ["train", "--batch", "0"], 2, ("--batch must be >= 1", "--batch 64")),
    ("train-steps-0", ["train", "--steps", "0"], 2, ("--steps must be >= 1",)),
    ("train-steps-negative", ["train", "--steps", "-5"], 2, ("--steps must be >= 1",)),
    ("train-lr-0", ["train", "--lr", "0"], 2, ("--lr must be > 0", "2e-3")),
    ("train-lr-nan", ["train", "--lr", "nan"], 2, ("--lr must be a finite number",)),
    ("train-seed-negative", ["train", "--seed", "-1"], 2, ("--seed must be >= 0",)),
    ("train-out-folder", ["train", "--out", "{d}/outdir"], 2, ("is a folder",)),
    ("train-out-empty", ["train", "--out", ""], 2, ("is a folder",)),
    ("train-out-not-safetensors", ["train", "--out", "{tmp}/prior.pt"], 2, ("must end in .safetensors",)),
    ("train-out-missing-folder", ["train", "--out", "{tmp}/no/prior.safetensors"], 2, ("does not exist", "mkdir")),
    ("train-out-is-encoder", ["train", "--kind", "latent", "--vae-encoder", "{d}/taesd_encoder.safetensors", "--out",
                              "{d}/taesd_encoder.safetensors"], 2, ("same file as --vae-encoder",)),
    ("train-latent-without-encoder", ["train", "--kind", "latent"], 2, ("needs --vae-encoder",)),
    ("train-data-dir-missing", ["train", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/p.safetensors"], 2,
     ("pip download",)),
    ("train-data-dir-is-file", ["train", "--data-dir", "{d}/img28.png"], 2, ("is a file",)),
    ("train-kind-unknown", ["train", "--kind", "video"], 2, ("--kind", "invalid choice")),
    # smoke and the command itself
    ("smoke-steps-0", ["smoke", "--steps", "0"], 2, ("--steps must lie in [1, 1000]",)),
    ("smoke-steps-negative", ["smoke", "--steps", "-3"], 2, ("--steps must lie in [1, 1000]",)),
    ("smoke-dim-y-3", ["smoke", "--dim-y", "3"], 2, ("--dim-y", "invalid choice")),
    ("smoke-seed-negative", ["smoke", "--seed", "-1"], 2, ("--seed must be >= 0",)),
    ("no-command", [], 2, ("required",)),
    ("unknown-command", ["sample"], 2, ("invalid choice",)),
]


@pytest.mark.parametrize("args,rc,needles", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_clear_line_and_changes_nothing(cli, inputs, tmp_path, args, rc, needles):
    run_case(cli, inputs, tmp_path, args, rc, needles)


def test_train_default_cwd_inside_package_is_refused(cli, inputs, tmp_path):
    """The issue's worst case: ``python -m dps train`` run where the bundled weights live."""
    run_case(cli, inputs, tmp_path, ["train", "--steps", "1"], 2, ("--out", "inside the installed DPS package"),
             cwd=WEIGHTS)


# Failed runs (exit 1) and interruptions: sampling is replaced by a function that raises at once.
@pytest.mark.parametrize("mode,rc,needles", [
    ("runtime_error", 1, ("the run failed", "out of memory")),
    ("interrupt", 130, ("interrupted",)),
    ("os_error", 2, ("/some/folder: Is a directory",)),
])
def test_cli_failed_run_is_one_line_and_writes_nothing(cli, inputs, tmp_path, mode, rc, needles):
    run_case(cli, inputs, tmp_path, SR + OUT + ["--steps", "10"], rc, needles, mode=mode, logged=True)
    assert not (tmp_path / "out.png").exists()


def test_cli_diverged_guidance_is_one_line_and_writes_nothing(cli, inputs, tmp_path):
    """GuidanceDivergedError (a real one: ζ = 1e12 explodes on the first guided step) is a failed run."""
    run_case(cli, inputs, tmp_path, SR + OUT + ["--steps", "10", "--zeta", "1e12"], 1, ("diverged", "Lower zeta"),
             mode="allow", logged=True)
    assert not (tmp_path / "out.png").exists()


def _mnist_csv(path: Path, per_class: int = 11) -> None:
    rng = np.random.default_rng(0)
    rows = [np.concatenate([rng.integers(0, 256, 784), [label]]) for label in range(10) for _ in range(per_class)]
    path.write_bytes(gzip.compress(("\n".join(",".join(map(str, r)) for r in rows) + "\n").encode()))


def test_train_writes_to_the_current_folder_and_never_the_package(cli, inputs, tmp_path):
    (tmp_path / "data").mkdir()
    _mnist_csv(tmp_path / "data" / "mnist_5k.csv.gz")
    bundled = _hashes(WEIGHTS)
    out = cli(["train", "--steps", "1", "--batch", "2"], tmp_path, mode="allow")
    assert out["rc"] == 0, out["stderr"]
    assert _hashes(WEIGHTS) == bundled
    from dps.app.prior import load_prior
    prior = load_prior(tmp_path / "pixel_prior.safetensors")
    assert prior.shape == (1, 28, 28) and (tmp_path / "pixel_prior.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("argv,needles", [
    (["restore", "--task", "gaussian_deblur", "--input", "{d}/img28.png", "--output", "{d}/img28.png"],
     ("same file as --input",)),
    (["train", "--steps", "1", "--out", "{pkg}/app/weights/pixel_prior.safetensors"], ("inside the installed",)),
    (["demo", "--images", "0"], ("--images must lie in [1, 50]",)),
])
def test_real_subprocess_entry_point(inputs, tmp_path, argv, needles):
    """The same guarantees through a plain ``python -m dps`` (the fork server above is only a faster way)."""
    fmt = {"d": inputs, "pkg": PACKAGE}
    before = _hashes(inputs, WEIGHTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DPS_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "dps", *[a.format(**fmt) for a in argv]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert _hashes(inputs, WEIGHTS) == before
    assert_clear_failure({"rc": out.returncode, "stderr": out.stderr}, 2, needles)


def test_module_train_entry_point_shares_the_error_handling(inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "dps.app.train", "--batch", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert_clear_failure({"rc": out.returncode, "stderr": out.stderr}, 2, ("--batch must be >= 1",))


# --------------------------------------------------------------------------------------------------------------
# The library catalogue: (id, call, exception type, regex naming the argument and the fix).

def eps(x, t):
    return torch.zeros_like(x)


def denoiser(x, sigma):
    return torch.zeros_like(x)


Y = torch.zeros(1, 1, 8, 8)
OP = SuperResolution(1)
SIGMAS = sigmas_karras(4, 0.1, 10.0).float()
X = torch.randn(1, 1, 8, 8)
NAN = float("nan")


def guidance(**kw):
    return DPSGuidance(**{"operator": OP, "noise": Gaussian(0.05), "y": Y, **kw})


LIBRARY_CASES = [
    # samplers
    ("ddpm-steps-0", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=0), ValueError, r"steps must lie in \[1, 1000\]"),
    ("ddpm-steps-str", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps="10"), TypeError, r"steps must be an integer, got str"),
    ("ddpm-steps-bool", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=True), TypeError, r"steps must be an integer, got bool"),
    ("ddpm-steps-fraction", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2.5), ValueError, r"steps must be an integer"),
    ("ddpm-shape-none", lambda: ddpm_sample(eps, None, steps=2), TypeError, r"shape must be a tuple of positive integers"),
    ("ddpm-shape-zero", lambda: ddpm_sample(eps, (1, 1, 0, 8), steps=2), ValueError, r"shape\[2\] must be >= 1"),
    ("ddpm-model-none", lambda: ddpm_sample(None, (1, 1, 8, 8), steps=2), TypeError, r"eps_model must be"),
    ("ddpm-xT-nan", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, x_T=torch.full((1, 1, 8, 8), NAN)), ValueError,
     r"x_T contains NaN"),
    ("ddpm-xT-numpy", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, x_T=np.zeros((1, 1, 8, 8), np.float32)),
     TypeError, r"x_T must be a torch.Tensor, got numpy.ndarray; convert it with torch.from_numpy"),
    ("ddpm-xT-shape", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, x_T=torch.zeros(1, 1, 4, 4)), ValueError,
     r"x_T has shape \(1, 1, 4, 4\) but shape is"),
    ("ddpm-guidance-str", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, guidance="dps"), TypeError,
     r"guidance must be a dps.DPSGuidance"),
    ("ddpm-generator-int", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, generator=0), TypeError,
     r"generator must be a torch.Generator"),
    ("ddpm-betas-above-one", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, betas=torch.full((10,), 1.5,
                                                 dtype=torch.float64)), ValueError, r"betas must .* \(0, 1\)"),
    ("ddpm-betas-list", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, betas=[0.1, 0.2]), TypeError,
     r"betas must be a torch.Tensor"),
    ("ddpm-callback-str", lambda: ddpm_sample(eps, (1, 1, 8, 8), steps=2, callback="print"), TypeError,
     r"callback must be"),
    ("ddim-eta-nan", lambda: ddim_sample(eps, (1, 1, 8, 8), steps=2, eta=NAN), ValueError, r"eta must be a finite"),
    ("ddim-eta-negative", lambda: ddim_sample(eps, (1, 1, 8, 8), steps=2, eta=-0.5), ValueError, r"eta must lie in \[0, 1\]"),
    ("ddim-eta-str", lambda: ddim_sample(eps, (1, 1, 8, 8), steps=2, eta="0"), TypeError, r"eta must be a number"),
    ("euler-sigmas-increasing", lambda: euler_sample(denoiser, X, SIGMAS.flip(0)), ValueError,
     r"sigmas must decrease strictly.*sort them"),
    ("euler-sigmas-inf", lambda: euler_sample(denoiser, X, torch.tensor([math.inf, 1.0, 0.0])), ValueError,
     r"sigmas contains NaN or infinite"),
    ("euler-sigmas-nan", lambda: euler_sample(denoiser, X, torch.tensor([2.0, NAN, 0.0])), ValueError,
     r"sigmas contains NaN"),
    ("euler-sigmas-negative", lambda: euler_sample(denoiser, X, torch.tensor([2.0, 1.0, -1.0])), ValueError,
     r"sigmas must decrease"),
    ("euler-sigmas-repeated", lambda: euler_sample(denoiser, X, torch.tensor([2.0, 2.0, 0.0])), ValueError,
     r"sigmas must decrease strictly"),
    ("euler-sigmas-one", lambda: euler_sample(denoiser, X, torch.tensor([2.0])), ValueError, r"at least two"),
    ("euler-sigmas-numpy", lambda: euler_sample(denoiser, X, SIGMAS.numpy()), TypeError, r"sigmas must be a torch.Tensor"),
    ("euler-x-nan", lambda: euler_sample(denoiser, torch.full((1, 1, 8, 8), NAN), SIGMAS), ValueError, r"x contains NaN"),
    ("euler-x-none", lambda: euler_sample(denoiser, None, SIGMAS), TypeError, r"x must be a torch.Tensor, got None"),
    ("heun-sigmas-increasing", lambda: heun_sample(denoiser, X, SIGMAS.flip(0)), ValueError, r"sigmas must decrease"),
    ("euler-denoiser-none", lambda: euler_sample(None, X, SIGMAS), TypeError, r"denoiser must be"),
    # schedules
    ("respace-steps-0", lambda: respace(alphas_cumprod_from_betas(linear_betas()), 0), ValueError, r"steps must lie in"),
    ("respace-steps-str", lambda: respace(alphas_cumprod_from_betas(linear_betas()), "5"), TypeError, r"steps must be an integer"),
    ("linear-betas-0", lambda: linear_betas(0), ValueError, r"num_steps must be >= 1"),
    ("karras-sigma-min-0", lambda: sigmas_karras(10, 0.0, 14.6), ValueError, r"sigma_min must be > 0"),
    ("karras-max-below-min", lambda: sigmas_karras(10, 1.0, 0.5), ValueError, r"sigma_max must be > 1"),
    ("karras-inf", lambda: sigmas_karras(10, 0.1, math.inf), ValueError, r"sigma_max must be a finite number"),
    # guidance
    ("guidance-zeta-nan", lambda: guidance(zeta=NAN), ValueError, r"zeta must be a finite number"),
    ("guidance-zeta-inf", lambda: guidance(zeta=math.inf), ValueError, r"zeta must be a finite number"),
    ("guidance-zeta-negative", lambda: guidance(zeta=-1.0), ValueError, r"zeta must be >= 0"),
    ("guidance-zeta-str", lambda: guidance(zeta="2"), TypeError, r"zeta must be a number, got str"),
    ("guidance-zeta-none", lambda: guidance(zeta=None), TypeError, r"zeta must be a number, got None"),
    ("guidance-y-numpy", lambda: guidance(y=np.zeros((1, 1, 8, 8))), TypeError, r"y must be a torch.Tensor.*from_numpy"),
    ("guidance-y-none", lambda: guidance(y=None), TypeError, r"y must be a torch.Tensor, got None"),
    ("guidance-y-nan", lambda: guidance(y=torch.full((1, 1, 8, 8), NAN)), ValueError, r"NaN"),
    ("guidance-y-int", lambda: guidance(y=torch.zeros(1, 1, 8, 8, dtype=torch.uint8)), ValueError, r"y must be a floating"),
    ("guidance-operator-none", lambda: guidance(operator=None), TypeError, r"operator must be a forward model"),
    ("guidance-noise-str", lambda: guidance(noise="gaussian"), TypeError, r"noise must be a dps.noise model"),
    ("guidance-start-2", lambda: guidance(start=2.0), ValueError, r"start must lie in \[0, 1\]"),
    ("guidance-start-nan", lambda: guidance(start=NAN), ValueError, r"start must be a finite number"),
    ("guidance-end-before-start", lambda: guidance(start=0.8, end=0.2), ValueError, r"start <= end"),
    ("guidance-rule-unknown", lambda: guidance(rule="fast"), ValueError, r"rule must be one of"),
    ("guidance-mode-unknown", lambda: guidance(mode="half"), ValueError, r"mode must be one of"),
    ("guidance-sigma-data-0", lambda: guidance(sigma_data=0.0), ValueError, r"sigma_data must be > 0"),
    ("guidance-decoder-str", lambda: guidance(decoder="taesd"), TypeError, r"decoder must be a function"),
    # noise models
    ("gaussian-negative", lambda: Gaussian(-1.0), ValueError, r"sigma must be >= 0.*0.05"),
    ("gaussian-nan", lambda: Gaussian(NAN), ValueError, r"sigma must be a finite number"),
    ("gaussian-str", lambda: Gaussian("0.05"), TypeError, r"sigma must be a number, got str"),
    ("gaussian-none", lambda: Gaussian(None), TypeError, r"sigma must be a number, got None"),
    ("gaussian-inf", lambda: Gaussian(math.inf), ValueError, r"sigma must be a finite number"),
    ("gaussian-tensor-batch", lambda: Gaussian(torch.tensor([0.1, 0.2])), TypeError, r"sigma must be a number"),
    ("poisson-0", lambda: Poisson(0.0), ValueError, r"rate must be > 0"),
    ("poisson-inf", lambda: Poisson(math.inf), ValueError, r"rate must be a finite number"),
    # operators
    ("sr-factor-0", lambda: SuperResolution(0), ValueError, r"factor must be >= 1"),
    ("sr-factor-fraction", lambda: SuperResolution(2.5), ValueError, r"factor must be an integer"),
    ("sr-factor-str", lambda: SuperResolution("4"), TypeError, r"factor must be an integer, got str"),
    ("sr-factor-none", lambda: SuperResolution(None), TypeError, r"factor must be an integer, got None"),
    ("sr-filter-unknown", lambda: SuperResolution(4, "nearest"), ValueError, r"filter must be one of"),
    ("sr-input-numpy", lambda: SuperResolution(4)(np.zeros((1, 1, 8, 8), np.float32)), TypeError,
     r"x must be a torch.Tensor.*from_numpy"),
    ("blur-kernel-size-even", lambda: GaussianBlur(8, 1.0), ValueError, r"kernel_size must be odd.*7 or 9"),
    ("blur-kernel-size-0", lambda: GaussianBlur(0, 1.0), ValueError, r"kernel_size must be >= 1"),
    ("blur-kernel-size-none", lambda: GaussianBlur(None, 1.0), TypeError, r"kernel_size must be an integer"),
    ("blur-sigma-0", lambda: GaussianBlur(9, 0.0), ValueError, r"sigma must be positive"),
    ("blur-sigma-nan", lambda: GaussianBlur(9, NAN), ValueError, r"sigma must be a finite number"),
    ("blur-kernel-numpy", lambda: Blur(np.ones((3, 3))), TypeError, r"kernel must be a torch.Tensor"),
    ("motion-intensity-2", lambda: MotionBlur(9, 2.0), ValueError, r"intensity must lie in \[0, 1\]"),
    ("motion-intensity-nan", lambda: MotionBlur(9, NAN), ValueError, r"intensity must be a finite number"),
    ("phase-oversample-1e6", lambda: PhaseRetrieval(1e6), ValueError, r"oversample must lie in \[0, 8\]"),
    ("phase-oversample-negative", lambda: PhaseRetrieval(-1.0), ValueError, r"oversample must lie in \[0, 8\]"),
    ("phase-oversample-str", lambda: PhaseRetrieval("2"), TypeError, r"oversample must be a number"),
    ("inpainting-mask-numpy", lambda: Inpainting(np.zeros((8, 8))), TypeError, r"mask must be a torch.Tensor"),
    ("inpainting-mask-range", lambda: Inpainting(torch.full((8, 8), 2.0)), ValueError, r"\[0, 1\]"),
    # image I/O
    ("write-png-nan", lambda: write_png("never-written.png", torch.full((1, 4, 4), NAN)), ValueError,
     r"NaN or infinite values.*nothing was written"),
    ("write-png-numpy", lambda: write_png("x.png", np.zeros((1, 4, 4))), TypeError, r"image must be a torch.Tensor"),
    ("write-png-hwc", lambda: write_png("x.png", torch.zeros(4, 4)), ValueError, r"image must have 3 dimensions"),
    ("host-image-numpy", lambda: image_to_nchw(np.zeros((1, 8, 8, 3))), TypeError, r"image must be a torch.Tensor"),
    ("read-image-folder", lambda: read_image(ROOT / "dps"), ImageReadError, r"is a folder, not an image file"),
    # training, demo and restore requests
    ("train-steps-0", lambda: train(torch.zeros(4, 1, 8, 8), SmallUNet(1, 8, (1,)), steps=0), ValueError,
     r"steps must be >= 1"),
    ("train-batch-0", lambda: train(torch.zeros(4, 1, 8, 8), SmallUNet(1, 8, (1,)), steps=1, batch=0), ValueError,
     r"batch must be >= 1"),
    ("train-data-numpy", lambda: train(np.zeros((4, 1, 8, 8)), SmallUNet(1, 8, (1,)), steps=1), TypeError,
     r"data must be a torch.Tensor"),
    ("train-data-nan", lambda: train(torch.full((4, 1, 8, 8), NAN), SmallUNet(1, 8, (1,)), steps=1), ValueError,
     r"data contains NaN"),
    ("train-data-empty", lambda: train(torch.zeros(0, 1, 8, 8), SmallUNet(1, 8, (1,)), steps=1), ValueError,
     r"data is empty"),
    ("demo-images-0", lambda: load_setup(DemoSettings(images=0)), ValueError, r"images must be >= 1"),
    ("demo-images-negative", lambda: load_setup(DemoSettings(images=-3)), ValueError, r"images must be >= 1"),
    ("restore-request-steps-1", lambda: restore_file(RestoreRequest("super_resolution", Path("in.png"), Path("o.png"),
                                                                    steps=1)), ValueError, r"--steps must lie in \[10"),
    ("restore-request-steps-str", lambda: restore_file(RestoreRequest("super_resolution", Path("in.png"),
                                                                      Path("o.png"), steps="50")), TypeError,
     r"--steps must be an integer"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input_names_the_argument_and_the_fix(call, exc, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=match):
        call()
    assert not list(tmp_path.iterdir()), "a refused call wrote a file"


def test_all_ones_inpainting_mask_warns():
    with pytest.warns(UserWarning, match="every pixel missing"):
        Inpainting(torch.ones(1, 1, 8, 8))


def test_phase_retrieval_refuses_before_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="oversample"):
            PhaseRetrieval(1e6)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------------------------------------------
# Image input: the declared size before decoding; every PNG read correctly with and without Pillow.

@pytest.fixture(params=["pillow", "no-pillow"])
def pillow(request, monkeypatch):
    if request.param == "no-pillow":
        monkeypatch.setitem(sys.modules, "PIL", None)        # `from PIL import Image` raises ImportError
    else:
        pytest.importorskip("PIL")
    return request.param


@pytest.mark.parametrize("color", [0, 2])
def test_declared_size_is_checked_before_decoding(tmp_path, pillow, color):
    path = tmp_path / "bomb.png"
    path.write_bytes(declared_png(20000, 20000, color))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageReadError, match="declares 20000x20000"):
            read_image(path)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5


PNG_KINDS = [(color, depth, interlace) for color, depths in DEPTHS.items() for depth in depths for interlace in (0, 1)]


@pytest.mark.parametrize("color,depth,interlace", PNG_KINDS,
                         ids=[f"colour{c}-{d}bit{'-interlaced' if i else ''}" for c, d, i in PNG_KINDS])
def test_every_png_kind_reads_correctly(tmp_path, pillow, color, depth, interlace):
    """16-bit, palette, grey+alpha, 1-4 bit and Adam7-interlaced PNGs: the values written, with or without Pillow
    (Pillow reduces 16-bit colour to 8 bits: within one 8-bit level)."""
    rng = np.random.default_rng(color * 100 + depth * 2 + interlace)
    h, w, top = 11, 13, (1 << depth) - 1
    palette = None
    if color == 3:
        palette = rng.integers(0, 256, (1 << depth, 3))
        samples = rng.integers(0, 1 << depth, (h, w, 1))
        expected = palette[samples[..., 0]] / 255
    else:
        samples = rng.integers(0, top + 1, (h, w, CHANNELS[color]))
        samples[0, 0] = top                       # a white pixel: 16-bit must not saturate, must stay 1.0
        expected = {0: samples, 2: samples, 4: samples[..., :1], 6: samples[..., :3]}[color] / top
    (tmp_path / "x.png").write_bytes(encode_png(samples, depth, color, interlace, palette))
    image = read_image(tmp_path / "x.png")
    want = torch.from_numpy(expected).permute(2, 0, 1).float() * 2 - 1
    assert image.shape == want.shape
    tolerance = 2 / 255 + 1e-6 if (pillow == "pillow" and depth == 16 and color != 0) else 1e-6
    assert float((image - want).abs().max()) <= tolerance


def test_sixteen_bit_grey_keeps_its_precision(tmp_path, pillow):
    """The issue's case: a 16-bit PNG read as saturated white. Values between 8-bit levels survive."""
    ramp = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28, 1)
    (tmp_path / "ramp16.png").write_bytes(encode_png(ramp, 16, 0))
    image = read_image(tmp_path / "ramp16.png")
    torch.testing.assert_close(image, torch.from_numpy(ramp / 65535).permute(2, 0, 1).float() * 2 - 1)
    assert 0.4 < float(image.add(1).div(2).mean()) < 0.6


def test_corrupt_png_data_is_a_clear_error():
    short = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
             + _chunk(b"IDAT", zlib.compress(b"\x00" * 7)) + _chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        decode_png(short)
    with pytest.raises(ImageReadError, match="corrupt PNG image data"):
        decode_png(short.replace(_chunk(b"IDAT", zlib.compress(b"\x00" * 7)), _chunk(b"IDAT", b"garbage!")))


# --------------------------------------------------------------------------------------------------------------
# Output files: checked up front, written atomically.

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_write_png_refuses_nan_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.png"
    write_png(target, torch.zeros(1, 4, 4))
    before = target.read_bytes()
    with pytest.raises(ValueError, match="NaN"):
        write_png(target, torch.full((1, 4, 4), NAN))
    assert target.read_bytes() == before


def test_check_output_accepts_a_new_file_and_a_creatable_folder(tmp_path):
    assert check_output(tmp_path / "a.png", "--output") == tmp_path / "a.png"
    assert check_output(tmp_path / "new" / "a.png", "--output", create_parent=True) == tmp_path / "new" / "a.png"
    with pytest.raises(ValueError, match="does not exist"):
        check_output(tmp_path / "new" / "a.png", "--output")
