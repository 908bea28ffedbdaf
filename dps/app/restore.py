"""Restore a user's measurement from an image file with DPS and an embedded prior (``python -m dps restore``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import DPSGuidance, ddpm_sample
from ..noise import Gaussian
from ..operators import GaussianBlur, Inpainting, MotionBlur, Operator, PhaseRetrieval, SuperResolution
from ..guidance import RULES
from ..validate import check_choice, check_int, check_number
from .files import check_output
from .imageio import MAX_PIXELS, read_image, write_png
from .models.taesd import load_taesd
from .prior import Prior, load_prior
from .tasks import TASKS
from .tuned import MIN_STEPS, guidance_for

INPAINTING = ("box_inpainting", "random_inpainting")


@dataclass
class RestoreRequest:
    task: str
    input: Path
    output: Path
    mask: Path | None = None
    factor: int = 4
    steps: int = 200
    zeta: float | None = None
    rule: str | None = None
    seed: int = 0
    sigma: float = 0.05
    model: str | None = None
    vae: str | None = None
    kernel_size: int | None = None
    blur_sigma: float | None = None
    intensity: float = 0.5
    kernel_seed: int = 0


def check_request(req: RestoreRequest) -> None:
    """Refuse a bad request before any work, naming the option and the fix (ValueError/TypeError).

    ``steps``: with fewer than ``MIN_STEPS`` respaced DDPM steps the prior's own sample is noise (at 1 step it
    is a single Tweedie estimate from pure noise) and the tuned ζ, rescaled by 200/steps, is far past its
    range, so such a run could only write garbage."""
    check_choice("--task", req.task, TASKS)
    check_output(req.output, "--output", {"--input": req.input, "--mask": req.mask, "--model": req.model,
                                          "--vae": req.vae})
    check_int("--steps", req.steps, minimum=MIN_STEPS, maximum=1000,
              fix="DPS takes many small guided steps: 200 is the tuned default, 50 a quick run")
    check_int("--seed", req.seed, minimum=0)
    check_int("--kernel-seed", req.kernel_seed, minimum=0)
    check_number("--sigma", req.sigma, minimum=0, fix="the measurement noise std on [-1, 1]; the paper uses 0.05")
    if req.zeta is not None:
        check_number("--zeta", req.zeta, minimum=0, fix="leave it out for the tuned value")
    if req.rule is not None:
        check_choice("--rule", req.rule, RULES)
    if req.task == "super_resolution":
        check_int("--factor", req.factor, minimum=1, fix="the super-resolution factor, e.g. --factor 4")
    if req.kernel_size is not None:
        size = check_int("--kernel-size", req.kernel_size, minimum=1, fix="an odd kernel side such as 9")
        if size % 2 == 0:
            raise ValueError(f"--kernel-size must be odd so the blur is centred on a pixel, got {size}; "
                             f"use {size - 1} or {size + 1}")
    if req.blur_sigma is not None:
        check_number("--blur-sigma", req.blur_sigma, above=0, fix="the Gaussian blur's std in pixels, e.g. 1.5")
    check_number("--intensity", req.intensity, minimum=0, maximum=1)
    if req.task in INPAINTING and req.mask is None:
        raise ValueError(f"--task {req.task} needs --mask MASK.png (white = missing pixels, same size as the input)")
    if req.task not in INPAINTING and req.mask is not None:
        raise ValueError(f"--mask is used only by {' and '.join(INPAINTING)}; leave it out for --task {req.task}")


def check_prior(req: RestoreRequest, prior: Prior, vae: torch.nn.Module | None) -> int:
    """The image side the prior restores; ValueError if the prior, the VAE and the factor do not fit."""
    latent = vae is not None
    if prior.kind == "latent" and not latent:
        raise ValueError(f"{req.model} is a latent prior; pass its TAESD decoder with --vae taesd_decoder.safetensors")
    if prior.kind != "latent" and latent:
        raise ValueError(f"{req.model or 'the bundled pixel prior'} is a pixel prior, so --vae is not used; leave "
                         "--vae out, or pass a latent prior with --model")
    if latent and vae[1].in_channels != prior.shape[0]:
        raise ValueError(f"{req.vae} decodes {vae[1].in_channels}-channel latents but the prior has "
                         f"{prior.shape[0]}; use the SD1.x TAESD decoder (taesd_decoder.safetensors)")
    side = prior.shape[-1] * (8 if latent else 1)
    if req.task == "super_resolution" and side % req.factor:
        divisors = [f for f in range(2, side) if side % f == 0]
        raise ValueError(f"--factor {req.factor} does not divide the {side}x{side} images the prior restores; "
                         f"use one of {', '.join(map(str, divisors))}")
    return side


def read_measurement(path: Path, task: str) -> torch.Tensor:
    """A measurement as (1, C, H, W): an image file in [-1, 1], or a ``.safetensors`` file with a tensor "y"
    (needed for phase retrieval, whose amplitudes are not image values)."""
    if Path(path).suffix == ".safetensors":
        return _read_tensor_measurement(Path(path))
    if task == "phase_retrieval":
        raise ValueError("phase-retrieval amplitudes are not image values: pass --input y.safetensors holding the "
                         "amplitude tensor 'y' of shape (C, H, W)")
    return read_image(path)[None]


def _read_tensor_measurement(path: Path) -> torch.Tensor:
    """The tensor "y" of a safetensors file, its declared shape checked before it is loaded."""
    from safetensors import safe_open

    if path.is_dir() or not path.is_file():
        raise ValueError(f"--input {path}: {'is a folder' if path.is_dir() else 'file not found'}; pass the "
                         "measurement file")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "y" not in f.keys():
                raise ValueError(f"it holds {sorted(f.keys())[:5]}, no tensor named 'y'")
            shape = f.get_slice("y").get_shape()
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1) or not all(shape):
                raise ValueError(f"'y' has shape {tuple(shape)}; it must be (C, H, W) or (1, C, H, W)")
            if math.prod(shape) > 4 * MAX_PIXELS:
                raise ValueError(f"'y' of shape {tuple(shape)} is far larger than any measurement of the priors")
            y = f.get_tensor("y")
    except ValueError as exc:
        raise ValueError(f"--input {path}: expected a safetensors file holding a tensor 'y' ({exc})") from exc
    except Exception as exc:
        raise ValueError(f"--input {path} is not a readable safetensors file ({exc})") from exc
    if not (y.is_floating_point() or y.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"--input {path}: 'y' has dtype {y.dtype}; save it as float32")
    y = y.float()
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"--input {path}: 'y' contains NaN or infinite values; fix the measurement")
    return y if y.ndim == 4 else y[None]


def _image_size(task: str, y: torch.Tensor, factor: int) -> tuple[int, int]:
    h, w = y.shape[-2:]
    if task == "super_resolution":
        return h * factor, w * factor
    if task == "phase_retrieval":
        return PhaseRetrieval(2.0).image_size(h, w)
    return h, w


def _operator(req: RestoreRequest, image_shape: tuple[int, int, int, int]) -> Operator:
    side = min(image_shape[-2:])
    if req.task == "super_resolution":
        return SuperResolution(req.factor)
    if req.task in ("box_inpainting", "random_inpainting"):
        mask = read_image(req.mask).mean(0, keepdim=True)[None].add(1).div(2)
        if tuple(mask.shape[-2:]) != tuple(image_shape[-2:]):
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the input is "
                             f"{image_shape[-1]}x{image_shape[-2]}; resize the mask to the input's size")
        missing = (mask > 0.5).float()
        if bool(missing.all()):
            raise ValueError(f"the mask {req.mask} marks every pixel missing (all white), so nothing is measured; "
                             "white = missing, black = kept: invert the mask if it is the other way round")
        return Inpainting(missing)
    if req.task == "gaussian_deblur":
        sigma = req.blur_sigma if req.blur_sigma is not None else max(1.5, 3.0 * side / 256)
        size = req.kernel_size if req.kernel_size is not None else min(2 * math.ceil(3 * sigma) + 1, 2 * side - 3)
        return GaussianBlur(size if size % 2 else size + 1, sigma)
    if req.task == "motion_deblur":
        size = req.kernel_size if req.kernel_size is not None else max(9, round(61 * side / 256))
        return MotionBlur(size if size % 2 else size + 1, req.intensity, seed=req.kernel_seed)
    return PhaseRetrieval(2.0)


def restore_file(req: RestoreRequest, log: Callable[[str], None] = print) -> Path:
    """Read ``req.input``, restore it with DPS, write ``req.output`` (atomically).

    Every check (options, output path, files, sizes) runs before sampling; ValueError/TypeError on bad input."""
    check_request(req)
    latent = req.vae is not None
    prior = load_prior(req.model, "latent" if latent else "pixel")
    vae = load_taesd(req.vae, "decoder") if latent else None
    side = check_prior(req, prior, vae)
    decoder = (lambda z: vae(z) * 2 - 1) if vae is not None else None  # noqa: E731  TAESD decodes to [0, 1]
    channels = 3 if latent else prior.shape[0]
    y = read_measurement(req.input, req.task)
    y = y.mean(1, keepdim=True).expand(-1, channels, -1, -1) if y.shape[1] != channels else y
    h, w = _image_size(req.task, y, req.factor)
    if (h, w) != (side, side):
        need = {"super_resolution": f"{side // req.factor}x{side // req.factor}",
                "phase_retrieval": f"{side + 2 * int(side / 4)}x{side + 2 * int(side / 4)}"}.get(req.task, f"{side}x{side}")
        raise ValueError(f"the {'latent' if latent else 'pixel'} prior restores {side}x{side} images, so a "
                         f"{req.task} input must be {need}; got {y.shape[-1]}x{y.shape[-2]}. Resize the input")
    shape = (1, channels, h, w)
    op = _operator(req, shape)
    op.check_measurement(y, shape)
    rule, zeta = guidance_for("latent" if latent else "pixel", req.task, req.steps)
    guidance = DPSGuidance(op, Gaussian(req.sigma), y, zeta=req.zeta if req.zeta is not None else zeta,
                           rule=req.rule or rule, decoder=decoder)
    log(f"restoring {req.input} ({req.task}) with the {'latent' if latent else 'pixel'} prior, {req.steps} steps")
    z = ddpm_sample(prior.eps_model(), (1, *prior.shape), steps=req.steps, guidance=guidance, clip_x0=not latent,
                    generator=torch.Generator().manual_seed(req.seed), show_progress=True)
    with torch.no_grad():
        x = decoder(z) if decoder is not None else z
    write_png(req.output, x[0].clamp(-1, 1))
    return req.output
