"""Restore a user's measurement from an image file with DPS and an embedded prior (``python -m dps restore``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import DPSGuidance
from ..noise import Gaussian
from ..operators import Operator, registry
from ..guidance import RULES
from ..validate import check_choice, check_int, check_number
from .files import check_output
from .imageio import MAX_PIXELS, read_image, write_png
from .models.taesd import load_taesd
from .prior import Prior, load_prior
from .tasks import image_size, measurement_size, operator_for, task_names
from .sampler import SAMPLERS, draw
from .tuned import MIN_STEPS, PROXIMAL_STEPS, guidance_for

INPAINTING = tuple(t.name for s, t in registry.tasks() if any(p.kind == "mask" for p in s.params))


@dataclass
class RestoreRequest:
    task: str
    input: Path
    output: Path
    mask: Path | None = None
    factor: int = 4
    steps: int | None = None            # None: RESTORE_STEPS[sampler]
    zeta: float | None = None
    rule: str | None = None
    sampler: str = "ddpm"               # dps.app.sampler.SAMPLERS
    seed: int = 0
    sigma: float = 0.05
    model: str | None = None
    vae: str | None = None
    kernel_size: int | None = None
    blur_sigma: float | None = None
    intensity: float = 0.5
    kernel_seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # any operator parameter by its name; overrides the above


# The steps a restore takes when none are asked for, per sampler.
RESTORE_STEPS = {"ddpm": 200, "proximal": PROXIMAL_STEPS}

# RestoreRequest's fields for operator parameters (the command line's options before the operator registry).
REQUEST_FIELDS = {("super_resolution", "factor"): "factor", ("gaussian_blur", "kernel_size"): "kernel_size",
                  ("motion_blur", "kernel_size"): "kernel_size", ("gaussian_blur", "sigma"): "blur_sigma",
                  ("motion_blur", "intensity"): "intensity", ("motion_blur", "seed"): "kernel_seed",
                  ("inpainting", "mask"): "mask"}


def check_request(req: RestoreRequest) -> None:
    """Refuse a bad request before any work, naming the option and the fix (ValueError/TypeError).

    ``steps``: with fewer than ``MIN_STEPS`` respaced DDPM steps the prior's own sample is noise (at 1 step it
    is a single Tweedie estimate from pure noise) and the tuned ζ, rescaled by 200/steps, is far past its
    range, so such a run could only write garbage."""
    check_choice("--task", req.task, task_names())
    check_output(req.output, "--output", {"--input": req.input, "--mask": req.mask, "--model": req.model,
                                          "--vae": req.vae})
    check_choice("--sampler", req.sampler, SAMPLERS)
    if req.steps is not None:
        check_int("--steps", req.steps, minimum=MIN_STEPS, maximum=1000,
                  fix=f"leave --steps out for the tuned default ({RESTORE_STEPS[req.sampler]} with --sampler "
                      f"{req.sampler})")
    check_int("--seed", req.seed, minimum=0)
    check_int("--kernel-seed", req.kernel_seed, minimum=0)
    check_number("--sigma", req.sigma, minimum=0, fix="the measurement noise std on [-1, 1]; the paper uses 0.05")
    if req.zeta is not None:
        check_number("--zeta", req.zeta, minimum=0, fix="leave it out for the tuned value")
    if req.rule is not None:
        check_choice("--rule", req.rule, RULES)
        if req.sampler == "proximal":
            raise ValueError("--sampler proximal fits the measurement by its own data step, not a step rule; leave "
                             "--rule out (--zeta still weighs the measurement), or use --sampler ddpm")
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
    spec, _ = registry.find_task(task)
    if spec.from_picture is None:
        raise ValueError(f"a {spec.display_name.lower()} measurement is {spec.measurement}: pass --input "
                         "y.safetensors holding the tensor 'y' of shape (C, H, W)")
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


def operator_params(req: RestoreRequest, tensors: bool = True) -> dict[str, Any]:
    """The task's operator parameters set in ``req``, by the operator's names (paths for masks and images);
    ``tensors=False``: the numbers and choices only."""
    spec, _ = registry.find_task(req.task)
    values = {p.name: getattr(req, REQUEST_FIELDS[spec.name, p.name]) for p in spec.params
              if (spec.name, p.name) in REQUEST_FIELDS}
    values = {k: v for k, v in {**values, **req.params}.items() if v is not None}
    return {k: v for k, v in values.items() if tensors or not spec.param(k).is_tensor}


def _read_mask(path: Path, image_shape: tuple[int, ...]) -> torch.Tensor:
    """A mask file as (1, 1, H, W), 1 (white) = missing; it must have the input's size and keep some pixels."""
    mask = read_image(path).mean(0, keepdim=True)[None].add(1).div(2)
    if tuple(mask.shape[-2:]) != tuple(image_shape[-2:]):
        raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the input is "
                         f"{image_shape[-1]}x{image_shape[-2]}; resize the mask to the input's size")
    missing = (mask > 0.5).float()
    if bool(missing.all()):
        raise ValueError(f"the mask {path} marks every pixel missing (all white), so nothing is measured; "
                         "white = missing, black = kept: invert the mask if it is the other way round")
    return missing


def _operator(req: RestoreRequest, image_shape: tuple[int, int, int, int]) -> Operator:
    """The task's operator from the registry: the request's parameters, files read, the rest scaled to the image."""
    spec, _ = registry.find_task(req.task)
    values = operator_params(req)
    for p in (p for p in spec.params if p.is_tensor):
        if values.get(p.name) is None and not p.optional:
            option = p.name.replace("_", "-")
            raise ValueError(f"--task {req.task} needs --{option} {option.upper()}.png ({p.help})")
        if values.get(p.name) is not None:
            path = Path(values[p.name])
            values[p.name] = _read_mask(path, image_shape) if p.kind == "mask" else read_image(path)[None]
    return operator_for(req.task, image_shape, values)


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
    h, w = image_size(req.task, tuple(y.shape[-2:]), operator_params(req, tensors=False))
    if (h, w) != (side, side):
        need = "x".join(map(str, measurement_size(req.task, (side, side), operator_params(req, tensors=False))))
        raise ValueError(f"the {'latent' if latent else 'pixel'} prior restores {side}x{side} images, so a "
                         f"{req.task} input must be {need}; got {y.shape[-1]}x{y.shape[-2]}. Resize the input")
    shape = (1, channels, h, w)
    op = _operator(req, shape)
    op.check_measurement(y, shape)
    steps = req.steps if req.steps is not None else RESTORE_STEPS[req.sampler]
    rule, zeta = guidance_for("latent" if latent else "pixel", req.task, steps, req.sampler)
    guidance = DPSGuidance(op, Gaussian(req.sigma), y, zeta=req.zeta if req.zeta is not None else zeta,
                           rule=req.rule or rule, decoder=decoder)
    log(f"restoring {req.input} ({req.task}) with the {'latent' if latent else 'pixel'} prior, {steps} steps "
        f"({req.sampler})")
    z = draw(prior, (1, *prior.shape), steps, guidance, req.sampler, seed=req.seed, clip_x0=not latent,
             show_progress=True)
    with torch.no_grad():
        x = decoder(z) if decoder is not None else z
    write_png(req.output, x[0].clamp(-1, 1))
    return req.output
