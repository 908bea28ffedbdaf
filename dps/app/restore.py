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
from .imageio import read_image, write_png
from .models.taesd import load_taesd
from .prior import load_prior
from .tuned import guidance_for


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


def read_measurement(path: Path, task: str) -> torch.Tensor:
    """A measurement as (1, C, H, W): an image file in [-1, 1], or a ``.safetensors`` file with a tensor "y"
    (needed for phase retrieval, whose amplitudes are not image values)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            y = load_file(str(path))["y"].float()
        except Exception as exc:
            raise ValueError(f"{path}: expected a safetensors file holding a tensor named 'y' ({exc})") from exc
        return y if y.ndim == 4 else y[None]
    if task == "phase_retrieval":
        raise ValueError("phase-retrieval amplitudes are not image values: pass --input y.safetensors holding the "
                         "amplitude tensor 'y' of shape (C, H, W)")
    return read_image(path)[None]


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
        if req.mask is None:
            raise ValueError(f"--task {req.task} needs --mask MASK.png (white = missing pixels, same size as the input)")
        mask = read_image(req.mask).mean(0, keepdim=True)[None].add(1).div(2)
        if tuple(mask.shape[-2:]) != tuple(image_shape[-2:]):
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the input is "
                             f"{image_shape[-1]}x{image_shape[-2]}; resize the mask to the input's size")
        return Inpainting((mask > 0.5).float())
    if req.task == "gaussian_deblur":
        sigma = req.blur_sigma or max(1.5, 3.0 * side / 256)
        size = req.kernel_size or min(2 * math.ceil(3 * sigma) + 1, 2 * side - 3)
        return GaussianBlur(size if size % 2 else size + 1, sigma)
    if req.task == "motion_deblur":
        size = req.kernel_size or max(9, round(61 * side / 256))
        return MotionBlur(size if size % 2 else size + 1, req.intensity, seed=req.kernel_seed)
    return PhaseRetrieval(2.0)


def restore_file(req: RestoreRequest, log: Callable[[str], None] = print) -> Path:
    """Read ``req.input``, restore it with DPS, write ``req.output``; ValueError on bad input."""
    latent = req.vae is not None
    prior = load_prior(req.model, "latent" if latent else "pixel")
    decoder = None
    channels = 3 if latent else prior.shape[0]
    side = prior.shape[-1] * (8 if latent else 1)
    if latent:
        vae = load_taesd(req.vae, "decoder")
        decoder = lambda z: vae(z) * 2 - 1  # noqa: E731
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
